"""Cost and accuracy of the LMS coefficients of a 50-step schedule at order 4: quadrature against closed form.

diffusers' `LMSDiscreteScheduler.get_lms_coefficient` integrates each coefficient with `scipy.integrate.quad`
at every step (194 calls for 50 steps at order 4, with the lower-order start-up). Timed side by side in one
process, medians of alternated repeats:

- a generation's scheduler work: `set_timesteps` and the 194 coefficients, on diffusers' scheduler and on
  `abcache_diffusers.ExactLMSDiscreteScheduler` (a table per schedule, then lookups);
- the whole table: `abcore.multistep_table` (numpy float64), `abcache_torch.multistep_table` (float64, CPU),
  `abcache_jax.multistep_table` under `jax.jit` (after compiling; the compile time is reported apart).

Accuracy: the largest error, relative to each row's largest coefficient, of diffusers' quadrature and of the
closed form, against the exact integrals of the same float32 sigmas as rationals
(`abcore.testing.exact_multistep_weights`, by the order conditions).

    python benchmarks/lms_coefficients.py --out benchmarks/results/lms_coefficients.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import abcache_jax
import abcache_torch
import abcore
import jax
import jax.numpy as jnp
import numpy as np
import torch
from abcache_diffusers import ExactLMSDiscreteScheduler
from abcore.testing import exact_multistep_weights
from diffusers import LMSDiscreteScheduler

STEPS, ORDER = 50, 4


def sd_scheduler(cls: type[LMSDiscreteScheduler]) -> LMSDiscreteScheduler:
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's
    scheduler.set_timesteps(STEPS)
    return scheduler


def step_calls(scheduler: LMSDiscreteScheduler) -> list[float]:
    """The coefficients `step` asks for over the whole schedule, in its order."""
    return [
        scheduler.get_lms_coefficient(min(t + 1, ORDER), t, j) for t in range(STEPS) for j in range(min(t + 1, ORDER))
    ]


def exact_table(sigmas: np.ndarray) -> list[tuple[Fraction, ...]]:
    rows = []
    for t in range(STEPS):
        m = min(t + 1, ORDER)
        rows.append(exact_multistep_weights(sigmas[t - m + 1 : t + 1][::-1], sigmas[t], sigmas[t + 1]))
    return rows


def worst_error(values: list[float], exact: list[tuple[Fraction, ...]]) -> float:
    it, worst = iter(values), 0.0
    for row in exact:
        scale = max(abs(float(c)) for c in row)
        worst = max(worst, *(float(abs(Fraction(next(it)) - c)) / scale for c in row))
    return worst


def timed(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions alternated in every repeat."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lms_coefficients.json"))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    theirs = sd_scheduler(LMSDiscreteScheduler)
    sigmas = theirs.sigmas.double().numpy()
    grid_torch, grid_jax = torch.from_numpy(sigmas), jnp.asarray(sigmas, dtype=jnp.float32)
    jitted = jax.jit(abcache_jax.multistep_table, static_argnums=1)
    start = time.perf_counter()
    jitted(grid_jax, ORDER).block_until_ready()
    compile_s = time.perf_counter() - start

    ours = sd_scheduler(ExactLMSDiscreteScheduler)

    def generation(scheduler: LMSDiscreteScheduler) -> list[float]:
        scheduler.set_timesteps(STEPS)  # new sigmas: ours builds its table again
        return step_calls(scheduler)

    seconds = timed(
        {
            "LMSDiscreteScheduler: set_timesteps + 194 coefficients (quadrature)": lambda: generation(theirs),
            "ExactLMSDiscreteScheduler: set_timesteps + 194 coefficients": lambda: generation(ours),
            "abcore.multistep_table (numpy)": lambda: abcore.multistep_table(sigmas, ORDER),
            "abcache_torch.multistep_table (float64)": lambda: abcache_torch.multistep_table(grid_torch, ORDER),
            "abcache_jax.multistep_table (jit, float32)": lambda: jitted(grid_jax, ORDER).block_until_ready(),
        },
        args.repeats,
    )
    exact = exact_table(sigmas)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, jax {jax.__version__}, one thread",
        "command": "python benchmarks/lms_coefficients.py",
        "steps": STEPS,
        "order": ORDER,
        "repeats": args.repeats,
        "seconds": seconds,
        "jax_compile_s": compile_s,
        "max_relative_error": {
            "diffusers quadrature": worst_error(step_calls(theirs), exact),
            "ExactLMSDiscreteScheduler": worst_error(generation(ours), exact),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    quadrature = next(iter(seconds.values()))
    for name, s in seconds.items():
        print(f"{name:70s} {s * 1e6:10.1f} us  {quadrature / s:8.1f}x")
    print(json.dumps(result["max_relative_error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
