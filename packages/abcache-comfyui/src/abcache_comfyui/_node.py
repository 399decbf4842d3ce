"""The "AB-Cache" node: a MODEL in, the same model with AB-Cache's wrappers out (ComfyUI's v1 node API)."""

from __future__ import annotations

from typing import Any

import abcore

from abcache_comfyui._run import KEY, Settings, diffusion_model_wrapper, outer_sample_wrapper

DEFAULT = abcore.ABConfig()  # a call budget: the node's interval 0, speedup 0, warmup and cooldown -1


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
        "AB-Cache (training-free): the diffusion model runs only at some steps; at the others its output is "
        "extrapolated (Adams-Bashforth / Lagrange) from its last `order` outputs at their real sigmas. By default a "
        "call budget of 5 + steps // 5 model calls (9 of 20, 10 of 28, 15 of 50) is placed by the sampler's "
        "sensitivity (`speedup` sets another budget); `interval` >= 1 gives the fixed schedule (warm-up, every "
        "`interval` steps, cool-down), `tolerance` > 0 the adaptive mode. With euler / ddim the computed steps also "
        "correct the predicted ones. No calibration; works with every sampler (multi-stage samplers cache only "
        "their step calls)."
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
                        "default": 0,
                        "min": 0,
                        "max": 100,
                        "tooltip": "0: a call budget places the model calls (the default, see speedup). >= 1: the "
                        "fixed schedule, the model runs every `interval` steps after the warm-up (1: every step, "
                        "no caching). In adaptive mode: the most steps in a row it may skip, plus one (0: 5).",
                    },
                ),
                "warmup": (
                    "INT",
                    {
                        "default": -1,
                        "min": -1,
                        "max": 1000,
                        "tooltip": "Leading steps that always run the model (at least the first one does). "
                        "-1: the default, the budget's own split (1 or 2), or 2 with an interval or a tolerance.",
                    },
                ),
                "cooldown": (
                    "INT",
                    {
                        "default": -1,
                        "min": -1,
                        "max": 1000,
                        "tooltip": "Trailing steps that always run the model: the last steps decide the details. "
                        "-1: the default, the budget's own split (0 to 3), or 4 with an interval or a tolerance.",
                    },
                ),
                "tolerance": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.001,
                        "tooltip": "0: the call budget or the fixed schedule above. Above 0: adaptive mode, a step "
                        "is skipped only when the estimated error of its prediction is at most this; needs "
                        "order >= 2, one decision for positive and negative. Where the sampler's step is linear "
                        "(euler, ddim) the error is the estimated change of the final image relative to the "
                        "output (e.g. 0.002-0.02); with other samplers the output's relative change (e.g. "
                        "0.05-0.3).",
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
                # last, so that workflows saved before it keep their widget values
                "speedup": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "The call budget (with interval 0 and tolerance 0). 0: the default budget, "
                        "5 + steps // 5 model calls (9 of 20, 15 of 50). >= 1: floor(steps / speedup) calls. "
                        "The calls are placed where the sampler's result is most sensitive (euler / ddim), "
                        "else evenly.",
                    },
                ),
            }
        }

    def patch(
        self,
        model: Any,
        order: int,
        interval: int,
        speedup: float,
        warmup: int,
        cooldown: int,
        tolerance: float,
        start_percent: float,
        end_percent: float,
        correct: bool,
        verbose: bool,
    ) -> tuple[Any]:
        if speedup > 0 and (interval > 0 or tolerance > 0):
            raise ValueError(
                f"speedup={speedup} sets a call budget: set interval and tolerance to 0 (got interval={interval}, "
                f"tolerance={tolerance}), or speedup to 0 for the fixed schedule or the adaptive mode"
            )
        # None: not given, so abcore's own default (the budget's split, or the fixed schedule's 5 / 2 / 4)
        schedule: dict[str, Any] = {
            "interval": interval if interval > 0 else None,
            "warmup": warmup if warmup >= 0 else None,
            "cooldown": cooldown if cooldown >= 0 else None,
        }
        config = abcore.ABConfig(
            order=order,
            **schedule,
            speedup=float(speedup) if speedup > 0 else None,
            tolerance=float(tolerance) if tolerance > 0 else None,
            correct=None if correct else False,
        )
        return (patch_model(model, Settings(config, float(start_percent), float(end_percent), bool(verbose))),)


NODE_CLASS_MAPPINGS = {"ABCache": ABCacheNode}
NODE_DISPLAY_NAME_MAPPINGS = {"ABCache": "AB-Cache"}
