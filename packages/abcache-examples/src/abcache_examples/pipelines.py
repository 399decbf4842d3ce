"""Pipelines for the demo models: a class-conditional flow-matching DiT pipeline and diffusers' DDIMPipeline."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .models import (
    EPS_SCHEDULER_CONFIG,
    FLOW_SCHEDULER_CONFIG,
    NULL_CLASS,
    V_SCHEDULER_CONFIG,
    load_eps_model,
    load_flow_model,
)

OUTPUT_TYPES = ("np", "pt", "latent")
_CONTEXT_KWARGS = hasattr(importlib.import_module("diffusers.hooks.hooks"), "CacheContext")  # diffusers >= 0.41
CFG_MODES = ("separate", "batched")


@dataclass
class FlowMatchDiTPipelineOutput(BaseOutput):
    """Output of :class:`FlowMatchDiTPipeline` (like ``ImagePipelineOutput``, but also holds tensors).

    Args:
        images: ``(N, H, W, C)`` numpy array in [0, 1] (``"np"``), ``(N, C, H, W)`` tensor in [0, 1] (``"pt"``) or
            the raw ``(N, C, H, W)`` sample in [-1, 1] (``"latent"``).
    """

    images: torch.Tensor | np.ndarray


class FlowMatchDiTPipeline(DiffusionPipeline):
    r"""Class-conditional rectified-flow sampling with a ``DiTTransformer2DModel`` and true classifier-free guidance.

    The transformer predicts the velocity ``v = noise - x0`` at ``timestep = sigma * 1000``; the scheduler
    (``FlowMatchEulerDiscreteScheduler(shift=3.0)``, a FLUX-like shifted grid) takes Euler steps
    ``x <- x + (sigma_next - sigma) * v``. With guidance, ``v = v_uncond + s * (v_cond - v_uncond)`` where the
    unconditional call uses the null class id 10. With ``cfg_mode="separate"`` the two calls run one after the
    other inside ``transformer.cache_context("cond")`` / ``("uncond")`` (as FluxPipeline's true CFG does), so a
    cache keeps one history per branch; ``"batched"`` runs them as one batch of ``2 N``.

    Args:
        transformer: the class-conditional ``DiTTransformer2DModel`` (``num_embeds_ada_norm`` classes).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
    """

    model_cpu_offload_seq = "transformer"  # type: ignore[assignment]  # diffusers types the default None

    def __init__(self, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _branch(self, name: str, step_index: int) -> contextlib.AbstractContextManager[None]:
        """``transformer.cache_context(name, ...)``; with diffusers >= 0.41 it also says where the loop is."""
        cache_context = getattr(self.transformer, "cache_context", None)
        if cache_context is None:
            return contextlib.nullcontext()
        if not _CONTEXT_KWARGS:
            return cast(contextlib.AbstractContextManager[None], cache_context(name))
        sigma = float(self.scheduler.sigmas[step_index])
        steps = len(self.scheduler.timesteps)
        return cast(
            contextlib.AbstractContextManager[None],
            cache_context(name, step_index=step_index, sigma=sigma, num_inference_steps=steps),
        )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        cfg_mode: str = "separate",
        return_dict: bool = True,
        sigmas: Sequence[float] | None = None,
    ) -> FlowMatchDiTPipelineOutput | tuple:
        r"""Generate one image per entry of ``class_labels`` (ids ``0 .. num_classes - 1``).

        Args:
            class_labels: requested classes, an int or a 1-D sequence / tensor.
            num_inference_steps: Euler steps on the shifted grid.
            guidance_scale: classifier-free guidance scale ``s``; ``1.0`` disables guidance (one call per step).
            generator: torch generator(s) for the initial noise.
            latents: initial noise ``(N, C, H, W)``; drawn with ``randn_tensor`` when ``None``.
            output_type: ``"np"`` (``(N, H, W, C)`` float array in [0, 1]), ``"pt"`` (``(N, C, H, W)`` tensor in
                [0, 1]) or ``"latent"`` (the raw ``(N, C, H, W)`` sample, data range [-1, 1], not clamped).
            cfg_mode: ``"separate"`` (cond and uncond calls in their own cache contexts) or ``"batched"``.
            return_dict: return a :class:`FlowMatchDiTPipelineOutput` (else a 1-tuple).
            sigmas: a custom decreasing sigma grid of ``num_inference_steps`` values (the scheduler shifts it and
                appends 0), passed to ``scheduler.set_timesteps``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        device = self._execution_device
        config = self.transformer.config
        num_classes = config.num_embeds_ada_norm
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be non-empty ids in 0..{num_classes - 1}, got {class_labels!r}")
        batch = labels.shape[0]
        dtype = self.transformer.dtype
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        if sigmas is not None and len(sigmas) != num_inference_steps:
            raise ValueError(f"sigmas must have num_inference_steps={num_inference_steps} values, got {len(sigmas)}")
        custom = {} if sigmas is None else {"sigmas": sigmas}  # DPM-Solver / UniPC take no sigmas
        self.scheduler.set_timesteps(num_inference_steps, device=device, **custom)
        do_cfg = guidance_scale != 1.0
        null = torch.full_like(labels, NULL_CLASS)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            timestep = t.to(dtype).expand(batch)  # sigma * 1000
            if do_cfg and cfg_mode == "batched":
                both = self.transformer(
                    torch.cat([latents, latents]),
                    timestep=torch.cat([timestep, timestep]),
                    class_labels=torch.cat([labels, null]),
                ).sample
                cond, uncond = both.chunk(2)
            else:
                with self._branch("cond", i):
                    cond = self.transformer(latents, timestep=timestep, class_labels=labels).sample
                if do_cfg:
                    with self._branch("uncond", i):
                        uncond = self.transformer(latents, timestep=timestep, class_labels=null).sample
            velocity = uncond + guidance_scale * (cond - uncond) if do_cfg else cond
            latents = self.scheduler.step(velocity, t, latents).prev_sample

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images: torch.Tensor | np.ndarray = latents
        else:
            images = (latents / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if not return_dict:
            return (images,)
        return FlowMatchDiTPipelineOutput(images=images)


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The flow model's FLUX-like shifted grid: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``."""
    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)


def flow_pipeline(transformer: torch.nn.Module) -> FlowMatchDiTPipeline:
    """A :class:`FlowMatchDiTPipeline` around ``transformer`` with :func:`flow_scheduler`, progress bar off."""
    pipe = FlowMatchDiTPipeline(transformer=transformer, scheduler=flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_pipeline(unet: torch.nn.Module, name: str = "eps") -> DDIMPipeline:
    """diffusers' ``DDIMPipeline`` around ``unet``, its DDIMScheduler from the DDPM training config, progress bar off.

    ``name`` is the zoo model: ``"eps"`` (epsilon prediction) or ``"v"`` (v-prediction).
    """
    config = V_SCHEDULER_CONFIG if name == "v" else EPS_SCHEDULER_CONFIG
    pipe = DDIMPipeline(unet=cast(UNet2DModel, unet), scheduler=DDIMScheduler.from_config(config))
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # diffusers' lazy typing
    return pipe


def make_flow_pipeline(weights: str | Path | None = None, name: str = "flow") -> FlowMatchDiTPipeline:
    """A :class:`FlowMatchDiTPipeline` with the shipped (or ``weights``-folder) flow model ``name``."""
    return flow_pipeline(load_flow_model(weights, name))


def make_ddim_pipeline(weights: str | Path | None = None, name: str = "eps") -> DDIMPipeline:
    """diffusers' ``DDIMPipeline`` with the shipped (or ``weights``-folder) UNet ``name`` (``"eps"`` or ``"v"``)."""
    return ddim_pipeline(load_eps_model(weights, name), name)
