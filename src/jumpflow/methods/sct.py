"""sCT: continuous-time consistency training on the TrigFlow path.

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (ICLR 2025,
arXiv 2410.11081); METHODS.md A6 (sCM). No official code; NVlabs/FastGen's sCM was read for the details the paper
leaves open (the resolution-invariant tangent norm is an option here, not the default).

TrigFlow (paper §2): x_theta = cos(theta) x0 + sin(theta) z, z ~ N(0, sigma_d^2 I), theta in [0, pi/2] (0 data,
pi/2 noise). The consistency function is

    f(x_theta, theta) = cos(theta) x_theta - sin(theta) sigma_d F(x_theta / sigma_d, theta),   (sCM consistency fn)

so f(x, 0) = x for any network. Consistency asks df/dtheta = 0 along the probability-flow ODE; sCT replaces the
marginal dx/dtheta by the conditional one, cos(theta) z - sin(theta) x0, whose posterior mean it is. The training
step (the paper's algorithm box, sCT without a teacher):

    tau ~ N(P_mean, P_std^2),  theta = arctan(e^tau / sigma_d)                          # time sampling
    x_theta = cos(theta) x0 + sin(theta) z,  dx/dtheta = cos(theta) z - sin(theta) x0   # sCT tangent of x
    cos sin dF/dtheta = jvp(F_theta-, (x_theta, theta), (cos sin dx/dtheta, cos sin))   # JVP rearrangement
    g = -cos^2(theta) (sigma_d F_theta- - dx/dtheta) - r cos sin (x_theta + sigma_d dF/dtheta)   # = cos df/dtheta
    g <- g / (||g|| + c)                                                                # tangent normalisation
    L = w(theta) / (e^{w_phi(theta)} D) ||F_theta - F_theta- - g||^2 + w_phi(theta)    # adaptive weighting
with theta- = sg(theta) (the current weights, not the EMA), r = min(1, step / warmup) the tangent warm-up and
w(theta) = 1 / (sigma_d tan theta) the prior weight. L's gradient is -2 w e^{-w_phi} g / D: the student moves along
-g, and w_phi(theta) learns the log of the weighted loss at each angle (EDM2's uncertainty weighting; the paper writes
e^{w_phi} ... - w_phi, the same objective with w_phi's sign flipped).

Time convention. jumpflow's path z_t = (1 - t) x + t eps (t = 0 data, t = 1 noise) and TrigFlow have the same
noise-to-signal ratio when t / (1 - t) = sigma_d sin(theta) / cos(theta), i.e.

    tan(theta) = t / (sigma_d (1 - t)),    t = sigma_d sin(theta) / (cos(theta) + sigma_d sin(theta)),

and then, with z = sigma_d eps, x_theta = (cos(theta) + sigma_d sin(theta)) z_t (METHODS.md §0's SNR rule; tested).
(sigma_d tan(theta) is EDM's sigma, so the time sampler above is EDM's lognormal sigma.) The noise jumpflow hands to
`sample` is eps at t = 1, i.e. theta = pi/2 with x_{pi/2} = sigma_d eps. The data point (theta = 0, t = 0) is the same
in both. dtheta/dt and the marginal dx/dtheta convert by the chain rule (see `trigflow_velocity`).

Backbone. jumpflow's net(x, t, s, cond) gets x_theta / sigma_d (the paper's input scaling), the time
t_in = 2 theta / pi (the paper's c_noise(theta) = theta, rescaled to the backbone's [0, 1]) and s = 0: F is the
consistency function's output head, a jump to data. Its output is TrigFlow's F, not jumpflow's average velocity.

sigma_d is the data's std (the paper's 0.5 is CIFAR-10's): it sets the scale of the noise, of the network's input
x_theta / sigma_d and of F. By default jumpflow measures it on the first training batch (`sigma_data = 0`).
Measured on 8 gaussians (per-coordinate std 1.4; toy recipe, 1000 steps, 1 step): sigma_data=0.5 gives sliced
Wasserstein 0.15 with 57% of samples in the support (a ring bridging the modes), sigma_data=1.4 gives 0.09 (floor
0.09) and 88% -- both with a 200-step tangent warm-up; the paper's 10k-step warm-up leaves r = 0.1 after 1000 steps
(0.33, 48%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..errors import JumpflowError
from ..jvp import JVP_MODES, jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..nets.embeddings import TimeEmbedding
from ..paths import expand_time
from . import register
from .base import LossOutput, Method

HALF_PI = math.pi / 2
TANGENT_NORMS = ("l2", "rms")
PAPER_SIGMA_DATA = 0.5  # CIFAR-10's pixel std in [-1, 1]
PAPER_WARMUP_STEPS = 10_000  # the tangent warm-up


# --------------------------------------------------------------------------------------------------------------------
# TrigFlow <-> jumpflow
# --------------------------------------------------------------------------------------------------------------------
def time_to_angle(t: Tensor, sigma_data: float) -> Tensor:
    """jumpflow time -> TrigFlow angle with the same SNR: tan(theta) = t / (sigma_d (1 - t)) (t = 1 -> pi/2)."""
    return torch.atan2(t, sigma_data * (1 - t))


def angle_to_time(theta: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow angle -> jumpflow time: t = sigma_d sin(theta) / (cos(theta) + sigma_d sin(theta))."""
    return sigma_data * torch.sin(theta) / trigflow_scale(theta, sigma_data)


def trigflow_scale(theta: Tensor, sigma_data: float) -> Tensor:
    """x_theta = (cos(theta) + sigma_d sin(theta)) z_t for the same (x, eps), with z = sigma_d eps."""
    return torch.cos(theta) + sigma_data * torch.sin(theta)


def trigflow_velocity(z_t: Tensor, v: Tensor, theta: Tensor, sigma_data: float) -> Tensor:
    """dx_theta / dtheta from jumpflow's dz_t / dt = v at the same point (chain rule on x_theta = c(theta) z_t(theta)):
    c' z_t + c v dt/dtheta with c = cos + sigma_d sin, dt/dtheta = sigma_d / c^2. With v = eps - x it is sCT's
    conditional cos(theta) z - sin(theta) x0; with the marginal velocity it is the PF-ODE's sigma_d F*(x / sigma_d)."""
    c = trigflow_scale(theta, sigma_data)
    dc = sigma_data * torch.cos(theta) - torch.sin(theta)
    return expand_time(dc, z_t) * z_t + expand_time(sigma_data / c, v) * v


def network_time(theta: Tensor) -> Tensor:
    """The backbone's time input t_in = 2 theta / pi: the paper's c_noise(theta) = theta mapped onto [0, 1]."""
    return theta / HALF_PI


# --------------------------------------------------------------------------------------------------------------------
# The consistency function and the tangent
# --------------------------------------------------------------------------------------------------------------------
def trigflow_network(net: nn.Module, sigma_data: float, labels: Optional[Tensor] = None) -> Callable:
    """Psi(x_theta, theta) = F(x_theta / sigma_d, c_noise(theta)) on jumpflow's backbone net(x, t_in, s = 0, cond)."""

    def F(x: Tensor, theta: Tensor) -> Tensor:
        t_in = network_time(theta)
        return net(x / sigma_data, t_in, torch.zeros_like(t_in), labels).to(x.dtype)

    return F


def consistency_function(net: nn.Module, x: Tensor, theta: Tensor, sigma_data: float,
                         labels: Optional[Tensor] = None) -> Tensor:
    """f(x_theta, theta) = cos(theta) x_theta - sin(theta) sigma_d F(x_theta / sigma_d, theta): the jump to data.
    x: (B, *shape), theta: (B,). f(x, 0) = x exactly, for any network."""
    F = trigflow_network(net, sigma_data, labels)(x, theta)
    return expand_time(torch.cos(theta), x) * x - expand_time(torch.sin(theta) * sigma_data, x) * F


def consistency_tangent(F: Callable, x: Tensor, theta: Tensor, dx_dtheta: Tensor, sigma_data: float,
                        warmup_ratio=1.0, jvp_mode: str = "exact") -> Tuple[Tensor, Tensor]:
    """(F(x, theta) with its graph, the tangent g = cos(theta) df/dtheta, unnormalised and detached).

    One dual forward gives F (whose graph the loss backpropagates) and cos sin dF/dtheta along the JVP-rearranged
    tangents (cos sin dx/dtheta, cos sin), so nothing is divided by cos(theta) near pi/2. With r = 1 and the marginal
    dx/dtheta, g = cos(theta) df/dtheta vanishes exactly when f is the true consistency function (tested).
    """
    cos, sin = torch.cos(theta), torch.sin(theta)
    cos_sin = cos * sin
    out, jvp = total_derivative(F, (x, theta), (expand_time(cos_sin, x) * dx_dtheta, cos_sin), mode=jvp_mode)
    F_minus, jvp = out.detach(), jvp.detach()  # F_theta-: the current weights under stop-gradient
    g = -expand_time(cos * cos, x) * (sigma_data * F_minus - dx_dtheta)
    g = g - warmup_ratio * (expand_time(cos_sin, x) * x + sigma_data * jvp)
    return out, g


def normalise_tangent(g: Tensor, const: float, norm: str = "l2") -> Tensor:
    """g / (||g|| + c) per sample (paper); norm="rms" uses ||g|| / sqrt(D) (FastGen's resolution-invariant norm)."""
    size = g.flatten(1).norm(dim=1)
    if norm == "rms":
        size = size / math.sqrt(g[0].numel())
    return g / expand_time(size + const, g)


class AdaptiveWeight(nn.Module):
    """w_phi(theta): a small MLP on Fourier features of theta giving the per-angle log-variance of the loss.

    Starts at exactly 0 (zero output layer), i.e. uniform weighting, and is trained with the student by the same
    optimizer (it is in `trainable_parameters` and saved in checkpoints as part of the method)."""

    def __init__(self, hidden: int = 64, frequency_dim: int = 64):
        super().__init__()
        self.embedding = TimeEmbedding(hidden, frequency_dim)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, theta: Tensor) -> Tensor:  # (B,) -> (B,)
        return self.out(nnf.silu(self.embedding(network_time(theta)))).squeeze(-1)


def _assembly_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss assembly (FastGen's choice: tan and exp weights span orders of magnitude); MPS has none."""
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SCTConfig:
    """sCT's defaults: the paper's CIFAR-10 recipe. [paper] = METHODS.md A6 / the paper's text; [FastGen] = FastGen's
    sCM config (which cites the paper's App. G.2); [recall] = not re-verified against the paper; [choice] = ours."""

    # sigma_d, the data's std [paper]; 0 = measured on the first training batch and saved with the weights (the
    # paper's 0.5 is that std for CIFAR-10 in [-1, 1]; 8 gaussians has 1.4). Untrained and unmeasured: 0.5.
    sigma_data: float = 0.0
    time_mean: float = -1.0  # P_mean of tau ~ N(P_mean, P_std^2), theta = arctan(e^tau / sigma_d) [FastGen]
    time_std: float = 1.4  # P_std [FastGen]
    # r = min(1, step / warmup); 0 = no warm-up. None = the paper's 10k, or a tenth of a run shorter than 100k steps
    # [choice: with 10k, a 1000-step run ends at r = 0.1 -- 1-step SW2 0.33 on 8 gaussians vs 0.15 with 200 steps].
    tangent_warmup_steps: Optional[int] = None
    tangent_norm_const: float = 0.1  # c in g / (||g|| + c) [paper]
    tangent_norm: str = "l2"  # "l2": ||g|| over all dims [paper]; "rms": ||g|| / sqrt(D) [FastGen option]
    prior_weighting: bool = True  # w(theta) = 1 / (sigma_d tan theta) [paper per METHODS.md; FastGen: 1 / sigma_t]
    adaptive_weighting: bool = True  # learned w_phi(theta) [paper]
    weight_hidden: int = 64  # width of w_phi's MLP [unverified: the paper says a small MLP]
    mid_angle: float = 1.1  # intermediate angle of the 2-step sampler [recall]
    class_dropout: float = 0.0  # sCT trains without guidance [unverified]; > 0 trains the null label
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"


@register
class SCT(Method):
    """sCT: continuous-time consistency training with TrigFlow, tangent normalisation and adaptive weighting."""

    name = "sct"
    paper = ("Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models "
             "(arXiv 2410.11081)")
    Config = SCTConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net: nn.Module, config: SCTConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self.check_config()
        self.adaptive_weight = AdaptiveWeight(config.weight_hidden) if config.adaptive_weighting else None
        # Training iterations seen by `loss` in training mode, for the tangent warm-up; a buffer, so checkpoints carry
        # it and a resumed run continues its warm-up.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("measured_sigma_data", torch.zeros(()))  # 0 until measured (sigma_data = 0)

    @property
    def sigma_d(self) -> float:
        """sigma_d: the configured value, else the measured one, else the paper's 0.5 (an untrained model)."""
        return self.config.sigma_data or float(self.measured_sigma_data) or PAPER_SIGMA_DATA

    def measure_sigma_data(self, x: Tensor) -> None:
        """With sigma_data = 0, record the std of the first training batch (once; resumed runs keep it)."""
        if not self.config.sigma_data and not float(self.measured_sigma_data):
            self.measured_sigma_data.fill_(float(x.float().std()))

    def check_config(self) -> None:
        cfg = self.config
        if not cfg.sigma_data >= 0:
            raise JumpflowError(f"sct: sigma_data must be >= 0 (the data's std; 0 = measure it), got {cfg.sigma_data}")
        if not cfg.time_std > 0:
            raise JumpflowError(f"sct: time_std must be positive, got {cfg.time_std}")
        warmup = cfg.tangent_warmup_steps
        if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
            raise JumpflowError(f"sct: tangent_warmup_steps must be an integer >= 0, got {cfg.tangent_warmup_steps!r}")
        if not cfg.tangent_norm_const > 0:
            raise JumpflowError(f"sct: tangent_norm_const must be positive, got {cfg.tangent_norm_const}")
        if cfg.tangent_norm not in TANGENT_NORMS:
            raise JumpflowError(f"sct: unknown tangent_norm {cfg.tangent_norm!r}; valid: {', '.join(TANGENT_NORMS)}")
        if not isinstance(cfg.weight_hidden, int) or cfg.weight_hidden < 1:
            raise JumpflowError(f"sct: weight_hidden must be a positive integer, got {cfg.weight_hidden!r}")
        if not 0 < cfg.mid_angle < HALF_PI:
            raise JumpflowError(f"sct: mid_angle must lie in (0, pi/2), got {cfg.mid_angle}")
        if not 0 <= cfg.class_dropout < 1:
            raise JumpflowError(f"sct: class_dropout must be in [0, 1), got {cfg.class_dropout}")
        if cfg.jvp_mode not in JVP_MODES:
            raise JumpflowError(f"sct: unknown jvp_mode {cfg.jvp_mode!r}; valid: {', '.join(JVP_MODES)}")

    def trainable_parameters(self):
        extra = list(self.adaptive_weight.parameters()) if self.adaptive_weight is not None else []
        return list(self.net.parameters()) + extra

    # --- training ---------------------------------------------------------------------------------------------
    def sample_angles(self, n: int, device) -> Tuple[Tensor, Tensor]:
        """(theta, sigma): tau ~ N(P_mean, P_std^2), sigma = e^tau (EDM's noise level), theta = arctan(sigma / sigma_d),
        kept below pi/2 (METHODS.md's pitfall: a float32 arctan can round up to pi/2)."""
        cfg = self.config
        sigma = torch.exp(cfg.time_mean + cfg.time_std * torch.randn(n, device=device))
        theta = torch.atan2(sigma, torch.full_like(sigma, self.sigma_d)).clamp(max=HALF_PI - 1e-5)
        return theta, sigma

    def warmup_ratio(self) -> Tensor:
        """r = min(1, step / warmup) as a 0-d tensor on the counter's device (no host sync)."""
        steps = self.config.tangent_warmup_steps
        if steps is None:
            steps = min(PAPER_WARMUP_STEPS, (self.planned_steps or 10 * PAPER_WARMUP_STEPS) // 10)
        if steps == 0:
            return torch.ones((), device=self.training_step.device)
        return (self.training_step.float() / steps).clamp(max=1.0)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)  # also keeps every rank on one measured sigma_d
        if self.training:
            self.measure_sigma_data(x)
        sigma_d = self.sigma_d
        x0 = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        theta, sigma = self.sample_angles(x0.shape[0], x0.device)
        theta, sigma = theta.to(x0.dtype), sigma.to(x0.dtype)
        z = sigma_d * torch.randn_like(x0)  # z ~ N(0, sigma_d^2 I)
        cos, sin = expand_time(torch.cos(theta), x0), expand_time(torch.sin(theta), x0)
        x_theta = cos * x0 + sin * z  # TrigFlow path
        dx_dtheta = cos * z - sin * x0  # sCT: the conditional velocity
        labels = self.drop_labels(labels, cfg.class_dropout)
        ratio = self.warmup_ratio().to(x0.dtype)

        F = trigflow_network(self.net, sigma_d, labels)
        out, g = consistency_tangent(F, x_theta, theta, dx_dtheta, sigma_d, ratio, cfg.jvp_mode)

        # Loss assembly in float64 (FastGen): the weights span orders of magnitude.
        dtype = _assembly_dtype(x0.device)
        out, g = out.to(dtype), g.to(dtype)
        g_unit = normalise_tangent(g, cfg.tangent_norm_const, cfg.tangent_norm)
        mse = (out - out.detach() - g_unit).pow(2).flatten(1).mean(1)  # ||F - F- - g||^2 / D, per sample
        weight = 1.0 / sigma.to(dtype) if cfg.prior_weighting else torch.ones_like(mse)  # 1 / (sigma_d tan theta)
        if self.adaptive_weight is not None:
            log_var = self.adaptive_weight(theta).to(dtype)  # w_phi(theta)
            per_sample = weight * torch.exp(-log_var) * mse + log_var
        else:
            log_var = torch.zeros_like(mse)
            per_sample = weight * mse
        loss = per_sample.mean().float()
        if self.training:
            self.training_step += 1
        return LossOutput(loss, {"tangent_norm": g.flatten(1).norm(dim=1).mean().detach().float(),
                                 "log_var": log_var.mean().detach().float(), "warmup": ratio.detach().float()})

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """Exact forward-mode JVP vs a finite difference on this network at a few training points (on a copy whose
        zero-initialised parameters are re-drawn, so the check is not vacuous)."""
        self.measure_sigma_data(x)
        probe = nonvacuous_copy(self.net)
        x0 = x[:16].float()
        theta, _ = self.sample_angles(x0.shape[0], x0.device)
        z = self.sigma_d * torch.randn_like(x0)
        cos, sin = expand_time(torch.cos(theta), x0), expand_time(torch.sin(theta), x0)
        cos_sin = torch.cos(theta) * torch.sin(theta)
        F = trigflow_network(probe, self.sigma_d, labels[:16] if labels is not None else None)
        return jvp_report(probe, lambda x_, t_: F(x_, t_).float(), (cos * x0 + sin * z, theta),
                          (expand_time(cos_sin, x0) * (cos * z - sin * x0), cos_sin))

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling_angles(self, steps: int) -> Tensor:
        """The `steps` angles f is evaluated at: pi/2 (the noise), then the re-noising angles, decreasing.

        theta_j = (pi/2) (1 - j / steps)^rho, j = 0..steps-1, with rho = log2((pi/2) / mid_angle) so that 2 steps use
        the paper's intermediate angle (1.1 -> rho = 0.51); mid_angle = pi/4 gives a grid uniform in theta.
        """
        rho = math.log2(HALF_PI / self.config.mid_angle)
        j = torch.arange(steps, dtype=torch.float64)
        return HALF_PI * (1 - j / steps) ** rho

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None,
               angles: Optional[Sequence[float]] = None) -> Tensor:
        """Multistep consistency sampling (CM Algorithm 1 on TrigFlow), `steps` network evaluations.

        1 step: x0 = f(sigma_d eps, pi/2) = -sigma_d F(eps, pi/2). Each later step re-noises the estimate to a lower
        angle, x_theta = cos(theta) x0 + sin(theta) sigma_d eps' (fresh noise from torch's global RNG), and maps it to
        data again. `angles` overrides the schedule: `steps` strictly decreasing angles in (0, pi/2]; a first angle
        below pi/2 starts from sin(theta_0) sigma_d eps (the data term dropped, as consistency models do).
        """
        self.check_steps(steps)
        net = net if net is not None else self.net
        sigma_d = self.sigma_d
        if angles is None:
            angles = self.sampling_angles(steps)
        else:
            angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
            if angles.numel() != steps or not ((angles > 0) & (angles <= HALF_PI)).all() or (angles.diff() >= 0).any():
                raise JumpflowError(f"angles must be {steps} strictly decreasing values in (0, pi/2] (one per step), "
                                    f"got {angles.tolist()}")
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        first = float(angles[0])
        x = consistency_function(net, math.sin(first) * sigma_d * noise, ones * first, sigma_d, labels)
        for theta in angles[1:].tolist():
            x_theta = math.cos(theta) * x + math.sin(theta) * sigma_d * torch.randn_like(x)
            x = consistency_function(net, x_theta, ones * theta, sigma_d, labels)
        return x

    def nfe(self, steps: int) -> int:
        return steps
