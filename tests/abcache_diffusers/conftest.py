"""Tiny random-init diffusers pipelines for the abcache-diffusers tests; nothing is downloaded.

Text encoders and tokenizers are left out (None): the pipelines take precomputed prompt embeddings.
Each builder returns (pipe, call_kwargs); call ``pipe(**call_kwargs, generator=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

STEPS = 12


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux_vae(latent_channels: int) -> Any:
    """A one-block AutoencoderKL with FLUX / SD3 latent scaling (spatial factor 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_flux() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _flux_vae(latent_channels=1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_embeds(1, 1, 8, 32),
        pooled_prompt_embeds=_embeds(2, 1, 32),
        negative_prompt_embeds=_embeds(3, 1, 8, 32),
        negative_pooled_prompt_embeds=_embeds(4, 1, 32),
        true_cfg_scale=2.0,
        height=16,
        width=16,
        num_inference_steps=STEPS,
        output_type="latent",
    )
    return pipe, kwargs


def build_sd3() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    vae = _flux_vae(latent_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    kwargs = dict(
        prompt_embeds=_embeds(1, 1, 8, 32),
        pooled_prompt_embeds=_embeds(2, 1, 32),
        negative_prompt_embeds=_embeds(3, 1, 8, 32),
        negative_pooled_prompt_embeds=_embeds(4, 1, 32),
        guidance_scale=3.0,
        height=8,
        width=8,
        num_inference_steps=STEPS,
        output_type="latent",
    )
    return pipe, kwargs


def build_wan() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_embeds(1, 1, 8, 16),
        negative_prompt_embeds=_embeds(3, 1, 8, 16),
        guidance_scale=4.0,
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=STEPS,
        output_type="latent",
    )
    return pipe, kwargs


def build_ltx() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_embeds(1, 1, 8, 16),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        negative_prompt_embeds=_embeds(3, 1, 8, 16),
        negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        guidance_scale=3.0,
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=STEPS,
        output_type="latent",
    )
    return pipe, kwargs


def build_ddim() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    return pipe, dict(num_inference_steps=STEPS, eta=0.0, output_type="np")


def build_dit() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=4,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        norm_num_groups=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(
        sample_size=8,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
    )
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    return pipe, dict(class_labels=[1], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")


def _eval(builder: Callable[[], tuple[Any, dict[str, Any]]]) -> Callable[[], tuple[Any, dict[str, Any]]]:
    """Modules built from configs are in training mode (DiT drops class labels at random there): evaluate."""

    def build() -> tuple[Any, dict[str, Any]]:
        pipe, kwargs = builder()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe, kwargs

    return build


BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "flux": _eval(build_flux),
    "sd3": _eval(build_sd3),
    "wan": _eval(build_wan),
    "ltx": _eval(build_ltx),
    "ddim": _eval(build_ddim),
    "dit": _eval(build_dit),
}

# The cache context names each pipeline's denoiser calls use per step (one history each).
CONTEXTS: dict[str, tuple[str, ...]] = {
    "flux": ("cond", "uncond"),  # true CFG: two calls per step
    "sd3": ("default",),  # batched CFG, no cache_context
    "wan": ("cond", "uncond"),
    "ltx": ("cond_uncond",),
    "ddim": ("default",),  # UNet2DModel has no cache_context at all (not a CacheMixin)
    "dit": ("default",),
}
# The abscissa "auto" must pick for the pipeline's scheduler.
SPACING: dict[str, str] = {
    "flux": "sigma",
    "sd3": "sigma",
    "wan": "sigma",
    "ltx": "sigma",
    "ddim": "lambda",
    "dit": "lambda",
}


def denoiser_of(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def count_forward(module: torch.nn.Module) -> list[int]:
    """Count the calls of `module`'s real forward (install before the hook, which then wraps the counter)."""
    import functools

    calls = [0]
    original = module.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    module.forward = forward
    return calls


def run(pipe: Any, kwargs: dict[str, Any], seed: int = 0, **overrides: Any) -> torch.Tensor:
    """The pipeline's output as a tensor (latents, or the image for DDIM / DiT)."""
    out = pipe(**{**kwargs, **overrides}, generator=torch.Generator().manual_seed(seed))[0]
    return torch.as_tensor(out).detach().clone()


@pytest.fixture(params=sorted(BUILDERS))
def pipeline(request: pytest.FixtureRequest) -> tuple[str, Any, dict[str, Any], list[int]]:
    """(name, pipe, call kwargs, forward counter) for each tested pipeline."""
    pipe, kwargs = BUILDERS[request.param]()
    return request.param, pipe, kwargs, count_forward(denoiser_of(pipe))


@pytest.fixture
def tiny() -> SimpleNamespace:
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    names = ("BUILDERS", "CONTEXTS", "SPACING", "STEPS", "count_forward", "denoiser_of", "run")
    return SimpleNamespace(**{name: globals()[name] for name in names})
