"""Backbone contract: net(x, t, s, cond=None) -> shaped like x, forward-mode AD safe, zero at init."""

import pytest
import torch

from jumpflow.errors import JumpflowError
from jumpflow.nets import BACKBONES, build, default_backbone

torch.set_num_threads(1)  # CI and sibling jobs share two cores

# Small variants so the whole file runs in seconds; the architecture code paths are the same as the defaults.
SMALL = {"mlp": {"width": 32, "depth": 2}, "unet": {"channels": 16, "num_res_blocks": 1}}
CASES = [("mlp", (2,)), ("unet", (1, 8, 8))]


def small(name, shape, num_classes=0, **options):
    return build(name, shape, num_classes, **{**SMALL[name], **options})


def inputs(shape, batch=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.8 + 0.2
    s = t * torch.rand(batch, generator=g, dtype=dtype)  # s <= t
    return x, t, s


def randomise_output(net):
    """Give the zero-initialised output layer weights so every path reaches the output."""
    with torch.no_grad():
        for p in net.out.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


def one_step(net, shape):
    x, t, s = inputs(shape)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = (net(x, t, s) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name,shape", [("mlp", (2,)), ("mlp", (7,)), ("unet", (1, 8, 8)), ("unet", (3, 8, 8)),
                                        ("unet", (1, 16, 16)), ("unet", (3, 16, 16)), ("unet", (3, 32, 32))])
def test_output_shape(name, shape):
    net = small(name, shape, channel_mult=(1, 2)) if shape[-1] == 32 else small(name, shape)
    x, t, s = inputs(shape, batch=2)
    assert net(x, t, s).shape == x.shape


def test_unet_default_attention_only_at_lowest_resolution_when_at_least_4():
    assert small("unet", (1, 8, 8)).attention_resolutions == ()  # 8 -> 4 -> 2: cheap, no attention
    assert small("unet", (1, 16, 16)).attention_resolutions == (4,)
    assert small("unet", (1, 8, 8), channel_mult=(1, 2), attention_resolutions=(8, 4)).attention_resolutions == (8, 4)


@pytest.mark.parametrize("name,shape", CASES)
def test_zero_at_init_then_nonzero_and_both_times_reach_output(name, shape):
    torch.manual_seed(0)
    net = small(name, shape)
    x, t, s = inputs(shape)
    assert torch.equal(net(x, t, s), torch.zeros_like(x))
    one_step(net, shape)
    with torch.no_grad():
        assert net(x, t, s).abs().max() > 0
        at_t = net(x, t, t)  # s == t: instantaneous velocity, h = 0 exactly
        at_0 = net(x, t, torch.zeros_like(t))
        assert torch.isfinite(at_t).all()
        assert (at_t - at_0).abs().max() > 1e-6  # the gap t - s reaches the output
        assert (net(x, t * 0.5, s * 0.5) - net(x, t, s)).abs().max() > 1e-6  # so does t


@pytest.mark.parametrize("name,shape", CASES)
def test_scalar_times_broadcast(name, shape):
    torch.manual_seed(0)
    net = small(name, shape)
    randomise_output(net)
    x, _, _ = inputs(shape)
    with torch.no_grad():
        full = net(x, torch.full((3,), 0.7), torch.full((3,), 0.2))
        assert torch.allclose(net(x, torch.tensor(0.7), torch.tensor(0.2)), full)


@pytest.mark.parametrize("name,shape", CASES)
def test_class_labels(name, shape):
    torch.manual_seed(0)
    net = small(name, shape, num_classes=3)
    randomise_output(net)
    x, t, s = inputs(shape)
    with torch.no_grad():
        out = {c: net(x, t, s, torch.full((3,), c)) for c in range(4)}
        assert (out[0] - out[1]).abs().max() > 1e-6
        assert torch.equal(net(x, t, s, None), out[3])  # None == all null (label num_classes)
        for bad in (-1, 4):
            with pytest.raises(ValueError, match=r"\[0, 3\]"):
                net(x, t, s, torch.tensor([0, bad, 1]))
        with pytest.raises(ValueError, match="integer"):
            net(x, t, s, torch.zeros(3))


def test_unconditional_net_accepts_only_the_null_label():
    net = small("mlp", (2,))
    x, t, s = inputs((2,))
    net(x, t, s, torch.zeros(3, dtype=torch.long))  # what label dropout with num_classes=0 produces
    with pytest.raises(ValueError):
        net(x, t, s, torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("name,shape,options", [
    ("mlp", (3,), {}),
    # Attention at both resolutions, 2 heads: the explicit softmax path must carry tangents.
    ("unet", (2, 8, 8), {"channel_mult": (1, 2), "attention_resolutions": (8, 4), "head_channels": 8}),
])
def test_jvp_matches_finite_difference_float64(name, shape, options):
    torch.manual_seed(0)
    net = small(name, shape, num_classes=2, **options).double()
    randomise_output(net)
    x, t, s = inputs(shape, batch=2, dtype=torch.float64)
    v = torch.randn_like(x)
    cond = torch.tensor([0, 2])

    def f(z, tt, ss):
        return net(z, tt, ss, cond)

    # d/dt net(x + t v, t, s): tangent (v, 1, 0).
    out, tangent = torch.func.jvp(f, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * v, t + eps, s) - f(x - eps * v, t - eps, s)) / (2 * eps)
        assert torch.allclose(out, f(x, t, s))
    assert tangent.abs().max() > 1e-3
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-7), (tangent - fd).abs().max()
    # Ordinary backward through both the primal and the tangent (methods backprop a loss built from them).
    (out.pow(2).sum() + tangent.pow(2).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,shape", CASES)
def test_smooth_enough_for_the_finite_difference_fallback(name, shape):
    """float32, step 1e-3 (jumpflow.jvp's defaults): the time features must be slow enough for a central difference
    to agree with the exact JVP to ~1e-2 -- with DDPM's t * 1000 scaling it is off by ~10%."""
    torch.manual_seed(0)
    net = small(name, shape, num_classes=2)
    randomise_output(net)
    x, t, s = inputs(shape)
    v, step = torch.randn_like(x), 1e-3
    with torch.no_grad():
        _, exact = torch.func.jvp(net, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        fd = (net(x + step * v, t + step, s) - net(x - step * v, t - step, s)) / (2 * step)
    assert (exact - fd).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("name,shape", [("mlp", (2, 2)), ("mlp", (1, 8, 8)), ("unet", (2,)), ("unet", (3, 8, 16)),
                                        ("unet", (3, 10, 10)), ("unet", (3, 4, 4)), ("unet", (1, 8))])
def test_shape_the_backbone_cannot_take(name, shape):
    with pytest.raises(JumpflowError):
        small(name, shape)


def test_class_constructor_validates_too():
    with pytest.raises(JumpflowError, match="divisible by 8"):
        BACKBONES["unet"]((1, 12, 12), channel_mult=(1, 2, 2, 2), channels=8)
    with pytest.raises(JumpflowError, match="not resolutions"):
        BACKBONES["unet"]((1, 8, 8), channels=8, attention_resolutions=(16,))
    with pytest.raises(JumpflowError, match=r"\(D,\)"):
        BACKBONES["mlp"]((1, 8, 8))


def test_build_errors_list_valid_choices():
    with pytest.raises(JumpflowError, match="mlp, unet"):
        build("transformer", (2,))
    with pytest.raises(JumpflowError, match=r"widht.*valid: .*width"):
        build("mlp", (2,), widht=64)
    with pytest.raises(JumpflowError, match="channels"):
        build("unet", (1, 8, 8), width=64)


def test_default_backbone():
    assert default_backbone((2,)) == "mlp"
    assert default_backbone((3, 32, 32)) == "unet"
    with pytest.raises(JumpflowError):
        default_backbone((4, 4))


@pytest.mark.parametrize("name,shape", CASES)
def test_deterministic(name, shape):
    x, t, s = inputs(shape)
    label = torch.tensor([0, 1, 2])
    params, outs = [], []
    for _ in range(2):
        torch.manual_seed(123)
        net = small(name, shape, num_classes=2)
        randomise_output(net)  # draws from the same seeded stream
        params.append(net.state_dict())
        with torch.no_grad():
            outs.append(net(x, t, s, label))
    assert all(torch.equal(a, b) for a, b in zip(params[0].values(), params[1].values()))
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().max() > 0


@pytest.mark.parametrize("name,shape", CASES + [("unet", (3, 16, 16))])
def test_bfloat16_autocast_forward(name, shape):
    torch.manual_seed(0)
    net = small(name, shape, num_classes=2)
    randomise_output(net)
    x, t, s = inputs(shape)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(x, t, s, torch.tensor([0, 1, 2]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0


# --- generic options: extra_inputs (more scalar conditioning) and heads (several predictions, one trunk) ----------

# State-dict keys and shapes of small(name, shape, num_classes=3), recorded before the options existed: nets built
# with the defaults must keep them, so old checkpoints load. The MLP's are listed; the UNet's 125 are hashed.
MLP_KEYS_BEFORE_OPTIONS = [
    ("cond.time.mlp.0.weight", (32, 128)), ("cond.time.mlp.0.bias", (32,)), ("cond.time.mlp.2.weight", (32, 32)),
    ("cond.time.mlp.2.bias", (32,)), ("cond.gap.mlp.0.weight", (32, 128)), ("cond.gap.mlp.0.bias", (32,)),
    ("cond.gap.mlp.2.weight", (32, 32)), ("cond.gap.mlp.2.bias", (32,)), ("cond.label.weight", (4, 32)),
    ("inp.weight", (32, 2)), ("inp.bias", (32,)), ("blocks.0.film.weight", (64, 32)), ("blocks.0.film.bias", (64,)),
    ("blocks.0.fc1.weight", (32, 32)), ("blocks.0.fc1.bias", (32,)), ("blocks.0.fc2.weight", (32, 32)),
    ("blocks.0.fc2.bias", (32,)), ("blocks.1.film.weight", (64, 32)), ("blocks.1.film.bias", (64,)),
    ("blocks.1.fc1.weight", (32, 32)), ("blocks.1.fc1.bias", (32,)), ("blocks.1.fc2.weight", (32, 32)),
    ("blocks.1.fc2.bias", (32,)), ("out.weight", (2, 32)), ("out.bias", (2,)),
]
UNET_KEYS_BEFORE_OPTIONS = (125, "bce38c6a84ee79197b84358d539247cbe8422f4f2ac48e6a09e5a9b857e5ec90")


def test_default_options_keep_the_state_dict_of_nets_built_before_they_existed():
    import hashlib

    mlp = small("mlp", (2,), num_classes=3)
    assert [(k, tuple(v.shape)) for k, v in mlp.state_dict().items()] == MLP_KEYS_BEFORE_OPTIONS
    unet = small("unet", (1, 8, 8), num_classes=3).state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in unet.items())
    assert (len(unet), hashlib.sha256(text.encode()).hexdigest()) == UNET_KEYS_BEFORE_OPTIONS
    # Spelled-out defaults are the same net, drawn from the same random stream, with the same outputs.
    for name, shape in CASES:
        nets = []
        for options in ({}, {"extra_inputs": 0, "heads": 1}):
            torch.manual_seed(0)
            nets.append(small(name, shape, num_classes=3, **options))
            randomise_output(nets[-1])
        x, t, s = inputs(shape)
        a, b = (n.state_dict() for n in nets)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad():
            assert torch.equal(nets[0](x, t, s), nets[1](x, t, s, None, None))


@pytest.mark.parametrize("name,shape", CASES)
def test_extra_inputs_and_heads(name, shape):
    torch.manual_seed(0)
    net = small(name, shape, num_classes=3, extra_inputs=3, heads=2)
    randomise_output(net)
    x, t, s = inputs(shape)
    extra = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.2, 0.7], [0.8, 0.4, 0.6]])
    out = net(x, t, s, torch.tensor([0, 1, 3]), extra)
    assert out.shape == (3, 2 * shape[0], *shape[1:])  # two predictions side by side along dim 1
    first, second = out.chunk(2, dim=1)
    assert (first - second).abs().max() > 1e-6  # separate output weights
    for i in range(3):  # every extra column reaches the output...
        moved = extra.clone()
        moved[:, i] += 0.3
        with torch.no_grad():
            assert (net(x, t, s, torch.tensor([0, 1, 3]), moved) - out).abs().max() > 1e-6
    out.pow(2).sum().backward()
    for i in range(3):  # ...and every extra embedder gets a gradient
        grads = [p.grad for p in net.cond.extra[i].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():  # a (1, k) row broadcasts over the batch
        row = torch.tensor([[0.5, 0.2, 0.7]])
        assert torch.allclose(net(x, t, s, None, row), net(x, t, s, None, row.expand(3, 3)))
    assert len(net.state_dict()) == len(small(name, shape, num_classes=3).state_dict()) + 3 * 4  # 3 embedders


@pytest.mark.parametrize("name,shape", CASES)
def test_extra_inputs_and_heads_errors(name, shape):
    net = small(name, shape, extra_inputs=2)
    x, t, s = inputs(shape)
    with pytest.raises(JumpflowError, match=r"extra_inputs=2.*\(B, 2\)"):
        net(x, t, s)
    with pytest.raises(JumpflowError, match=r"shape \(3, 2\).*got \(3, 3\)"):
        net(x, t, s, None, torch.zeros(3, 3))
    with pytest.raises(JumpflowError, match="float"):
        net(x, t, s, None, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(JumpflowError, match="takes no extra inputs"):
        small(name, shape)(x, t, s, None, torch.zeros(3, 2))
    for bad in ({"heads": 0}, {"heads": 1.5}, {"extra_inputs": -1}, {"extra_inputs": True}):
        with pytest.raises(JumpflowError, match=next(iter(bad))):
            small(name, shape, **bad)
