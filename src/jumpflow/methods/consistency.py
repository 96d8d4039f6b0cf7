"""Discrete-time consistency training: iCT and ECT.

iCT: Song & Dhariwal 2024, "Improved Techniques for Training Consistency Models" (ICLR 2024, arXiv 2310.14189).
ECT: Geng, Pokle, Luo, Lin, Kolter 2024, "Consistency Models Made Easy" (arXiv 2406.14548).
Both refine consistency training (CT) of Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models"
(arXiv 2303.01469). METHODS.md A6.

CT learns the consistency function f(z_t, t) = the flow map from t to 0, by asking the student at a noisier time t to
agree with a stop-gradient copy of itself at a less noisy time r < t on the SAME (x, eps):

    L = E[ lambda(t, r) d( f_theta(z_t, t), sg f_theta(z_r, r) ) ],   z_t = (1 - t) x + t eps.       (CT loss)

z_r - z_t = -(t - r)(eps - x) is the PF-ODE step with the conditional velocity in place of the marginal one, so
the exact flow map is a fixed point of the target only in conditional expectation and up to O((t - r)^2) (tested);
CT needs no teacher because the boundary condition f(x, 0) = x anchors the chain.

Time convention. The papers use EDM's x_sigma = x + sigma eps. jumpflow's z_t = (1 - t) x + t eps has the same
signal-to-noise ratio when t = sigma / (1 + sigma), and then z_t = x_sigma / (1 + sigma) (METHODS.md §0). Every
noise level below is drawn in sigma units, with the paper's formulas (Karras grid, lognormal over sigma, ECT's
mapping r(t) and its 1 / (t - r) weight, all in sigma), and converted with `sigma_to_time` before touching the net.
f outputs data (t = 0, sigma = 0) in both conventions, so the distance d is the papers' unchanged.

Parameterisation (a choice, see `consistency_function`): f(z_t, t) = z_t - t * net(z_t, t, 0). The backbone output
is then MeanFlow's average velocity from t to 0 (the meaning every jumpflow backbone has for net(z, t, s)), and
f(x, 0) = x holds exactly for any network. In EDM units it reads f = c_skip x_sigma + c_out F with
c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma): like the papers' c_skip(sigma) = sigma_d^2 / (sigma^2 +
sigma_d^2), c_out ~ sigma near sigma = 0 and the skip fading as sigma grows, but without sigma_d (whose 0.5 is
CIFAR's pixel std, wrong for toys) and with the boundary at sigma = 0 rather than iCT's sigma_min = 0.002 (our
student at sigma_min is within 0.002 * |net| of the identity, not exactly it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..paths import expand_time, interpolate
from . import register
from .base import LossOutput, Method


PAPER_RUN_STEPS = 400_000  # both papers' CIFAR-10 run length: the curricula's length outside a Trainer
ECT_RUN_STAGES = 16  # ECT's code: a stage every 25k of 400k iterations


# --------------------------------------------------------------------------------------------------------------------
# Conversions and the consistency function
# --------------------------------------------------------------------------------------------------------------------
def sigma_to_time(sigma: Tensor) -> Tensor:
    """EDM noise level -> jumpflow time with the same SNR: t = sigma / (1 + sigma) (sigma = 0 -> t = 0)."""
    return sigma / (1 + sigma)


def time_to_sigma(t: Tensor) -> Tensor:
    """jumpflow time -> EDM noise level: sigma = t / (1 - t) (t = 1 -> inf)."""
    return t / (1 - t)


def consistency_function(net, z: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """f(z_t, t) = z_t - t * net(z_t, t, 0): the flow map from t to 0, with f(x, 0) = x for any net.

    net(z, t, 0) plays MeanFlow's average velocity u(z_t, 0, t) = (z_t - Phi_{t->0}(z_t)) / t, so the exact map is
    reached by net = (z - flow_map(z, t, 0)) / t. z: (B, *shape), t: (B,).
    """
    u = net(z, t, torch.zeros_like(t), labels)
    return z - expand_time(t, z) * u.to(z.dtype)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c, ||.||^2 summed over non-batch dims (iCT §3.3); c = 0 gives ||a - b||."""
    squared = (a - b).pow(2).flatten(1).sum(1)
    if c == 0:  # the plain norm; clamped so an exact 0 gets gradient 0, not sqrt'(0) = inf (-> NaN)
        return squared.clamp_min(1e-30).sqrt()
    return torch.sqrt(squared + c * c) - c


def _same_randomness(device: torch.device):
    """Forks torch's RNG on `device`: what runs inside draws exactly what the code after the block draws next."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def consistency_pair(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, noise: Tensor, t: Tensor,
                     r: Tensor) -> Tuple[Tensor, Tensor]:
    """(f(z_t, t) with its graph, sg f(z_r, r)) on one shared (x, eps): the CT pair, r < t.

    The teacher runs first under a forked RNG so the student then draws the same dropout mask (ECT restores the RNG
    state for this). Where r = 0 the target is x itself, by the boundary condition (ECT's "if r = 0, D_r = x").
    """
    z_t, z_r = interpolate(x, noise, t), interpolate(x, noise, r)
    with _same_randomness(x.device), torch.no_grad():
        target = f(z_r, r)
    prediction = f(z_t, t)
    return prediction, target.detach()


def sampling_times(steps: int, sigma_max: float, two_step_sigma: float) -> Tensor:
    """The `steps` jumpflow times f is evaluated at: the start sigma_max, then re-noising levels (decreasing).

    sigma_j = sigma_max (1 - j / steps)^rho for j = 0..steps-1, a Karras-style grid ending at 0, with
    rho = log2(sigma_max / two_step_sigma) so that 2 steps use the papers' intermediate sigma (0.821 -> t = 0.451);
    rho = 6.6 for the defaults, close to EDM's 7.
    """
    rho = math.log2(sigma_max / two_step_sigma)
    j = torch.arange(steps, dtype=torch.float64)
    return sigma_to_time(sigma_max * (1 - j / steps) ** rho)


# --------------------------------------------------------------------------------------------------------------------
# Shared algorithm
# --------------------------------------------------------------------------------------------------------------------
class ConsistencyTraining(Method):
    """CT with the student as its own stop-gradient teacher; subclasses draw the noise-level pairs and set c."""

    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net, config, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self.check_config()
        # Training iterations seen by `loss` in training mode: the curricula read it, and as a buffer it is saved in
        # and restored from checkpoints with the weights, so a resumed run continues its schedule.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    # --- hooks ----------------------------------------------------------------------------------------------
    def check_config(self) -> None:
        cfg = self.config
        if not 0 < cfg.two_step_sigma < cfg.sigma_max:
            raise JumpflowError(f"{self.name}: need 0 < two_step_sigma < sigma_max, got two_step_sigma="
                                f"{cfg.two_step_sigma}, sigma_max={cfg.sigma_max}")
        if not 0 <= cfg.class_dropout < 1:
            raise JumpflowError(f"{self.name}: class_dropout must be in [0, 1), got {cfg.class_dropout}")
        if cfg.log_sigma_std <= 0:
            raise JumpflowError(f"{self.name}: log_sigma_std must be positive, got {cfg.log_sigma_std}")

    def noise_levels(self, n: int, step: int) -> Tuple[Tensor, Tensor]:
        """(sigma_t, sigma_r), each (n,) float64 on the CPU, 0 <= sigma_r < sigma_t."""
        raise NotImplementedError

    def huber_c(self) -> float:
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        step = int(self.training_step)  # one host read per step
        sigma_t, sigma_r = self.noise_levels(x.shape[0], step)
        weight = (1.0 / (sigma_t - sigma_r)).to(x.device, x.dtype)  # lambda = 1 / (sigma_t - sigma_r), sigma units
        t = sigma_to_time(sigma_t).to(x.device, x.dtype)  # student time
        r = sigma_to_time(sigma_r).to(x.device, x.dtype)  # teacher time, r < t
        labels = self.drop_labels(labels, cfg.class_dropout)
        noise = torch.randn_like(x)

        def f(z, time):  # in x's dtype even under autocast (consistency_function casts the net's output)
            return consistency_function(self.net, z, time, labels)

        prediction, target = consistency_pair(f, x, noise, t, r)
        distance = pseudo_huber(prediction, target, self.huber_c())  # d(f_theta(z_t, t), sg f_theta(z_r, r))
        loss = (weight * distance).mean()  # CT loss
        if self.training:
            self.training_step += 1
        return LossOutput(loss, {"distance": distance.detach().mean(), "gap": (t - r).detach().mean()})

    # --- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None,
               times: Optional[Sequence[float]] = None) -> Tensor:
        """Multistep consistency sampling (CM Algorithm 1), `steps` network evaluations.

        Step 1 is the papers' f(sigma_max eps, sigma_max): in jumpflow units f(t_max eps, t_max), t_max = sigma_max /
        (1 + sigma_max) (= 0.988; z_{t_max} ~ t_max eps up to the (1 - t_max) x the papers drop too). Each later step
        re-noises the estimate to a lower time, z = (1 - t_j) x + t_j eps' (fresh noise from torch's global RNG), and
        maps it to 0 again. `times` overrides the schedule: `steps` strictly decreasing times in (0, 1], the first
        being where the noise starts (1 starts from the noise itself).
        """
        self.check_steps(steps)
        net = net if net is not None else self.net
        cfg = self.config
        if times is None:
            times = sampling_times(steps, cfg.sigma_max, cfg.two_step_sigma)
        else:
            times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
            if times.numel() != steps or not ((times > 0) & (times <= 1)).all() or (times.diff() >= 0).any():
                raise JumpflowError(f"times must be {steps} strictly decreasing values in (0, 1] (one per step), "
                                    f"got {times.tolist()}")
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        x = consistency_function(net, float(times[0]) * noise, ones * float(times[0]), labels)
        for t in times[1:].tolist():
            z = (1 - t) * x + t * torch.randn_like(x)
            x = consistency_function(net, z, ones * t, labels)
        return x

    def nfe(self, steps: int) -> int:
        return steps


# --------------------------------------------------------------------------------------------------------------------
# iCT
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ICTConfig:
    """iCT's defaults (CIFAR-10 recipe). METHODS.md marks the iCT values [recall]: not re-verified against the paper."""

    sigma_min: float = 0.002  # EDM noise range [recall]; t from 0.002 to 0.988
    sigma_max: float = 80.0
    rho: float = 7.0  # Karras discretisation sigma_i = (sigma_min^(1/rho) + i/(N-1) (...))^rho [recall]
    log_sigma_mean: float = -1.1  # lognormal noise schedule, P_mean [recall]
    log_sigma_std: float = 2.0  # P_std [recall]
    discretisation_start: int = 10  # s0: N(0) = 11 noise levels [recall]
    discretisation_end: int = 1280  # s1: N doubles up to 1281 levels [recall]
    # K, the length of the curriculum: the paper's is its whole run (CIFAR-10: 400k iterations), so 0 = the length of
    # the training run (Trainer.plan); outside a Trainer 0 means the paper's 400k.
    total_steps: int = 0
    huber_scale: float = 0.00054  # pseudo-Huber c = huber_scale * sqrt(data dimension) [recall]
    two_step_sigma: float = 0.821  # intermediate sigma of the 2-step sampler (t = 0.451) [recall]
    class_dropout: float = 0.0  # the paper trains without classifier-free guidance; > 0 trains the null label


@register
class ICT(ConsistencyTraining):
    """Improved consistency training: pseudo-Huber, lognormal noise levels, doubling discretisation, no EMA teacher."""

    name = "ict"
    paper = "Song & Dhariwal 2024, Improved Techniques for Training Consistency Models (arXiv 2310.14189)"
    Config = ICTConfig

    def check_config(self) -> None:
        super().check_config()
        cfg = self.config
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise JumpflowError(f"ict: need 0 < sigma_min < sigma_max, got {cfg.sigma_min}, {cfg.sigma_max}")
        if not 1 <= cfg.discretisation_start <= cfg.discretisation_end:
            raise JumpflowError(f"ict: need 1 <= discretisation_start <= discretisation_end, got "
                                f"{cfg.discretisation_start}, {cfg.discretisation_end}")
        if cfg.total_steps < 0 or cfg.rho <= 0 or cfg.huber_scale < 0:
            raise JumpflowError(f"ict: total_steps must be >= 0 (0 = the run's length), rho > 0 and huber_scale >= 0, "
                                f"got "
                                f"{cfg.total_steps}, {cfg.rho}, {cfg.huber_scale}")

    def discretisation(self, step: int) -> int:
        """Exponential curriculum: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
        cfg = self.config
        s0, s1 = cfg.discretisation_start, cfg.discretisation_end
        total = cfg.total_steps or self.planned_steps or PAPER_RUN_STEPS
        stage_length = max(1, total // (int(math.log2(s1 // s0)) + 1))  # K'
        return min(s0 * 2 ** (step // stage_length), s1) + 1

    def karras_sigmas(self, n: int) -> Tensor:
        """(n,) increasing sigma_1 = sigma_min < ... < sigma_n = sigma_max, float64."""
        cfg = self.config
        i = torch.arange(n, dtype=torch.float64) / (n - 1)
        lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
        return (lo + i * (hi - lo)) ** cfg.rho

    def interval_probabilities(self, sigmas: Tensor) -> Tensor:
        """iCT's noise schedule: p(i) proportional to erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std))
        - erf((log sigma_i - P_mean) / (sqrt 2 P_std)), the lognormal mass of each interval."""
        cfg = self.config
        cdf = torch.erf((sigmas.log() - cfg.log_sigma_mean) / (math.sqrt(2) * cfg.log_sigma_std))
        mass = cdf[1:] - cdf[:-1]
        return mass / mass.sum()

    def noise_levels(self, n: int, step: int) -> Tuple[Tensor, Tensor]:
        sigmas = self.karras_sigmas(self.discretisation(step))
        i = torch.multinomial(self.interval_probabilities(sigmas), n, replacement=True)
        return sigmas[i + 1], sigmas[i]  # student at sigma_{i+1}, teacher at sigma_i

    def huber_c(self) -> float:
        return self.config.huber_scale * math.sqrt(math.prod(self.shape))


# --------------------------------------------------------------------------------------------------------------------
# ECT
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ECTConfig:
    """ECT's defaults from its official code (CIFAR-10), per METHODS.md [code]; the sampler's 0.821 from its README.

    The paper's main setting tunes a pretrained EDM diffusion model; jumpflow trains the same objective from scratch
    (no pretrained teacher here). Stage 0's mapping sets r = 0 for small sigma, i.e. plain denoising there, which
    partly stands in for the pretraining. The stage length scales with the run (1/16 of it, the code's ratio), so a
    short run goes through every stage; whether that ratio suits from-scratch training is unverified.
    """

    log_sigma_mean: float = -1.1  # t ~ lognormal over sigma: log sigma ~ N(-1.1, 2.0^2) [code]
    log_sigma_std: float = 2.0
    gap_decay: float = 2.0  # q: the gap t - r shrinks by q each stage [code]
    gap_boost: float = 8.0  # k: small-sigma gaps are up to (1 + k) times larger [code]
    gap_boost_slope: float = 1.0  # b in sigmoid(-b sigma) [code]
    # Iterations per stage. The code's CIFAR-10 run doubles every 3.2M images = 25k iterations at batch 128, 1/16 of
    # its best 400k-iteration run [code]; 0 = the same 1/16 of this training run (Trainer.plan), 25k outside a Trainer.
    stage_steps: int = 0
    huber_c: float = 0.0  # c of the pseudo-Huber metric; 0 = the L2 norm [code]
    sigma_max: float = 80.0  # 1-step sampling starts at sigma_max [code]
    two_step_sigma: float = 0.821  # intermediate sigma of the 2-step sampler [code README]
    class_dropout: float = 0.0  # trained without classifier-free guidance; > 0 trains the null label


@register
class ECT(ConsistencyTraining):
    """Easy consistency tuning: continuous-time CT whose gap t - r shrinks stage by stage, weighted by 1 / (t - r)."""

    name = "ect"
    paper = "Geng et al. 2024, Consistency Models Made Easy (arXiv 2406.14548)"
    Config = ECTConfig

    def check_config(self) -> None:
        super().check_config()
        cfg = self.config
        if cfg.gap_decay <= 1 or cfg.gap_boost < 0 or cfg.stage_steps < 0 or cfg.huber_c < 0:
            raise JumpflowError(f"ect: need gap_decay > 1, gap_boost >= 0, stage_steps >= 0 and huber_c >= 0, got "
                                f"{cfg.gap_decay}, {cfg.gap_boost}, {cfg.stage_steps}, {cfg.huber_c}")

    def teacher_sigma(self, sigma_t: Tensor, step: int) -> Tensor:
        """ECT's mapping function r = t (1 - (1 + k sigmoid(-b t)) / q^(a + 1)), clamped at 0; stage a = step // d."""
        cfg = self.config
        stage = step // self.stage_length()
        shrink = (1 + cfg.gap_boost * torch.sigmoid(-cfg.gap_boost_slope * sigma_t)) / cfg.gap_decay ** (stage + 1)
        return (sigma_t * (1 - shrink)).clamp(min=0)

    def stage_length(self) -> int:
        if self.config.stage_steps:
            return self.config.stage_steps
        return max(1, (self.planned_steps or PAPER_RUN_STEPS) // ECT_RUN_STAGES)

    def noise_levels(self, n: int, step: int) -> Tuple[Tensor, Tensor]:
        cfg = self.config
        sigma_t = torch.exp(cfg.log_sigma_mean + cfg.log_sigma_std * torch.randn(n, dtype=torch.float64))
        return sigma_t, self.teacher_sigma(sigma_t, step)

    def huber_c(self) -> float:
        return self.config.huber_c
