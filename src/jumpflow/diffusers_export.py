"""Use a jumpflow flow-map model from diffusers (an optional extra: `pip install 'jumpflow[diffusers]'`).

diffusers (0.39 and later) ships `FlowMapEulerDiscreteScheduler` (from AnyFlow, Gu et al. 2026): its
`step(u, t, z_t, r)` returns z_r = z_t - (sigma_t - sigma_r) u, the two-time jump of an average-velocity model. With
sigma = t on the linear path z_t = (1 - t) x + t eps this is exactly jumpflow's flow-map sampler
z_s = z_t - (t - s) u(z_t, t, s) (MeanFlow, Geng et al. 2025, eq. 1 and its k-step use), and with shift = 1 its grid
is jumpflow's uniform grid 1 -> 0. So an export is a standard diffusers pipeline folder:

  model_index.json   JumpflowPipeline, with its two components
  flow_map/          JumpflowFlowMapModel (ModelMixin + ConfigMixin): the jumpflow backbone; forward(z, t, r, labels)
                     is the average velocity u. Its config also carries the jumpflow export config (jumpflow.load reads
                     the folder too); the data scaler, when the run standardised its data, is two buffers
  scheduler/         FlowMapEulerDiscreteScheduler(shift=1.0)
  README.md          the model card

loaded with diffusers' own `JumpflowPipeline.from_pretrained(DIR)` and sampled with
`pipe(batch_size, num_inference_steps, generator, class_labels)`. Only methods whose sampler is that plain jump
export (checked on the method with a stand-in network): consistency models (re-noising), flow matching (velocity,
s = t), iMF (guidance inputs) and class-conditional TVM (guidance scale) are refused.

diffusers is imported only inside functions: the classes are built on first access (module __getattr__), so
diffusers' loader, which imports this module by name and reads the class from it, finds them.
"""

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from .errors import JumpflowError

DIFFUSERS_EXTRA = "pip install 'jumpflow[diffusers]'  (or: pip install 'diffusers>=0.39')"
CLASS_NAMES = ("JumpflowFlowMapModel", "JumpflowPipeline", "JumpflowPipelineOutput")
DIFFUSERS_BASES = ("ModelMixin", "SchedulerMixin", "DiffusionPipeline", "ConfigMixin")
_classes: Dict[str, Any] = {}


def require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise JumpflowError(f"the diffusers export needs the diffusers package: {DIFFUSERS_EXTRA}") from e
    if not hasattr(diffusers, "FlowMapEulerDiscreteScheduler"):
        raise JumpflowError(f"diffusers {diffusers.__version__} has no FlowMapEulerDiscreteScheduler (added in 0.39): "
                            f"pip install -U 'diffusers>=0.39'")
    return diffusers


def _times(value, n: int, like: Tensor) -> Tensor:
    """A scalar or (B,) time in [0, 1] (t = 1 noise, 0 data) as a (B,) tensor in `like`'s dtype and device."""
    value = torch.as_tensor(value, device=like.device)
    return value.to(like.dtype).reshape(-1).expand(n) if value.numel() == 1 else value.to(like.dtype).reshape(n)


def _build_classes() -> Dict[str, Any]:
    require_diffusers()
    from diffusers import ConfigMixin, DiffusionPipeline, FlowMapEulerDiscreteScheduler, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor

    from . import nets

    class JumpflowFlowMapModel(ModelMixin, ConfigMixin):
        """A jumpflow backbone as a diffusers model: forward(z_t, t, r, class_labels) = u(z_t, t, r), the average
        velocity from time t down to r (times in [0, 1], t = 1 noise), so z_r = z_t - (t - r) u."""

        @register_to_config
        def __init__(self, backbone: str = "mlp", sample_shape: Optional[List[int]] = None, num_classes: int = 0,
                     backbone_options: Optional[Dict[str, Any]] = None, standardized: bool = False,
                     max_steps: Optional[int] = None, power_of_two_steps: bool = False, method: str = "",
                     jumpflow: Optional[Dict[str, Any]] = None):
            super().__init__()
            shape = tuple(sample_shape or (2,))
            self.net = nets.build(backbone, shape, num_classes, **(backbone_options or {}))
            if standardized:  # the run trained on (x - mean) / std; samples are mapped back to data units
                self.register_buffer("data_mean", torch.zeros(shape))
                self.register_buffer("data_std", torch.ones(shape))

        def forward(self, sample: Tensor, timestep, r_timestep, class_labels: Optional[Tensor] = None) -> Tensor:
            n = sample.shape[0]
            return self.net(sample, _times(timestep, n, sample), _times(r_timestep, n, sample), class_labels)

        def decode(self, z: Tensor) -> Tensor:
            if not self.config.standardized:
                return z
            return z * self.data_std.to(z) + self.data_mean.to(z)

    @dataclasses.dataclass
    class JumpflowPipelineOutput(BaseOutput):
        """samples: a tensor (output_type "pt"), an array ("np") or a list of PIL images ("pil", images only)."""

        samples: Any

    class JumpflowPipeline(DiffusionPipeline):
        """Noise to data in `num_inference_steps` flow-map jumps of a jumpflow model on the scheduler's grid."""

        model_cpu_offload_seq = "flow_map"

        def __init__(self, flow_map: JumpflowFlowMapModel, scheduler: FlowMapEulerDiscreteScheduler):
            super().__init__()
            self.register_modules(flow_map=flow_map, scheduler=scheduler)

        def check_steps(self, steps: int) -> None:
            cfg = self.flow_map.config
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise JumpflowError(f"num_inference_steps must be a positive integer, got {steps!r}")
            if cfg.max_steps is not None and steps > cfg.max_steps:
                raise JumpflowError(f"{cfg.method} was trained for at most {cfg.max_steps} steps; got {steps}")
            if cfg.power_of_two_steps and steps & (steps - 1):
                raise JumpflowError(f"{cfg.method} samples with a power of two steps; got {steps}")

        def labels(self, class_labels, n: int, device) -> Optional[Tensor]:
            classes = self.flow_map.config.num_classes
            if class_labels is None:
                return None
            if not classes:
                raise JumpflowError("this model is unconditional; it takes no class_labels")
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1).expand(n)
            if labels.min() < 0 or labels.max() >= classes:
                raise JumpflowError(f"class_labels must be in [0, {classes - 1}], got {class_labels!r}")
            return labels

        @torch.no_grad()
        def __call__(self, batch_size: int = 1, num_inference_steps: int = 1,
                     generator: Optional[torch.Generator] = None, class_labels=None,
                     latents: Optional[Tensor] = None, output_type: str = "pt", return_dict: bool = True):
            self.check_steps(num_inference_steps)
            shape = (batch_size, *self.flow_map.config.sample_shape)
            device = self._execution_device
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            elif tuple(latents.shape[1:]) != shape[1:]:
                raise JumpflowError(f"latents have shape {tuple(latents.shape)}, expected (N, "
                                    f"{', '.join(map(str, shape[1:]))})")
            z = latents.to(device=device, dtype=torch.float32)
            labels = self.labels(class_labels, z.shape[0], device)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            sigmas = self.scheduler.sigmas  # t_0 = 1 > ... > t_k = 0: sigma is jumpflow's time on the linear path
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                u = self.flow_map(z, sigmas[i], sigmas[i + 1], class_labels=labels)  # average velocity t_i -> t_i+1
                z = self.scheduler.step(u, t, z).prev_sample  # z - (t_i - t_i+1) u
            samples = self.flow_map.decode(z).float().cpu()
            if output_type == "np":
                samples = samples.numpy()
            elif output_type == "pil":
                if samples.dim() != 4:
                    raise JumpflowError("output_type='pil' is for image models; this one makes vectors")
                samples = self.numpy_to_pil(((samples + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy())
            elif output_type != "pt":
                raise JumpflowError(f"output_type must be pt, np or pil, got {output_type!r}")
            self.maybe_free_model_hooks()
            return JumpflowPipelineOutput(samples=samples) if return_dict else (samples,)

    for cls in (JumpflowFlowMapModel, JumpflowPipeline, JumpflowPipelineOutput):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # importable by name, as diffusers' loader does
    return {"JumpflowFlowMapModel": JumpflowFlowMapModel, "JumpflowPipeline": JumpflowPipeline,
            "JumpflowPipelineOutput": JumpflowPipelineOutput}


def __getattr__(name: str):
    if name in CLASS_NAMES:
        if not _classes:
            _classes.update(_build_classes())
        return _classes[name]
    if name in DIFFUSERS_BASES:  # diffusers' loader asks the component's module for these to pick a load method
        return getattr(require_diffusers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ProbeNet(torch.nn.Module):
    """A stand-in network for checking a sampler: a fixed map u = 0.3 z + 0.7 t - 1.3 s that depends on both times
    (so a sampler feeding s = t, or scaling u, gives other samples), recording the (t, s) of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z: Tensor, t: Tensor, s: Tensor, cond=None, *extra) -> Tensor:
        if extra and any(e is not None for e in extra):
            raise JumpflowError("the sampler feeds extra network inputs")
        self.calls.append((float(t.reshape(-1)[0]), float(s.reshape(-1)[0])))
        shape = (-1,) + (1,) * (z.dim() - 1)
        return 0.3 * z + 0.7 * t.reshape(shape).to(z) - 1.3 * s.reshape(shape).to(z)


def check_flow_map_sampler(model) -> None:
    """Refuse a method whose sampler is not the plain jump z_s = z_t - (t - s) u(z_t, t, s) on the uniform grid 1 -> 0,
    which is what the pipeline runs. Checked on the method itself, at 1, 2 and 4 steps (those it allows), with a
    stand-in network (`_ProbeNet`), so the answer does not depend on how far the weights have trained."""
    from . import methods

    limit, _ = model.step_rule()
    noise = torch.randn(2, *model.info.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = (torch.arange(2) % model.info.num_classes) if model.info.num_classes else None
    for k in [k for k in (1, 2, 4) if limit is None or k <= limit]:
        probe, reference = _ProbeNet(), _ProbeNet()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                theirs = model.method.sample(noise, k, labels=labels, net=probe)
            except (JumpflowError, TypeError, AttributeError, RuntimeError, ValueError):
                theirs = None  # a sampler that needs more than a (z, t, s, labels) network
            ours = model.method.flow_map_jumps(noise, k, reference, labels)
        if theirs is None or probe.calls != reference.calls or not torch.allclose(theirs, ours, atol=1e-9):
            plain = [n for n in methods.names() if methods.METHODS[n].sample is methods.Method.sample]
            raise JumpflowError(f"{model.config.method} does not sample by flow-map jumps z_s = z_t - (t - s) "
                                f"u(z_t, t, s) on a uniform grid (checked at {k} step{'s' if k > 1 else ''}), which is "
                                f"what the diffusers pipeline runs; methods that do: {', '.join(plain)} and others "
                                f"whose sampler reduces to it (shortcut models). Use the Hub format (--format hub)")


def build_pipeline(model):
    """The diffusers pipeline of a loaded jumpflow model, in memory (EMA weights copied, scaler as buffers)."""
    from diffusers import FlowMapEulerDiscreteScheduler

    from .build import backbone_options
    from .hub import export_config

    check_flow_map_sampler(model)
    limit, power_of_two = model.step_rule()
    flow_map = __getattr__("JumpflowFlowMapModel")(
        backbone=model.describe()["backbone"], sample_shape=list(model.info.shape),
        num_classes=model.info.num_classes, backbone_options=backbone_options(model.config),
        standardized=model.scaler.mean is not None, max_steps=limit, power_of_two_steps=power_of_two,
        method=model.config.method, jumpflow=export_config(model))
    flow_map.net.load_state_dict(model.net.state_dict())
    if model.scaler.mean is not None:
        flow_map.data_mean.copy_(model.scaler.mean)
        flow_map.data_std.copy_(model.scaler.std)
    scheduler = FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # shift 1: the uniform grid
    return __getattr__("JumpflowPipeline")(flow_map=flow_map.eval(), scheduler=scheduler)


def export_diffusers(model_or_path, out: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a diffusers pipeline folder (diffusers' save_pretrained, safetensors) and a model card to `out`,
    atomically; `model_or_path` is a LoadedModel or anything jumpflow.load reads."""
    from .api import LoadedModel, load
    from .hub import model_card, write_directory

    require_diffusers()
    model = model_or_path if isinstance(model_or_path, LoadedModel) else load(model_or_path)
    pipe = build_pipeline(model)
    card = model_card(pipe.flow_map.config.jumpflow, fmt="diffusers")

    def write(folder: Path) -> None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
        (folder / "README.md").write_text(card)

    return write_directory(out, write, overwrite)


def load_pipeline(directory: Union[str, Path], **kwargs):
    """diffusers' JumpflowPipeline.from_pretrained, with a clear error when diffusers is missing."""
    return __getattr__("JumpflowPipeline").from_pretrained(str(directory), **kwargs)


# The pipeline classes are module attributes too (built on first access by __getattr__ above).
__all__ = ["export_diffusers", "build_pipeline", "load_pipeline", "check_flow_map_sampler"]
