"""The demo's networks: fixed configs, builders, and loaders for the weights shipped in ``weights``.

- flow model: diffusers ``DiTTransformer2DModel``, class-conditional (10 classes + the null class 10 used for
  classifier-free guidance), trained by rectified flow: ``x_t = (1 - sigma) x0 + sigma * noise``, target
  velocity ``noise - x0``, timestep ``sigma * 1000`` (the FLUX/SD3 convention).
- eps model: diffusers ``UNet2DModel``, unconditional, trained with ``DDPMScheduler`` (cosine
  ``squaredcos_cap_v2`` schedule) on epsilon prediction, sampled with ``DDIMScheduler``.
- classifier: :class:`DigitClassifier`, a small CNN whose penultimate features feed the Frechet distance.

Each model's constructor config is stored as JSON next to its safetensors file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models import CacheMixin
from torch import nn

NULL_CLASS = 10  # label id of the "no class" embedding (classifier-free guidance)

FLOW_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "sample_size": 16,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
}

EPS_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}

CLASSIFIER_CONFIG: dict[str, Any] = {"channels": [16, 32], "feature_dim": 64, "num_classes": 10}

# The real-image model: a class-conditional flow DiT on Fashion-MNIST (28x28, 49 patches of 4x4), and its classifier.
FASHION_CONFIG: dict[str, Any] = {
    **FLOW_CONFIG,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_layers": 6,
    "sample_size": 28,
    "patch_size": 4,
}
FASHION_CLASSIFIER_CONFIG: dict[str, Any] = {
    "channels": [32, 64],
    "feature_dim": 128,
    "num_classes": 10,
    "image_size": 28,
}

# Scheduler configs: the flow model's FLUX-like shifted grid, and the DDPM training schedule of the eps model
# (DDIMScheduler.from_config of it gives the sampler).
FLOW_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
EPS_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
    # "leading" (980, 960, ..., 0): "trailing" starts at alpha = 5e-5, where DDIM without clipping multiplies the
    # model's error by alpha'/alpha = 640 and the full sampler diverges
    "timestep_spacing": "leading",
}

# The zoo: flow (DiT, velocity), flow_ema (the same DiT trained 2x longer, EMA decay 0.9995), eps (UNet,
# epsilon prediction) and v (the same UNet, v-prediction); the classifier scores them all.
V_SCHEDULER_CONFIG: dict[str, Any] = {**EPS_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
FLOW_MODELS = ("fashion", "flow", "flow_ema")
UNET_MODELS = ("eps", "v")
CLASSIFIERS = ("classifier", "fashion_classifier")
MODEL_NAMES = (*FLOW_MODELS, *UNET_MODELS, *CLASSIFIERS)
FASHION_MODELS = ("fashion", "fashion_classifier")  # trained on Fashion-MNIST; the others on the 16x16 digits


class FlowDiT(DiTTransformer2DModel, CacheMixin):
    """diffusers' ``DiTTransformer2DModel`` with ``CacheMixin``, as FLUX's and Wan's transformers have.

    The mixin gives it ``cache_context`` (so the pipeline's "cond" / "uncond" calls reach cache hooks) and
    ``enable_cache`` (diffusers' own caches, used by the benchmark); the network is unchanged.
    """


class DigitClassifier(nn.Module):
    """Two conv-ReLU-maxpool stages, a ``feature_dim`` ReLU layer (the penultimate features) and a linear head.

    Input ``(N, 1, image_size, image_size)`` in [-1, 1]; :meth:`features` returns ``(N, feature_dim)``,
    ``forward`` the logits. The same class scores the digits (16x16) and Fashion-MNIST (28x28).
    """

    def __init__(
        self,
        channels: list[int] | tuple[int, int] = (16, 32),
        feature_dim: int = 64,
        num_classes: int = 10,
        image_size: int = 16,
    ):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised model ``name`` in ``MODEL_NAMES`` from ``config`` (default: the fixed config)."""
    if name in FLOW_MODELS:
        return cast(nn.Module, FlowDiT(**(config or FLOW_CONFIG)))
    if name in UNET_MODELS:
        from diffusers import UNet2DModel

        return cast(nn.Module, UNet2DModel(**(config or EPS_CONFIG)))
    if name in CLASSIFIERS:
        return DigitClassifier(**(config or default_config(name)))
    raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")


def default_config(name: str) -> dict[str, Any]:
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    configs = {
        "fashion": FASHION_CONFIG,
        "fashion_classifier": FASHION_CLASSIFIER_CONFIG,
        "classifier": CLASSIFIER_CONFIG,
    }
    return configs.get(name, FLOW_CONFIG if name in FLOW_MODELS else EPS_CONFIG)


def weights_dir() -> Path:
    """The package's ``weights`` folder."""
    return Path(str(resources.files("abcache_examples") / "weights"))


def save_model(model: nn.Module, name: str, config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``<name>.safetensors`` (float32 state dict) and ``<name>.json`` (the constructor config)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / f"{name}.safetensors"


def load_model(name: str, weights: str | Path | None = None) -> nn.Module:
    """Build model ``name`` from ``<dir>/<name>.json`` and load ``<dir>/<name>.safetensors``, in eval mode.

    ``weights`` is the folder (default: the shipped :func:`weights_dir`).
    """
    from safetensors.torch import load_file

    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    folder = Path(weights) if weights is not None else weights_dir()
    config = json.loads((folder / f"{name}.json").read_text())
    model = build_model(name, config)
    model.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    return model.eval().requires_grad_(False)


def load_flow_model(weights: str | Path | None = None, name: str = "flow") -> nn.Module:
    """A shipped class-conditional flow-matching ``DiTTransformer2DModel`` (``name`` in ``FLOW_MODELS``)."""
    if name not in FLOW_MODELS:
        raise ValueError(f"name must be one of {FLOW_MODELS}, got {name!r}")
    return load_model(name, weights)


def load_eps_model(weights: str | Path | None = None, name: str = "eps") -> nn.Module:
    """A shipped ``UNet2DModel`` (``name`` in ``UNET_MODELS``: epsilon or v-prediction)."""
    if name not in UNET_MODELS:
        raise ValueError(f"name must be one of {UNET_MODELS}, got {name!r}")
    return load_model(name, weights)


def load_classifier(weights: str | Path | None = None, name: str = "classifier") -> DigitClassifier:
    """A shipped :class:`DigitClassifier` (``name`` in ``CLASSIFIERS``: the digits' or Fashion-MNIST's)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"name must be one of {CLASSIFIERS}, got {name!r}")
    return cast(DigitClassifier, load_model(name, weights))
