"""`ABCacheConfig`: AB-Cache settings for a diffusers denoiser, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

from abcore import ABConfig
from torch.distributed import ProcessGroup

Abscissa = Literal["auto", "sigma", "lambda", "timestep", "index"]
_AB_DEFAULTS = ABConfig()
_AB_FIELDS = tuple(f.name for f in fields(ABConfig) if f.name != "abscissa")  # this config names the abscissa


@dataclass(frozen=True)
class ABCacheConfig:
    r"""
    Configuration for [AB-Cache](https://huggingface.co/papers/2504.10540) ("AB-Cache: Training-Free Acceleration of
    Diffusion Models via Adams-Bashforth Cached Feature Reuse", arXiv:2504.10540).

    The denoiser runs only at some steps; at the others its output is predicted by Lagrange extrapolation of order
    `order` through the last `order` *computed* outputs at their real step times (the paper's Eq. 3.5, error
    O(h^k)). The step times are the scheduler's own spacing: sigma for flow-matching schedulers (shift and dynamic
    shifting included), the half log-SNR lambda = log(alpha / sigma) for DDIM / DPM-Solver / UniPC / Euler type
    schedulers. The weights come from `abcore`.

    Args:
        order (`int`, defaults to `2`):
            Number of computed outputs each prediction combines (k; error O(h^k)).
        interval (`int`, defaults to `5` without a budget):
            One computed step every `interval` steps after the warm-up (`1` computes every step). In adaptive mode,
            the default bound on consecutive predictions is `interval - 1`.
        warmup (`int`, defaults to `2`):
            Leading steps that always compute (at least the first one does).
        cooldown (`int`, defaults to `4`):
            Trailing steps that always compute (their extrapolated outputs would be the least accurate).
        compute_mask (`tuple[bool, ...]`, *optional*):
            Explicit per-step compute flags replacing the fixed schedule; must start with `True` and have one entry
            per denoising step of the call.
        calls (`int`, *optional*):
            A call budget instead of an interval: exactly `calls` denoising steps compute (of the call's steps),
            placed by the scheduler's sensitivity (a warm-up, a tail, the rest between; `abcore.ABConfig`); `warmup` and `cooldown` then
            default to the budget's own split. Needs the number of steps (a scheduler).
        speedup (`float`, *optional*):
            The budget as a speed-up: `calls = floor(num_inference_steps / speedup)` (at least 1).
        tolerance (`float`, *optional*):
            Enables the adaptive mode: a step is predicted only when the embedded error estimate passes the test
            `error` (needs `order >= 2`).
        error (`str`, *optional*):
            The adaptive test. `"state"`: the estimated change of the final sample, |s_n| ||p_k - p_{k-1}|| <=
            tolerance ||p_k|| with s_n the scheduler's sensitivity of its result to step n's output. `"output"`:
            ||p_k - p_{k-1}|| <= tolerance ||p_k||. `None` (default): `"state"` where the scheduler's step is linear in
            the model output, else `"output"`.
        max_predicted (`int`, *optional*):
            Adaptive mode: most consecutive predicted steps (default `interval - 1`).
        weighting (`str`, defaults to `"plain"`):
            What is extrapolated. `"plain"`: the model output itself. `"exp-eps"` / `"exp-x0"`: the paper's
            exponential weighting (Eq. 3.6) for epsilon / sample prediction, on the lambda abscissa. `"exp"` picks one
            of the two from the scheduler's `prediction_type`.
        predictor (`str`, defaults to `"lagrange"`):
            `"lagrange"`: Lagrange extrapolation on the abscissa below. `"binomial"`: the paper's equal-step Eq. 3.6,
            applied to the last computed outputs as if they were consecutive (for comparison; fixed schedule only).
        correct (`bool`, *optional*):
            Correct the predicted steps once the next output is computed, through the scheduler's step
            coefficients (`abcore.LinearSteps`). `None` (default): wherever the scheduler's step is linear in the
            model output (FlowMatchEuler, DDIM without clipping, Euler); `True`: required, a `ValueError` names the
            scheduler where it is not; `False`: never.
        abscissa (`str`, defaults to `"auto"`):
            The step time predictions extrapolate on. `"auto"`: sigma for flow-matching schedulers, lambda for
            schedulers with `alphas_cumprod` or VP/VE sigmas, the timestep otherwise. `"sigma"`, `"lambda"`,
            `"timestep"` (the scheduler's timestep value) and `"index"` (the step number, as index-based caches do;
            abcore's `abscissa="index"`) force one.
        min_steps (`int`, defaults to `10`):
            Few-step guard: a call with fewer denoising steps than this (distilled 1-8 step models) computes every
            step, with a warning, unless `force=True`. Extrapolating over such coarse grids is inaccurate.
        force (`bool`, defaults to `False`):
            Cache even below `min_steps`; warm-up and cool-down shrink to fit a run shorter than them.
        timestep_arg (`str`, defaults to `"timestep"`):
            Name of the denoiser's forward argument that carries the timestep.
        process_group (`torch.distributed.ProcessGroup`, `"auto"` or `None`, defaults to `"auto"`):
            The ranks that must take the same decisions: those running one model together. `"auto"`: the
            model-parallel group diffusers' `enable_parallelism` set on the denoiser (context or tensor parallel),
            else none. `None`: this process decides alone and makes no collective call (ranks generating
            independently). Fixed schedules decide alike everywhere; the group is all-reduced only for the
            non-finite check and the adaptive test.

    Example:

    ```python
    >>> from abcache_diffusers import ABCacheConfig, enable_ab_cache

    >>> enable_ab_cache(pipe, ABCacheConfig(order=2, interval=4, warmup=2, cooldown=2))
    >>> image = pipe(prompt, num_inference_steps=28).images[0]
    ```
    """

    # "time" in abcore is one of the scheduler's times here; "auto" picks it from the scheduler
    ABSCISSAS: ClassVar[tuple[str, ...]] = get_args(Abscissa)
    # "exp" picks "exp-eps" or "exp-x0" from the scheduler's `prediction_type`
    WEIGHTINGS: ClassVar[tuple[str, ...]] = (*ABConfig.WEIGHTINGS, "exp")

    # abcore's fields, with abcore's defaults
    order: int = _AB_DEFAULTS.order
    interval: int | None = None  # 5 unless a budget is set (abcore resolves it)
    warmup: int | None = None
    cooldown: int | None = None
    compute_mask: tuple[bool, ...] | None = _AB_DEFAULTS.compute_mask
    calls: int | None = _AB_DEFAULTS.calls
    speedup: float | None = _AB_DEFAULTS.speedup
    tolerance: float | None = _AB_DEFAULTS.tolerance
    error: str | None = _AB_DEFAULTS.error
    max_predicted: int | None = _AB_DEFAULTS.max_predicted
    weighting: str = _AB_DEFAULTS.weighting
    predictor: str = _AB_DEFAULTS.predictor
    correct: bool | None = _AB_DEFAULTS.correct
    abscissa: Abscissa = "auto"
    min_steps: int = 10
    force: bool = False
    timestep_arg: str = "timestep"
    process_group: Any = field(default="auto", compare=False, repr=False)

    def __post_init__(self) -> None:
        group = self.process_group
        if not (group is None or isinstance(group, ProcessGroup) or (isinstance(group, str) and group == "auto")):
            raise ValueError(f"process_group must be 'auto', None or a torch.distributed.ProcessGroup, got {group!r}")
        if self.abscissa not in self.ABSCISSAS:
            raise ValueError(f"abscissa must be one of {self.ABSCISSAS}, got {self.abscissa!r}")
        if self.weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {self.weighting!r}")
        # abcore validates its own fields and names them in its errors.
        ab = self.to_ab_config("plain" if self.weighting == "exp" else self.weighting)
        for name in ("compute_mask", "interval", "warmup", "cooldown"):
            object.__setattr__(self, name, getattr(ab, name))
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be a non-negative int, got {self.min_steps!r}")
        if not isinstance(self.force, bool):
            raise ValueError(f"force must be a bool, got {self.force!r}")
        if not isinstance(self.timestep_arg, str) or not self.timestep_arg.isidentifier():
            raise ValueError(f"timestep_arg must be an argument name, got {self.timestep_arg!r}")
        if self.weighting.startswith("exp") and self.abscissa not in ("auto", "lambda"):  # abcore checks "index"
            raise ValueError(f"weighting {self.weighting!r} needs the lambda abscissa, got abscissa={self.abscissa!r}")

    def to_ab_config(self, weighting: str | None = None) -> ABConfig:
        """The `abcore.ABConfig` with this config's schedule; `weighting` overrides (resolves "exp")."""
        values = {name: getattr(self, name) for name in _AB_FIELDS}
        if weighting is not None:
            values["weighting"] = weighting
        values["abscissa"] = "index" if self.abscissa == "index" else "time"
        return ABConfig(**values)


def as_config(config: ABCacheConfig | dict | None) -> ABCacheConfig:
    """`config`, or the default config for None, or ``ABCacheConfig(**config)`` for a dict."""
    if config is None:
        return ABCacheConfig()
    if isinstance(config, dict):
        known = {f.name for f in fields(ABCacheConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown ABCacheConfig fields {unknown}; allowed: {sorted(known)}")
        return ABCacheConfig(**config)
    if not isinstance(config, ABCacheConfig):
        raise TypeError(f"config must be an ABCacheConfig, a dict of its fields, or None; got {type(config).__name__}")
    return config
