"""The "AB-Cache" node: a MODEL in, the same model with AB-Cache's wrappers out (ComfyUI's v1 node API)."""

from __future__ import annotations

from typing import Any

import abcore

from abcache_comfyui._run import KEY, Settings, diffusion_model_wrapper, outer_sample_wrapper

DEFAULT = abcore.ABConfig()


def patch_model(model: Any, settings: Settings) -> Any:
    """A clone of the `ModelPatcher` `model` that runs AB-Cache with `settings` in every sampling run."""
    import comfy.patcher_extension

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})[KEY] = settings
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return patched


class ABCacheNode:
    """AB-Cache: the diffusion model runs only at some steps; the others are extrapolated from its last outputs."""

    DESCRIPTION = (
        "AB-Cache (training-free): the diffusion model runs at the warm-up steps, every `interval` steps and the "
        "cool-down steps; at the others its output is extrapolated (Adams-Bashforth / Lagrange) from its last "
        "`order` outputs at their real sigmas. With euler / ddim the computed steps also correct the predicted "
        "ones. No calibration; works with every sampler (multi-stage samplers cache only their step calls)."
    )
    CATEGORY = "advanced/model"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with AB-Cache.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to add AB-Cache to."}),
                "order": (
                    "INT",
                    {
                        "default": DEFAULT.order,
                        "min": 1,
                        "max": 6,
                        "tooltip": "How many computed outputs each prediction extrapolates (error O(h^order)). "
                        "2 is the measured default; 3 with interval 6 and warmup 3 is the fast preset.",
                    },
                ),
                "interval": (
                    "INT",
                    {
                        "default": DEFAULT.interval,
                        "min": 1,
                        "max": 100,
                        "tooltip": "The model runs every `interval` steps after the warm-up (1: every step, "
                        "no caching). In adaptive mode: the most steps in a row it may skip, plus one.",
                    },
                ),
                "warmup": (
                    "INT",
                    {
                        "default": DEFAULT.warmup,
                        "min": 0,
                        "max": 1000,
                        "tooltip": "Leading steps that always run the model (at least the first one does).",
                    },
                ),
                "cooldown": (
                    "INT",
                    {
                        "default": DEFAULT.cooldown,
                        "min": 0,
                        "max": 1000,
                        "tooltip": "Trailing steps that always run the model: the last steps decide the details.",
                    },
                ),
                "tolerance": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "0: the fixed schedule above. Above 0: adaptive mode, a step is skipped only "
                        "when the estimated relative error of its prediction is at most this (e.g. 0.2); "
                        "needs order >= 2.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Steps before this point of the run (by sigma) always run the model.",
                    },
                ),
                "end_percent": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Steps after this point of the run (by sigma) always run the model.",
                    },
                ),
                "correct": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Correct the skipped steps once the next output is computed, where the "
                        "sampler's step is linear in the model output (euler, ddim); the log says when it is off.",
                    },
                ),
                "verbose": ("BOOLEAN", {"default": False, "tooltip": "Log the decision at every step."}),
            }
        }

    def patch(
        self,
        model: Any,
        order: int,
        interval: int,
        warmup: int,
        cooldown: int,
        tolerance: float,
        start_percent: float,
        end_percent: float,
        correct: bool,
        verbose: bool,
    ) -> tuple[Any]:
        config = abcore.ABConfig(
            order=order,
            interval=interval,
            warmup=warmup,
            cooldown=cooldown,
            tolerance=float(tolerance) if tolerance > 0 else None,
            correct=None if correct else False,
        )
        return (patch_model(model, Settings(config, float(start_percent), float(end_percent), bool(verbose))),)


NODE_CLASS_MAPPINGS = {"ABCache": ABCacheNode}
NODE_DISPLAY_NAME_MAPPINGS = {"ABCache": "AB-Cache"}
