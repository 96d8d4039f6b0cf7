"""SlimFlow (Zhu, Liu, Liu 2024): Annealing Reflow's noise schedule, the two stages against an exact Gaussian teacher,
the flow-guided regulariser's fixed point, and both stages through `jumpflow distill` with a smaller student."""

import math

import pytest
import torch

import jumpflow
from jumpflow import methods, nets
from jumpflow.distill import Teacher
from jumpflow.distill.slimflow import annealed_noise, annealing_beta
from jumpflow.errors import JumpflowError
from tests.distill.helpers import train_on_pairs
from tests.gaussian import ExactGaussian
from tests.methods.toy_training import toy_net

MU, STD = torch.tensor([1.5, -1.0]), 0.3
EXACT = ExactGaussian(MU.double(), STD)
HEUN = {"teacher_solver": "heun", "teacher_steps": 50}  # pairs within 2e-3 of the exact map


def exact_teacher() -> Teacher:
    """The exact flow-matching velocity of N(MU, STD^2 I) data (a curved flow); its 1 -> 0 map is z -> MU + STD z."""
    return Teacher.from_velocity(lambda z, t, labels: EXACT.velocity(z.double(), t.double()).float(), (2,),
                                 teacher_id="exact-gaussian")


def straight_velocity(z, t, labels=None):
    """The exact 2-rectified flow of the Gaussian: straight lines z_1 -> MU + STD z_1, z_t = (1-t) MU + c(t) z_1 with
    c(t) = (1-t) STD + t, velocity z_1 - (MU + STD z_1) read back from z_t. Any Euler step count lands on the map."""
    t = t[:, None]
    z1 = (z - (1 - t) * MU) / ((1 - t) * STD + t)
    return (1 - STD) * z1 - MU


class OneStepMap(torch.nn.Module):
    """A student whose jump from t = 1 to s = 0 is exactly `target_map`: u(z, 1, 0) = z - target_map(z)."""

    def __init__(self, target_map, shift: float = 0.0):
        super().__init__()
        self.target_map, self.shift = target_map, shift
        self.unused = torch.nn.Parameter(torch.zeros(()))  # an optimiser needs something

    def forward(self, z, t, s, cond=None):
        return z - self.target_map(z) + self.shift


def exact_map(z):
    return MU + STD * z


def one_step_error(sample_fn, n=2000):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    return (sample_fn(noise) - exact_map(noise)).norm(dim=1).mean().item()


def train(method, teacher, tmp_path, steps, lr=3e-3):
    torch.manual_seed(0)
    return train_on_pairs(method, teacher, tmp_path, steps, lr)


# --- (a) the annealed noise ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_falls_from_one_to_zero_and_stays(schedule):
    betas = [annealing_beta(k, 100, schedule) for k in range(0, 250, 5)]
    assert betas[0] == 1.0 and annealing_beta(100, 100, schedule) == 0.0 and betas[-1] == 0.0
    assert all(a >= b for a, b in zip(betas, betas[1:]))  # monotone
    assert annealing_beta(50, 100, "linear") == 0.5


def test_annealed_noise_is_independent_then_coupled_with_unit_variance():
    gen = torch.Generator().manual_seed(0)
    coupled, independent = torch.randn(200_000, 2, generator=gen), torch.randn(200_000, 2, generator=gen)
    assert torch.equal(annealed_noise(coupled, independent, 1.0), independent)  # start: independent noise
    assert torch.equal(annealed_noise(coupled, independent, 0.0), coupled)  # end: the teacher's noise
    for beta in (0.3, 0.6, 0.9):
        mixed = annealed_noise(coupled, independent, beta)
        assert abs(mixed.var().item() - 1.0) < 0.01, beta  # still N(0, I): sqrt(1 - b^2)^2 + b^2 = 1
        correlation = (mixed * coupled).mean().item()
        assert abs(correlation - math.sqrt(1 - beta ** 2)) < 0.01, beta
    with pytest.raises(JumpflowError, match="beta"):
        annealed_noise(coupled, independent, 1.5)


def test_the_methods_pairs_anneal_from_random_to_coupled_noise_deterministically_in_the_step(tmp_path):
    method = methods.get("slimflow", toy_net(), (2,), pairs=1000, pair_cache=str(tmp_path / "pairs"),
                         anneal_steps=100, **HEUN)
    method.attach_teacher(exact_teacher(), tmp_path)

    def batch_at(step, seed=1):
        method.training_step.fill_(step)
        torch.manual_seed(seed)
        return method.pair_batch(500, "cpu")

    noise, sample, _ = batch_at(0)  # independent noise: the teacher's sample is not its map of this noise
    assert (sample - exact_map(noise)).norm(dim=1).mean() > 0.2
    assert abs(noise.var().item() - 1.0) < 0.15
    noise, sample, _ = batch_at(100)  # annealed: exactly the teacher's pairs
    assert (sample - exact_map(noise)).norm(dim=1).max() < 2e-3
    a, b = batch_at(40), batch_at(40)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))  # the same step and RNG state: the same batch
    assert not torch.equal(batch_at(40)[0], batch_at(60)[0])

    method.training_step.zero_()
    for step in range(3):  # the loss reports beta(k) and counts its steps in training mode only
        assert method.loss(torch.zeros(8, 2), None).metrics["beta"].item() == pytest.approx(1 - step / 100)
    method.eval()
    method.loss(torch.zeros(8, 2), None)
    assert int(method.training_step) == 3


def test_the_default_anneal_length_is_three_eighths_of_the_run_as_in_the_paper():
    method = methods.get("slimflow", toy_net(), (2,))
    assert method.anneal_length() == 300_000  # outside a Trainer: the paper's 300k (of its 800k iterations)
    method.plan(800)
    assert method.anneal_length() == 300
    assert methods.get("slimflow", toy_net(), (2,), anneal_steps=7).anneal_length() == 7


# --- (b) both stages against the exact Gaussian teacher -------------------------------------------------------------
def test_annealing_reflow_then_distillation_learns_the_exact_one_step_map(tmp_path):
    small = lambda: nets.build("mlp", (2,), width=32, depth=2)  # noqa: E731  # a third of the toy backbone
    stage1 = methods.get("slimflow", small(), (2,), pairs=2048, pair_cache=str(tmp_path / "p1"),
                         anneal_steps=150, **HEUN)
    train(stage1, exact_teacher(), tmp_path, steps=400)
    assert stage1.beta() == 0.0
    reflow_error = one_step_error(lambda z: stage1.sample(z, 1))  # the 2-rectified flow is straight: 1 Euler step
    assert reflow_error < 0.06, reflow_error  # measured 0.024

    net = stage1.net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    two_rf = Teacher(lambda z, t, labels: net(z, t, t, labels), (2,), net=net, method="slimflow",
                     teacher_id="stage-1")
    stage2 = methods.get("slimflow_distill", small(), (2,), pairs=2048, pair_cache=str(tmp_path / "p2"),
                         teacher_steps=20)
    untrained = one_step_error(lambda z: stage2.sample(z, 1))  # the zero-output student: the identity map
    train(stage2, two_rf, tmp_path, steps=300)
    distilled = one_step_error(lambda z: stage2.sample(z, 1))
    assert untrained > 1.5 and distilled < 0.05, (untrained, distilled)  # measured 0.013
    with pytest.raises(JumpflowError, match="one step"):
        stage2.sample(torch.randn(4, 2), 2)


# --- (c) the flow-guided regulariser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("first_step", ["student", "teacher"])
def test_the_regulariser_is_zero_when_the_student_is_the_straight_teachers_map(first_step, tmp_path):
    straight = Teacher.from_velocity(straight_velocity, (2,), teacher_id="straight")
    for shift, zero in ((0.0, True), (0.1, False)):
        method = methods.get("slimflow_distill", OneStepMap(exact_map, shift), (2,), first_step=first_step)
        method.attach_teacher(straight, tmp_path)  # only the regulariser is used: no pairs needed
        torch.manual_seed(0)
        prediction, target = method.flow_guidance(torch.randn(512, 2), None)
        value = method.distance(prediction, target).mean().item()
        assert (value < 1e-10) == zero, (shift, value)


def test_with_the_teachers_first_step_the_target_is_its_two_step_output(tmp_path):
    """Eq. 12 as written: a student equal to the curved teacher's 2-step Euler map through t = 0.5 is a fixed point,
    though that map is not the exact one."""
    teacher = exact_teacher()
    two_step = lambda z: teacher.trajectory(z, times=[1.0, 0.5, 0.0])[-1]  # noqa: E731
    method = methods.get("slimflow_distill", OneStepMap(two_step), (2,), first_step="teacher",
                         guidance_t_min=0.5, guidance_t_max=0.5)
    method.attach_teacher(teacher, tmp_path)
    eps = torch.randn(512, 2)
    prediction, target = method.flow_guidance(eps, None)
    assert torch.allclose(target, two_step(eps), atol=1e-6)
    assert method.distance(prediction, target).mean().item() < 1e-10
    assert (target - exact_map(eps)).norm(dim=1).mean() > 0.05  # 2 steps of a curved flow are not its map


@pytest.mark.parametrize("name, options, match", [
    ("slimflow", {"anneal_schedule": "exp"}, "anneal_schedule"), ("slimflow", {"anneal_steps": -1}, "anneal_steps"),
    ("slimflow_distill", {"guidance_t_min": 0.9, "guidance_t_max": 0.1}, "guidance_t_min"),
    ("slimflow_distill", {"first_step": "both"}, "first_step"),
    ("slimflow_distill", {"guidance_weight": -1.0}, "guidance_weight")])
def test_bad_options_are_clear_errors(name, options, match):
    with pytest.raises(JumpflowError, match=match):
        methods.get(name, toy_net(), (2,), **options)


# --- (d) `jumpflow distill`, both stages, a student smaller than its teacher ----------------------------------------
def changes(tmp_path, **more):
    return {"steps": 20, "batch_size": 64, "progress": False, "sample_every": 0, "checkpoint_every": 10,
            "pairs": 300, "teacher_steps": 8, "pair_cache": str(tmp_path / "pairs"), **more}


def parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.net.state_dict().values(), b.net.state_dict().values()))


def test_both_stages_distil_into_a_smaller_student_and_resume_exactly(teacher_run, tmp_path):
    from jumpflow.train import Trainer

    small = {"backbone_options": {"width": 16, "depth": 1}, "anneal_steps": 16}  # annealing spans the cut at 15
    stage1 = jumpflow.api.distill(teacher_run, "slimflow", tmp_path / "s1", changes(tmp_path, **small))
    big = Teacher.from_checkpoint(teacher_run)
    two_rf = Teacher.from_checkpoint(tmp_path / "s1")  # the annealing-reflow model is a velocity teacher
    assert two_rf.method == "slimflow" and parameters(two_rf.net) < parameters(big.net) / 3
    assert two_rf.sample(torch.randn(16, 2), 4).shape == (16, 2)

    cfg = jumpflow.TrainConfig.load(tmp_path / "s1" / "config.yaml")
    jumpflow.api.train(cfg, tmp_path / "cut", stop_after=15)  # killed at step 15, after its step-10 checkpoint
    jumpflow.api.distill(None, None, tmp_path / "cut", {"progress": False}, resume=True)
    assert same_weights(jumpflow.load(stage1), jumpflow.load(tmp_path / "cut"))

    distil = changes(tmp_path / "d", guidance_t_min=0.2)
    cfg2 = jumpflow.api.distill_config(tmp_path / "s1", "slimflow_distill", distil)
    assert cfg2.backbone_options == {"width": 16, "depth": 1}  # stage 2 keeps the small backbone
    trainer = Trainer(cfg2, tmp_path / "start")  # and starts from the 2-rectified flow (the paper's Table 5 'init')
    assert all(torch.equal(p, q) for p, q in zip(trainer.method.net.parameters(), two_rf.net.parameters()))
    stage2 = jumpflow.api.distill(tmp_path / "s1", "slimflow_distill", tmp_path / "s2", distil)
    jumpflow.api.train(jumpflow.TrainConfig.load(tmp_path / "s2" / "config.yaml"), tmp_path / "cut2", stop_after=15)
    jumpflow.api.distill(None, None, tmp_path / "cut2", {"progress": False}, resume=True)
    student = jumpflow.load(stage2)
    assert same_weights(student, jumpflow.load(tmp_path / "cut2"))
    assert parameters(student.net) < parameters(big.net) / 3
    assert student.generate(8, steps=1, seed=0).shape == (8, 2)
    with pytest.raises(JumpflowError, match="as a teacher"):
        Teacher.from_checkpoint(tmp_path / "s2")  # a one-step map is not a velocity field
