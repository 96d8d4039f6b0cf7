"""The frozen teacher: its ODE solvers against an exact flow map (Gaussian data, closed form), and a trained
checkpoint read back as a teacher that samples exactly as the loaded model does."""

from pathlib import Path

import numpy as np
import pytest
import torch

import jumpflow
from jumpflow import TrainConfig
from jumpflow.distill import Teacher
from jumpflow.errors import JumpflowError
from tests.gaussian import ExactGaussian

GAUSSIAN = ExactGaussian([1.0, -2.0], 0.5)  # x ~ N(mu, 0.25 I): v and the flow map in closed form


def exact_teacher(counter=None, **options) -> Teacher:
    def velocity(z, t, labels):
        if counter is not None:
            counter.append(z.shape[0])
        return GAUSSIAN.velocity(z, t).to(z.dtype)

    return Teacher.from_velocity(velocity, (2,), **options)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def flow_map(z, t: float, s: float):
    ones = torch.ones(z.shape[0], dtype=z.dtype)
    return GAUSSIAN.flow_map(z, t * ones, s * ones)


def error(teacher, noise, steps, solver):
    return (teacher.sample(noise, steps, solver=solver) - flow_map(noise, 1.0, 0.0)).norm(dim=1).mean().item()


# --- solvers on the exact field ---------------------------------------------------------------------------------------
def test_euler_and_heun_reach_the_exact_flow_map_with_their_orders(noise):
    teacher = exact_teacher()
    assert error(teacher, noise, 200, "euler") < 5e-3
    assert error(teacher, noise, 20, "heun") < 1e-3
    # halving the step divides the error by 2 (Euler, 1st order) and by 4 (Heun, 2nd order)
    euler_ratio = error(teacher, noise, 20, "euler") / error(teacher, noise, 40, "euler")
    heun_ratio = error(teacher, noise, 20, "heun") / error(teacher, noise, 40, "heun")
    assert 1.8 < euler_ratio < 2.2
    assert 3.4 < heun_ratio < 4.6
    assert error(teacher, noise, 40, "heun") < error(teacher, noise, 40, "euler") / 50


def test_nfe_counts_the_velocity_calls(noise):
    calls = []
    teacher = exact_teacher(calls)
    for solver, per_step in (("euler", 1), ("heun", 2)):
        calls.clear()
        teacher.sample(noise, 7, solver=solver)
        assert len(calls) == teacher.nfe(7, solver) == 7 * per_step
    assert exact_teacher(solver="heun").nfe(3) == 6  # the teacher's default solver


def test_ode_steps_compose_into_the_sample_and_the_trajectory(noise):
    teacher = exact_teacher(solver="heun")
    path = teacher.trajectory(noise, 5)
    assert path.shape == (6, *noise.shape)
    assert torch.equal(path[0], noise) and torch.equal(path[-1], teacher.sample(noise, 5))
    z, grid = noise, torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    for i in range(5):  # one ode_step per grid interval, per-sample times
        z = teacher.ode_step(z, grid[i].expand(len(z)), grid[i + 1].expand(len(z)))
        assert torch.equal(z, path[i + 1])
    # explicit times (stopping short of the data): each state is close to the exact flow map from 1 to its time
    times = torch.linspace(1.0, 0.3, 36).tolist()
    states = teacher.trajectory(noise, times=times)
    assert states.shape == (36, *noise.shape)
    for state, s in zip(states, times):
        assert (state - flow_map(noise, 1.0, s)).norm(dim=1).max().item() < 2e-3


def test_one_ode_step_with_per_sample_times_matches_the_local_flow_map(noise):
    """A single Heun step of length h has local error O(h^3): tiny for h = 0.01, at different times per sample."""
    teacher = exact_teacher()
    t = torch.rand(len(noise), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    s = t - 0.01
    z_t = GAUSSIAN.flow_map(noise, torch.ones_like(t), t)  # on the exact trajectory of its noise
    exact = GAUSSIAN.flow_map(z_t, t, s)
    heun = teacher.ode_step(z_t, t, s, solver="heun")
    euler = teacher.ode_step(z_t, t, s, solver="euler")
    assert (heun - exact).abs().max().item() < 1e-5
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 20


def test_bad_solver_steps_times_and_labels_are_refused(noise):
    teacher = exact_teacher()
    with pytest.raises(JumpflowError, match="unknown solver 'rk4'"):
        teacher.sample(noise, 4, solver="rk4")
    with pytest.raises(JumpflowError, match="unknown solver"):
        Teacher.from_velocity(lambda z, t, y: z, (2,), solver="midpoint")
    with pytest.raises(JumpflowError, match="steps"):
        teacher.sample(noise, 0)
    with pytest.raises(JumpflowError, match="decreasing"):
        teacher.trajectory(noise, times=[0.2, 0.5])
    with pytest.raises(JumpflowError, match="unconditional"):
        teacher.sample(noise, 2, labels=torch.zeros(len(noise), dtype=torch.long))
    with pytest.raises(JumpflowError, match="shape"):
        teacher.sample(torch.zeros(4, 3), 2)


# --- a trained checkpoint as the teacher ------------------------------------------------------------------------------
def tiny_run(method: str, out: Path, steps: int, **config) -> Path:
    cfg = TrainConfig(method=method, data=str(out.parent / "blobs.npz"), steps=steps, batch_size=64, lr=2e-3,
                      warmup_steps=1, backbone_options={"width": 32, "depth": 2}, ema_decay=0.9, log_every=steps,
                      sample_every=0, checkpoint_every=0, progress=False, seed=0, **config)
    return jumpflow.train(cfg, out)


@pytest.fixture(scope="session")
def trained_teacher_run(tmp_path_factory) -> Path:
    """20 steps of class-conditional flow matching on 3 labelled blobs far from the origin (mean ~ (5, -3), so the
    run standardises the data and model space differs from data space): its run directory."""
    root = tmp_path_factory.mktemp("teacher")
    gen = np.random.default_rng(0)
    labels = gen.integers(0, 3, 600)
    x = np.array([[5.0, -3.0]]) + 3.0 * np.stack([np.cos(labels), np.sin(labels)], 1) + gen.normal(size=(600, 2))
    np.savez(root / "blobs.npz", x=x.astype(np.float32), y=labels)
    tiny_run("flow_matching", root / "fm", 20, class_conditional=True)
    return root / "fm"


def test_checkpoint_teacher_is_frozen(trained_teacher_run):
    teacher = Teacher.from_checkpoint(trained_teacher_run, device="cpu")
    params = list(teacher.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not teacher.net.training
    z = torch.randn(8, 2, requires_grad=True)
    v = teacher.velocity(z, torch.full((8,), 0.5), torch.zeros(8, dtype=torch.long))
    assert not v.requires_grad  # no graph: a student can never push gradients into the teacher
    with pytest.raises(RuntimeError):
        v.sum().backward()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_checkpoint_teacher_samples_exactly_like_the_loaded_model(trained_teacher_run, solver):
    teacher = Teacher.from_checkpoint(trained_teacher_run, device="cpu", solver=solver)
    model = jumpflow.load(trained_teacher_run, device="cpu")
    assert teacher.scaler.mean is not None  # model space is not data space here
    assert teacher.shape == model.info.shape and teacher.num_classes == 3 and teacher.info == model.info
    noise = model.noise(256, seed=3)
    labels = torch.full((256,), 2, dtype=torch.long)
    ours = teacher.sample(noise, 6, labels)
    theirs = model.generate(noise=noise, steps=6, cls=2, solver=solver)  # data space
    assert torch.equal(teacher.scaler.decode(ours), theirs)  # the same arithmetic, bit for bit
    torch.testing.assert_close(ours, teacher.scaler.encode(theirs), rtol=0, atol=1e-6)
    # and the labels reach the net: another class gives other samples
    assert not torch.allclose(ours, teacher.sample(noise, 6, torch.zeros_like(labels)))


def test_checkpoint_teacher_records_what_it_is(trained_teacher_run):
    run_teacher = Teacher.from_checkpoint(trained_teacher_run, device="cpu")
    file_teacher = Teacher.from_checkpoint(run_teacher.checkpoint, device="cpu")
    assert run_teacher.method == "flow_matching" and run_teacher.step == 20
    assert run_teacher.checkpoint.name == "step_0000020.safetensors"
    assert run_teacher.id == file_teacher.id == f"sha256:{run_teacher.sha256}" and len(run_teacher.sha256) == 64
    with pytest.raises(JumpflowError, match="unknown solver"):
        Teacher.from_checkpoint(trained_teacher_run, device="cpu", solver="rk45")


def test_a_consistency_model_is_refused_as_a_teacher(trained_teacher_run):
    run = tiny_run("ect", trained_teacher_run.parent / "ect", 2)
    with pytest.raises(JumpflowError, match=r"'ect'.*flow_matching.*meanflow"):
        Teacher.from_checkpoint(run, device="cpu")


def labelled_teacher(**options) -> Teacher:
    """v(z, t, c) = z + c (c = 2 is the null label's index: the 'unconditional' field is z + 2)."""
    return Teacher.from_velocity(lambda z, t, labels: z + labels[:, None].to(z.dtype), (2,), num_classes=2,
                                 teacher_id="labelled", **options)


def test_a_guided_teacher_extrapolates_from_the_null_label_to_the_class():
    teacher, z = labelled_teacher(), torch.randn(6, 2)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    guided = teacher.guided(3.0)
    # v_null + w (v_c - v_null) = (z + 2) + 3 (c - 2)
    expected = z + 2 + 3 * (labels[:, None].float() - 2)
    assert torch.allclose(guided.velocity(z, 0.5, labels), expected)
    assert torch.allclose(teacher.velocity(z, 0.5, labels), z + labels[:, None].float())  # the original is unchanged
    assert guided.id == "labelled-cfg3" and teacher.id == "labelled"
    assert teacher.guided(1.0) is teacher  # w = 1 is the teacher itself
    with pytest.raises(JumpflowError, match="needs labels"):
        guided.velocity(z, 0.5, None)


@pytest.mark.parametrize("teacher, scale, match", [
    (exact_teacher(teacher_id="x"), 2.0, "unconditional"),
    (labelled_teacher(), -1.0, ">= 0"), (labelled_teacher(), float("nan"), ">= 0"), (labelled_teacher(), True, ">= 0"),
])
def test_guidance_a_teacher_cannot_take_is_a_clear_error(teacher, scale, match):
    with pytest.raises(JumpflowError, match=match):
        teacher.guided(scale)


def test_a_pair_student_with_teacher_guidance_trains_on_the_guided_pairs_in_their_own_cache(tmp_path):
    from jumpflow import methods
    from tests.methods.toy_training import toy_net

    def attached(**options):
        method = methods.get("reflow", toy_net(), (2,), num_classes=2, pairs=64, teacher_steps=4,
                             init_from_teacher=False, **options)
        method.attach_teacher(labelled_teacher(), tmp_path)
        return method

    plain = attached(pair_cache=str(tmp_path / "plain"))
    guided = attached(pair_cache=str(tmp_path / "guided"), teacher_guidance=3.0)
    (noise_p, sample_p, labels_p), (noise_g, sample_g, labels_g) = plain._pairs, guided._pairs
    assert torch.equal(noise_p, noise_g) and torch.equal(labels_p, labels_g)  # same seed: same noise and classes
    expected = labelled_teacher().guided(3.0).sample(noise_g, 4, labels_g)
    assert torch.allclose(sample_g, expected) and not torch.allclose(sample_g, sample_p)
    assert guided.teacher.id == "labelled-cfg3"
    with pytest.raises(JumpflowError, match="other settings: teacher_id"):  # one cache, one teacher
        attached(pair_cache=str(tmp_path / "plain"), teacher_guidance=3.0)
    with pytest.raises(JumpflowError, match="teacher_guidance"):
        methods.get("reflow", toy_net(), (2,), teacher_guidance=-2.0)
