"""The scheduler table of packages/abcache-diffusers/README.md, measured on the tiny random-init pipelines.

OMP_NUM_THREADS=1 python tests/abcache_diffusers/scheduler_table.py
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import diffusers
import torch
from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache, get_ab_cache_hook
from abcache_diffusers._spacing import nonlinear_reason
from test_schedulers import SCHEDULERS  # this folder is on sys.path when the script runs

_spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).with_name("conftest.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

STEPS = 20
# the schedulers of test_schedulers.py, plus DDIM with its default clipping (run, but not corrected)
_i = SCHEDULERS.index(("DDIMScheduler", dict(clip_sample=False), "dit")) + 1
ROWS = [*SCHEDULERS[:_i], ("DDIMScheduler", dict(clip_sample=True), "dit"), *SCHEDULERS[_i:]]


def _run(pipe, kwargs, calls, config=None):
    if config is not None:
        enable_ab_cache(pipe, config)
    calls[0] = 0
    torch.manual_seed(0)  # DiTPipeline steps stochastic schedulers with the global generator
    out = tiny.run(pipe, kwargs).double()
    hook = get_ab_cache_hook(tiny.denoiser_of(pipe))
    abscissa = None if hook is None else hook.abscissa
    if config is not None:
        disable_ab_cache(pipe)
    return out, calls[0], abscissa


def main() -> None:
    warnings.simplefilter("ignore")
    print(
        "| scheduler | pipeline | abscissa | correction | calls (uncached) | rel. error | rel. error, correct=False |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, options, pipeline in ROWS:
        if name == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
            print(f"| {name} | {pipeline} | needs torchsde, not installed: not measured |||||")
            continue
        pipe, kwargs = tiny.BUILDERS[pipeline]()
        config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        pipe.scheduler = getattr(diffusers, name).from_config(config, **options)
        kwargs = {**kwargs, "num_inference_steps": STEPS}
        calls = tiny.count_forward(tiny.denoiser_of(pipe))
        reference, uncached, _ = _run(pipe, kwargs, calls)
        cached, computed, abscissa = _run(pipe, kwargs, calls, ABCacheConfig(force=True))
        plain, _, _ = _run(pipe, kwargs, calls, ABCacheConfig(force=True, correct=False))
        reason = nonlinear_reason(pipe.scheduler)
        label = name + "".join(f", {k}={v}" for k, v in options.items() if k == "clip_sample")
        error = float((cached - reference).norm() / reference.norm())
        error_plain = float((plain - reference).norm() / reference.norm())
        print(
            f"| {label} | {pipeline} | {abscissa} | {'yes' if reason is None else 'no'} | {computed} ({uncached}) "
            f"| {error:.2e} | {error_plain:.2e} |"
        )


if __name__ == "__main__":
    main()
