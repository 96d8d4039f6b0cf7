"""Inductive Moment Matching (IMM): one-step generation by matching the moments of a flow map's pushforwards.

Zhou, Ermon, Song 2025, "Inductive Moment Matching" (ICML 2025, arXiv 2503.07565); METHODS.md A7. The official
repository (lumalabs/imm) has inference code only; the training recipe here follows METHODS.md and the paper, and the
values marked [recall] / [unverified] in IMMConfig could not be checked against released code.

Time convention. The paper writes x_t = alpha_t x + sigma_t eps with t = 0 data and t = 1 noise; its `fm` schedule
(alpha_t = 1 - t, sigma_t = t) is jumpflow's linear path exactly, so no conversion is needed. The paper's flow map
f(x_t, s, t) jumps from t down to s; its triples s < r < t map one to one onto jumpflow's times (t noisiest, s the
landing time, r in between), and in jumpflow's backbone signature net(z, t, s) the first time is where we start.

Algorithm (one training step), per group of M particles sharing one (s, r, t):
    t ~ U(t_min, t_max), s ~ U(t_min, t)                                     # time sampling [recall]
    r = max(s, eta^{-1}(eta(t) - (eta(t_max) - eta(t_min)) / 2^k))           # "constant decrement in eta" mapping
    z_t = (1 - t) x + t eps;  z_r = DDIM(z_t, x, t -> r)                     # same (x, eps) for both (DDIM interpolant)
    y_t = f_theta(z_t, t, s);  y_r = sg f_theta-(z_r, r, s)                  # student and stop-gradient target
    L = w(s, t) MMD^2_k({y_t^i}, {y_r^j})                                   # Laplace kernel, V-statistic
with eta(t) = sigma_t / alpha_t = t / (1 - t) the noise-to-signal ratio.

Parameterisation (the paper's `euler_fm` output map, with sigma_d = 1 because jumpflow's noise is N(0, I) and the
Trainer standardises the data): f(z_t, t, s) = z_t - (t - s) net(z_t, t, s). Then f(z, t, t) = z for any network
(the boundary condition holds by construction, not by training), net is MeanFlow's average velocity (so
net(z, t, t) is the instantaneous velocity, as every jumpflow backbone expects), and c_out(s, t) = -(t - s) sets the
kernel width. The paper also scales the input by c_in = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)); jumpflow's
backbones take z_t unscaled, like every other method here.

Class labels: every particle keeps its own label and the student and target of a particle share it, so a group compares
two samples of the same label mix (whether the paper groups particles by class was not checked). Sampling follows
jumpflow's contract, noise at t = 1 to data at t = 0, where the paper runs from T to epsilon; the network is trained on
[t_min, t_max], so the endpoints extrapolate by 0.006 (`times=[0.994, 0.006]` gives the paper's grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..paths import expand_time, interpolate, time_grid
from . import register
from .base import LossOutput, Method


# --- the pieces of the objective ------------------------------------------------------------------------------------
def flow_map(net: nn.Module, z: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """`euler_fm` output map f(z_t, t, s) = z_t - (t - s) net(z_t, t, s); f(z, t, t) = z by construction."""
    return z - expand_time(t - s, z) * net(z, t, s, labels).to(z.dtype)


def ddim_interpolant(z_t: Tensor, x: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """DDIM(x_t, x, t -> r) = (alpha_r - alpha_t sigma_r / sigma_t) x + (sigma_r / sigma_t) x_t (the paper's DDIM
    interpolant). On the linear path: (1 - r/t) x + (r/t) z_t, which is (1 - r) x + r eps for the same eps."""
    ratio = expand_time(r / t.clamp_min(torch.finfo(t.dtype).tiny), z_t)
    return (1 - ratio) * x + ratio * z_t


def noise_to_signal(t: Tensor) -> Tensor:
    """eta(t) = sigma_t / alpha_t = t / (1 - t) on the linear (`fm`) path."""
    return t / (1 - t)


def noise_to_signal_inverse(eta: Tensor) -> Tensor:
    return eta / (1 + eta)


def laplace_kernel(a: Tensor, b: Tensor, bandwidth: Tensor, eps: float) -> Tensor:
    """k(a, b) = exp(-max(||a - b||_2, eps) / bandwidth) for every pair in each group.

    a (G, M, D), b (G, N, D), bandwidth (G,) -> (G, M, N). Distances come from explicit differences (not the
    |a|^2 + |b|^2 - 2ab trick), so identical points give exactly eps and the gradient of the clamp is zero there.
    """
    squared = (a[:, :, None, :] - b[:, None, :, :]).pow(2).sum(-1)
    distance = squared.clamp_min(eps**2).sqrt()
    return torch.exp(-distance / bandwidth[:, None, None])


def group_mmd(student: Tensor, target: Tensor, bandwidth: Tensor, eps: float = 1e-8) -> Tensor:
    """Squared MMD between two particle sets per group, as the V-statistic (diagonal included) [recall]:

        MMD^2 = 1/M^2 sum_ij [k(y_i, y_j) + k(y'_i, y'_j) - k(y_i, y'_j) - k(y'_i, y_j)].

    student, target (G, M, ...) -> (G,). Zero for identical sets, whatever the kernel's clamp.
    """
    a, b = student.flatten(2), target.flatten(2)
    within = laplace_kernel(a, a, bandwidth, eps).mean((1, 2)) + laplace_kernel(b, b, bandwidth, eps).mean((1, 2))
    return within - 2 * laplace_kernel(a, b, bandwidth, eps).mean((1, 2))


# --- the method -----------------------------------------------------------------------------------------------------
@dataclass
class IMMConfig:
    group_size: int = 4  # M particles per group sharing one (s, r, t) [recall: METHODS.md "M = 4 typical"]
    t_min: float = 0.006  # epsilon: smallest training time [code: CIFAR-10 config]
    t_max: float = 0.994  # T: largest training time [code: CIFAR-10 config]
    decrement_power: int = 12  # k: r's step in eta is (eta_max - eta_min) / 2^k [recall, unverified]
    weight_bias: float = 2.0  # b in w(s, t) = 1/2 sigmoid(b - lambda_t) (-dlambda/dt) alpha_t^a / (alpha^2 + sigma^2)
    #                           [unverified: the form is from METHODS.md / the paper as recalled, b was not checked]
    weight_power: float = 1.0  # a in alpha_t^a: 1 or 2 [code README: ImageNet checkpoints with s embedding: a=1]
    target: str = "online"  # theta^-: "online" = stop-gradient of the student [recall], or "ema" = the EMA student
    kernel_eps: float = 1e-8  # the clamp in max(||x - y||, eps) [recall]
    class_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance [unverified]
    sampler: str = "pushforward"  # "pushforward" (z <- f(z, t_i, t_i+1)) or "restart" (jump to 0, re-noise)


@register
class IMM(Method):
    """Inductive Moment Matching: a two-time flow map trained by MMD between particle groups from t and from r."""

    name = "imm"
    paper = "Zhou, Ermon, Song 2025, Inductive Moment Matching (arXiv 2503.07565)"
    Config = IMMConfig
    default_sample_steps = 1
    bench_steps = (1, 2, 4)

    def __init__(self, net: nn.Module, config: IMMConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        cfg = config
        if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or cfg.group_size < 1:
            raise JumpflowError(f"imm: group_size must be a positive integer, got {cfg.group_size!r}")
        if not 0 <= cfg.t_min < cfg.t_max < 1:
            raise JumpflowError(f"imm: need 0 <= t_min < t_max < 1 (eta = t / (1 - t) must stay finite), "
                                f"got t_min={cfg.t_min}, t_max={cfg.t_max}")
        if isinstance(cfg.decrement_power, bool) or not isinstance(cfg.decrement_power, int) \
                or cfg.decrement_power < 0:
            raise JumpflowError(f"imm: decrement_power must be a non-negative integer, got {cfg.decrement_power!r}")
        if cfg.weight_power < 0:
            raise JumpflowError(f"imm: weight_power must be >= 0, got {cfg.weight_power}")
        if cfg.target not in ("online", "ema"):
            raise JumpflowError(f"imm: unknown target {cfg.target!r}; valid: online, ema")
        self._check_sampler(cfg.sampler)

    @staticmethod
    def _check_sampler(sampler: str) -> None:
        if sampler not in ("pushforward", "restart"):
            raise JumpflowError(f"imm: unknown sampler {sampler!r}; valid: pushforward, restart")

    # --- training ---------------------------------------------------------------------------------------------------
    def sample_time_triples(self, groups: int, device=None, dtype=torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, r, s) per group, t_min <= s <= r < t <= t_max, r from the constant-decrement-in-eta mapping."""
        cfg = self.config
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(groups, device=device, dtype=dtype)
        s = cfg.t_min + (t - cfg.t_min) * torch.rand(groups, device=device, dtype=dtype)
        eta_max, eta_min = cfg.t_max / (1 - cfg.t_max), cfg.t_min / (1 - cfg.t_min)
        decrement = (eta_max - eta_min) / 2**cfg.decrement_power
        r = noise_to_signal_inverse((noise_to_signal(t) - decrement).clamp_min(0))  # mapping function r(s, t)
        return t, torch.maximum(s, r), s

    def loss_weight(self, t: Tensor) -> Tensor:
        """w(s, t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2), lambda_t the
        log-SNR 2 log(alpha_t / sigma_t); on the linear path -dlambda_t/dt = 2 / (t (1 - t))."""
        cfg = self.config
        log_snr = 2 * (torch.log1p(-t) - torch.log(t))
        return (0.5 * torch.sigmoid(cfg.weight_bias - log_snr) * 2 / (t * (1 - t)) * (1 - t) ** cfg.weight_power
                / ((1 - t) ** 2 + t**2))

    def moment_matching_loss(self, x: Tensor, noise: Tensor, t: Tensor, r: Tensor, s: Tensor,
                             labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-group (weighted MMD^2, MMD^2) for given data, noise and one (t, r, s) per group of M particles.

        x, noise (G * M, ...); t, r, s (G,). The student pushes z_t to s with gradient; the target pushes z_r (built
        from the same x and eps) to s without.
        """
        m = self.config.group_size
        groups = x.shape[0] // m
        t_, r_, s_ = (v.repeat_interleave(m) for v in (t, r, s))  # (G,) -> (G * M,): one triple per group
        z_t = interpolate(x, noise, t_)
        z_r = ddim_interpolant(z_t, x, t_, r_)
        student = flow_map(self.net, z_t, t_, s_, labels)
        target_net = self.ema_net if self.config.target == "ema" else self.net
        with torch.no_grad():
            target = flow_map(target_net, z_r, r_, s_, labels)
        # Laplace kernel width 1 / w~(s, t) * D, w~ = 1 / |c_out(s, t)| = 1 / (t - s) for the euler_fm map.
        dim = x[0].numel()
        bandwidth = (t - s).clamp_min(torch.finfo(t.dtype).eps) * dim
        mmd = group_mmd(student.view(groups, m, -1), target.view(groups, m, -1), bandwidth, self.config.kernel_eps)
        return self.loss_weight(t) * mmd, mmd

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        m = self.config.group_size
        if x.shape[0] % m:
            raise JumpflowError(f"imm: the batch size ({x.shape[0]}) must be a multiple of group_size ({m}); "
                                f"change batch_size or group_size")
        groups = x.shape[0] // m
        noise = torch.randn_like(x)
        t, r, s = self.sample_time_triples(groups, x.device, torch.float32 if x.dtype != torch.float64 else x.dtype)
        labels = self.drop_labels(labels, self.config.class_dropout)
        weighted, mmd = self.moment_matching_loss(x, noise, t, r, s, labels)
        return LossOutput(weighted.mean(), {"mmd": mmd.detach().mean(), "gap": (t - r).mean()})

    # --- sampling ---------------------------------------------------------------------------------------------------
    def _jump(self, net, z: Tensor, t: float, s: float, labels: Optional[Tensor], guidance: Optional[float]) -> Tensor:
        ones = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        if guidance is None or labels is None or guidance == 1.0:
            return flow_map(net, z, ones * t, ones * s, labels)
        null = torch.full_like(labels, self.num_classes)  # classifier-free guidance on the affine output map
        both = net(torch.cat([z, z]), torch.cat([ones, ones]) * t, torch.cat([ones, ones]) * s,
                   torch.cat([labels, null])).to(z.dtype)
        cond, uncond = both.chunk(2)
        return z - (t - s) * (uncond + guidance * (cond - uncond))

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None,
               sampler: Optional[str] = None, times: Optional[Sequence[float]] = None,
               guidance: Optional[float] = None) -> Tensor:
        """Noise at t = 1 to data at t = 0 in `steps` jumps on the uniform grid (or `times`, decreasing).

        pushforward: z <- f(z, t_i, t_i+1). restart: x_hat = f(z, t_i, 0), then z = (1 - t_i+1) x_hat + t_i+1 eps'
        with fresh noise (the paper's restart sampler). Both take one network evaluation per step.
        """
        self.check_steps(steps)
        sampler = sampler or self.config.sampler
        self._check_sampler(sampler)
        net = net if net is not None else self.net
        grid = time_grid(steps).tolist() if times is None else [float(v) for v in times]
        decreasing = all(b <= a for a, b in zip(grid[:-1], grid[1:]))
        if len(grid) != steps + 1 or not decreasing or not 0 <= grid[-1] <= grid[0] <= 1:
            raise JumpflowError(f"imm: times must be {steps + 1} non-increasing values in [0, 1], got {list(times)}")
        z = noise
        for i, (t_now, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            if sampler == "pushforward" or i == steps - 1:
                z = self._jump(net, z, t_now, t_next, labels, guidance)
            else:
                x_hat = self._jump(net, z, t_now, grid[-1], labels, guidance)
                z = (1 - t_next) * x_hat + t_next * torch.randn_like(z)
        return z

    def nfe(self, steps: int) -> int:
        return steps


__all__ = ["IMM", "IMMConfig", "flow_map", "ddim_interpolant", "laplace_kernel", "group_mmd", "noise_to_signal",
           "noise_to_signal_inverse"]
