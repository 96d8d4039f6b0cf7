import torch

from jumpflow import nets


def test_gradients_through_the_mlps_jvp_are_right():
    """Methods like TVM backpropagate through d/ds net(x, t, s): gradcheck that second-order path in float64.
    (F.layer_norm failed it in torch 2.13; the MLP's own layer norm passes.)"""
    torch.manual_seed(0)
    net = nets.build("mlp", (2,), width=8, depth=1).double()
    torch.nn.init.normal_(net.out.weight)  # the output layer starts at zero, which would make the check vacuous
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t, s = torch.full((3,), 0.7, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64)

    def d_ds(x):
        return torch.func.jvp(lambda s_: net(x, t, s_), (s,), (torch.ones_like(s),))[1]

    assert d_ds(x).abs().max() > 1e-3
    assert torch.autograd.gradcheck(d_ds, (x,))
