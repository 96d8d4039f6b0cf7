"""The DiT backbone (Peebles & Xie 2023): the backbone contract of tests/nets/test_backbones.py, plus what is DiT's
own (patches, adaLN-Zero, in-context tokens, size presets) and one training step of the JVP methods through it."""

import pytest
import torch
import torch.nn.functional as F

from jumpflow import methods, nets
from jumpflow.errors import JumpflowError
from jumpflow.jvp import total_derivative
from jumpflow.methods.base import make_config
from jumpflow.nets.dit import DiT

torch.set_num_threads(1)  # CI and sibling jobs share two cores

TINY = {"size": "tiny"}  # hidden 32, depth 2, 2 attention heads, patch 2


def tiny(shape=(1, 8, 8), num_classes=0, **options):
    return nets.build("dit", shape, num_classes, **{**TINY, **options})


def inputs(shape, batch=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.8 + 0.2
    s = t * torch.rand(batch, generator=g, dtype=dtype)  # s <= t
    return x, t, s


def perturb_zero_init(net, seed=0, only=None):
    """Draw the zero-initialised parameters (adaLN-Zero modulations, output layer, zero biases) small and random, so
    every input reaches the output; `only` restricts it to the parameters whose name starts with that prefix."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any() and (only is None or name.startswith(only)):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return net


@pytest.mark.parametrize("shape,patch", [((1, 8, 8), 2), ((3, 8, 8), 4), ((3, 16, 16), 2), ((4, 16, 16), 4),
                                         ((2, 8, 12), 2), ((1, 6, 6), 1)])
@pytest.mark.parametrize("heads", [1, 2])
def test_output_shape(shape, patch, heads):
    net = perturb_zero_init(tiny(shape, patch_size=patch, heads=heads))
    x, t, s = inputs(shape, batch=2)
    out = net(x, t, s)
    assert out.shape == (2, heads * shape[0], *shape[1:]) and torch.isfinite(out).all()


def test_unpatchify_inverts_patchify_in_the_position_order():
    """Tokens are the patches in row-major order with features (row in patch, column in patch, channel): unpatchify
    of the image's own patches in that layout is the image (a wrong permute would scramble it)."""
    net = tiny((3, 8, 12), patch_size=2)
    x, _, _ = inputs((3, 8, 12), batch=2)
    p = 2
    tokens = F.unfold(x, p, stride=p)  # (B, C * p * p, N), N row-major like the conv's flatten
    tokens = tokens.reshape(2, 3, p, p, -1).permute(0, 4, 2, 3, 1).reshape(2, -1, p * p * 3)
    assert torch.equal(net.unpatchify(tokens), x)


def test_at_init_each_output_patch_depends_only_on_its_input_patch():
    """adaLN-Zero: with the gates at zero every block is the identity, so the net is patch-local until it trains.
    Giving only the output layer weights, a change inside one patch moves that output patch and no other."""
    torch.manual_seed(0)
    net = perturb_zero_init(tiny((1, 8, 8), patch_size=4), only="out.")
    x, t, s = inputs((1, 8, 8), batch=1)
    moved = x.clone()
    moved[0, 0, 5, 2] += 1.0  # patch (row 1, column 0)
    with torch.no_grad():
        change = (net(moved, t, s) - net(x, t, s)).abs()[0, 0]
    assert change[4:, :4].max() > 1e-4
    assert change[:4].max() == 0 and change[4:, 4:].max() == 0


@pytest.mark.parametrize("options", [{}, {"heads": 2, "extra_inputs": 3}, {"in_context_tokens": 2},
                                     {"in_context_tokens": 1, "adaln": False}, {"position_embedding": "learned"}])
def test_zero_at_init_then_nonzero_and_both_times_reach_output(options):
    torch.manual_seed(0)
    net = tiny(num_classes=3, **options)
    x, t, s = inputs((1, 8, 8))
    extra = torch.rand(3, 3) if options.get("extra_inputs") else None
    out = net(x, t, s, None, extra)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer, as DiT
    perturb_zero_init(net)
    with torch.no_grad():
        at_t = net(x, t, t, None, extra)  # s == t: instantaneous velocity, h = 0 exactly
        assert at_t.abs().max() > 0 and torch.isfinite(at_t).all()
        assert (at_t - net(x, t, torch.zeros_like(t), None, extra)).abs().max() > 1e-6  # the gap t - s reaches it
        assert (net(x, t * 0.5, s * 0.5, None, extra) - net(x, t, s, None, extra)).abs().max() > 1e-6  # so does t


def test_scalar_times_broadcast():
    net = perturb_zero_init(tiny())
    x, _, _ = inputs((1, 8, 8))
    with torch.no_grad():
        full = net(x, torch.full((3,), 0.7), torch.full((3,), 0.2))
        assert torch.allclose(net(x, torch.tensor(0.7), torch.tensor(0.2)), full)


@pytest.mark.parametrize("options", [{}, {"in_context_tokens": 2, "adaln": False}])
def test_class_labels_and_the_null_class(options):
    net = perturb_zero_init(tiny(num_classes=3, **options))
    x, t, s = inputs((1, 8, 8))
    with torch.no_grad():
        out = {c: net(x, t, s, torch.full((3,), c)) for c in range(4)}
        assert (out[0] - out[1]).abs().max() > 1e-6  # labels reach the output (through the tokens alone without adaLN)
        assert (out[3] - out[0]).abs().max() > 1e-6  # the null class is a class of its own
        assert torch.equal(net(x, t, s, None), out[3])  # None == all null (label num_classes)
        for bad in (-1, 4):
            with pytest.raises(ValueError, match=r"\[0, 3\]"):
                net(x, t, s, torch.tensor([0, bad, 1]))
        with pytest.raises(ValueError, match="integer"):
            net(x, t, s, torch.zeros(3))
    unconditional = tiny()
    unconditional(x, t, s, torch.zeros(3, dtype=torch.long))  # label dropout with num_classes=0 gives 0s
    with pytest.raises(ValueError):
        unconditional(x, t, s, torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("options", [{}, {"in_context_tokens": 2}])
def test_extra_inputs_and_heads(options):
    """As the UNet's (test_backbones.py): two predictions side by side, every extra scalar reaches the output and
    its embedder gets a gradient, a (1, k) row broadcasts."""
    torch.manual_seed(0)
    net = perturb_zero_init(tiny(num_classes=3, extra_inputs=3, heads=2, **options))
    x, t, s = inputs((1, 8, 8))
    labels = torch.tensor([0, 1, 3])
    extra = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.2, 0.7], [0.8, 0.4, 0.6]])
    out = net(x, t, s, labels, extra)
    assert out.shape == (3, 2, 8, 8)
    first, second = out.chunk(2, dim=1)
    assert (first - second).abs().max() > 1e-6  # separate output weights
    for i in range(3):
        moved = extra.clone()
        moved[:, i] += 0.3
        with torch.no_grad():
            assert (net(x, t, s, labels, moved) - out).abs().max() > 1e-6
    out.pow(2).sum().backward()
    for i in range(3):
        grads = [p.grad for p in net.cond.extra[i].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():
        row = torch.tensor([[0.5, 0.2, 0.7]])
        assert torch.allclose(net(x, t, s, None, row), net(x, t, s, None, row.expand(3, 3)))
    assert len(net.state_dict()) == len(tiny(num_classes=3, heads=2, **options).state_dict()) + 3 * 4


def test_extra_inputs_and_heads_errors():
    net = tiny(extra_inputs=2)
    x, t, s = inputs((1, 8, 8))
    with pytest.raises(JumpflowError, match=r"extra_inputs=2.*\(B, 2\)"):
        net(x, t, s)
    with pytest.raises(JumpflowError, match=r"shape \(3, 2\).*got \(3, 3\)"):
        net(x, t, s, None, torch.zeros(3, 3))
    with pytest.raises(JumpflowError, match="float"):
        net(x, t, s, None, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(JumpflowError, match="takes no extra inputs"):
        tiny()(x, t, s, None, torch.zeros(3, 2))
    for bad in ({"heads": 0}, {"heads": 1.5}, {"extra_inputs": -1}, {"extra_inputs": True}):
        with pytest.raises(JumpflowError, match=next(iter(bad))):
            tiny(**bad)


@pytest.mark.parametrize("shape,options,match", [
    ((1, 10, 10), {"patch_size": 4}, "divisible by 4; got 10x10"),
    ((3, 8, 12), {"size": "tiny/8"}, "divisible by 8; got 8x12"),
    ((1, 8, 8), {"size": "XL/4", "patch_size": 2}, "give it once"),
    ((1, 8, 8), {"size": "huge"}, "valid: tiny, cpu, S, B, L, XL"),
    ((1, 8, 8), {"hidden_size": 36, "attention_heads": 8}, "divisible by attention_heads"),
    ((1, 8, 8), {"hidden_size": 6, "attention_heads": 3}, "divisible by 4"),
    ((1, 8, 8), {"depth": 0}, "positive ints"),
    ((1, 8, 8), {"adaln": False}, "in_context_tokens >= 1"),
    ((1, 8, 8), {"in_context_tokens": -1}, "in_context_tokens"),
    ((1, 8, 8), {"position_embedding": "rope"}, "sincos, learned"),
    ((2,), {}, "takes images"),
])
def test_clear_errors(shape, options, match):
    with pytest.raises(JumpflowError, match=match):
        tiny(shape, **options)


def test_wrong_image_shape_at_call_and_vector_data_in_the_class():
    net = tiny((1, 8, 8))
    with pytest.raises(JumpflowError, match=r"built for images of shape \(1, 8, 8\)"):
        net(torch.zeros(2, 1, 16, 16), torch.ones(2), torch.ones(2))
    with pytest.raises(JumpflowError, match=r"\(C, H, W\)"):
        DiT((2,), size="tiny")
    with pytest.raises(JumpflowError, match="dit, mlp, unet"):
        nets.build("transformer", (1, 8, 8))


def test_position_embedding_fixed_or_learned():
    fixed, learned = tiny(), tiny(position_embedding="learned")
    assert "position" not in fixed.state_dict()  # rebuilt at construction, nothing to store
    assert "position" in dict(learned.named_parameters())
    assert torch.equal(fixed.position, learned.position.detach())  # learned starts from the sin-cos table
    table = fixed.position[0]  # (N, D): distinct positions get distinct embeddings
    assert torch.cdist(table, table).add(torch.eye(len(table))).min() > 0.1


def test_in_context_tokens_are_dropped_before_the_output():
    net = perturb_zero_init(tiny(num_classes=3, extra_inputs=3, in_context_tokens=2))
    assert net.context_position.shape == (2 + 1 + 3, 2, 32)  # t, t - s, label, 3 extras; 2 tokens each
    x, t, s = inputs((1, 8, 8))
    out = net(x, t, s, torch.tensor([0, 1, 2]), torch.rand(3, 3))
    assert out.shape == x.shape and torch.isfinite(out).all()


def jvp_case(options, dtype):
    torch.manual_seed(0)
    net = perturb_zero_init(tiny((2, 8, 8), num_classes=2, **options).to(dtype))
    x, t, s = inputs((2, 8, 8), batch=2, dtype=dtype)
    cond = torch.tensor([0, 2])
    extra = torch.tensor([[0.3, 0.1, 0.9]], dtype=dtype) if options.get("extra_inputs") else None

    def f(z, tt, ss):
        return net(z, tt, ss, cond, extra)

    return net, f, (x, t, s), (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s))


@pytest.mark.parametrize("options", [{}, {"extra_inputs": 3, "heads": 2, "in_context_tokens": 2}])
def test_jvp_matches_finite_difference_float64(options):
    """d/dt net(x + t v, t, s) by forward-mode AD through SDPA (jumpflow.jvp forces its math backend; a bare
    torch.func.jvp falls back to it) against a central difference; then backward through primal and tangent."""
    net, f, primals, tangents = jvp_case(options, torch.float64)
    out, tangent = total_derivative(f, primals, tangents)
    bare_out, bare_tangent = torch.func.jvp(f, primals, tangents)  # CPU's fused SDPA has no forward-AD rule
    eps = 1e-6
    with torch.no_grad():
        plus = f(*(p + eps * d for p, d in zip(primals, tangents)))
        minus = f(*(p - eps * d for p, d in zip(primals, tangents)))
        fd = (plus - minus) / (2 * eps)
        assert torch.allclose(out, f(*primals))
    assert tangent.abs().max() > 1e-3
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-7), (tangent - fd).abs().max()
    assert torch.allclose(bare_tangent, tangent) and torch.allclose(bare_out, out)
    (out.pow(2).sum() + tangent.pow(2).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_gradients_through_the_jvp_are_right():
    """TVM backpropagates through d/ds net(x, t, s): gradcheck that second-order path in float64."""
    torch.manual_seed(0)
    net = perturb_zero_init(tiny((1, 4, 4), depth=1).double())
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    t, s = torch.full((2,), 0.7, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64)

    def d_ds(x):
        return total_derivative(lambda s_: net(x, t, s_), (s,), (torch.ones_like(s),))[1]

    assert d_ds(x).abs().max() > 1e-4
    assert torch.autograd.gradcheck(d_ds, (x,))


def test_smooth_enough_for_the_finite_difference_fallback():
    _, f, primals, tangents = jvp_case({}, torch.float32)
    with torch.no_grad():
        _, exact = total_derivative(f, primals, tangents)
        _, fd = total_derivative(f, primals, tangents, mode="finite_difference")
    assert (exact - fd).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("options", [{}, {"in_context_tokens": 2}])
def test_bfloat16_autocast_forward(options):
    net = perturb_zero_init(tiny((3, 16, 16), num_classes=2, **options))
    x, t, s = inputs((3, 16, 16))
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(x, t, s, torch.tensor([0, 1, 2]))
    with torch.no_grad():
        reference = net(x, t, s, torch.tensor([0, 1, 2]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert (out - reference).norm() / reference.norm() < 0.05  # bf16 has ~3 significant digits


@pytest.mark.parametrize("method", ["meanflow", "imf", "sct", "tvm"])
def test_one_training_step_of_a_jvp_method_on_digit_shaped_images(method):
    """Each method asks for its backbone options (iMF: extra_inputs=3, heads=2); one class-conditional step on
    (1, 8, 8) images in [-1, 1] gives a finite loss, finite gradients that reach the net, and a finite sample."""
    torch.manual_seed(0)
    cls = methods.METHODS[method]
    requirements = cls.backbone_requirements(make_config(cls.Config, {}))
    net = nets.build("dit", (1, 8, 8), 10, size="tiny", **requirements)
    model = methods.get(method, net, (1, 8, 8), 10)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    labels = torch.arange(8) % 10
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    out = model.loss(x, labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    optimizer.step()
    with torch.no_grad():
        assert torch.isfinite(model.loss(x, labels).loss)


def test_train_api_with_the_dit_backbone(tmp_path):
    from jumpflow import api

    checkpoint = api.train({"method": "imf", "data": "digits", "class_conditional": True, "backbone": "dit",
                            "backbone_options": {"size": "tiny"}, "steps": 2, "batch_size": 16, "progress": False,
                            "sample_every": 0, "checkpoint_every": 0, "log_every": 1, "device": "cpu"},
                           tmp_path / "run")
    model = api.load(checkpoint, device="cpu")
    assert isinstance(model.net, DiT) and model.net.heads == 2 and model.net.extra_inputs == 3
    samples = model.generate(n=4, steps=1, seed=0, cls=3, guidance=2.0)
    assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()


# DiT paper's parameter counts (Peebles & Xie 2023; ImageNet 256x256 latents: 4x32x32, 1000 classes). Ours differ by
# a second time embedder (t and t - s, +~0.2%) and no learned-sigma channels; MeanFlow reports 131M/459M/676M.
PAPER_PARAMETERS = {"S/2": 33e6, "B/2": 130e6, "L/2": 458e6, "XL/2": 675e6}


@pytest.mark.parametrize("size", PAPER_PARAMETERS)
def test_parameter_counts_match_the_paper(size):
    with torch.device("meta"):  # no memory, no initialisation cost
        net = nets.build("dit", (4, 32, 32), 1000, size=size)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / PAPER_PARAMETERS[size] - 1) < 0.01, count
    assert net.patch_size == 2 and net.grid == (16, 16)


def test_small_images_get_a_cpu_sized_dit_unless_told_otherwise():
    from jumpflow import nets

    small = nets.build("dit", (1, 8, 8), num_classes=10)
    count = sum(p.numel() for p in small.parameters())
    assert 0.8e6 < count < 1.6e6, count  # about the digits UNet's 1.2M
    assert sum(p.numel() for p in nets.build("dit", (1, 8, 8), size="tiny").parameters()) < 0.2e6  # options win
