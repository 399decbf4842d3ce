"""One rank of a two-rank gloo run of the tiny diffusers pipelines (launched by test_distributed.py).

usage: python _parallel_worker.py RANK PORT OUTDIR: runs every scenario below on this rank, one after the other,
and saves their results to OUTDIR/rank{RANK}.pt.

- "independent": the ranks share nothing: each runs its own number of Flux generations of its own length
  (`PLANS`), with ``enable_ab_cache(pipe)`` (default config) and with ``tolerance=0.1``.
- "ulysses": diffusers' context parallelism (``ContextParallelConfig(ulysses_degree=2)``) on tiny Flux and Wan,
  uncached, and cached (fixed, adaptive) with the cache enabled before and after ``enable_parallelism``.
- "data": one batch of two prompts split over the ranks (a row each), cached with ``process_group=None`` and with
  ``process_group=dist.group.WORLD``.
- "tensor": diffusers' tensor parallelism (``TensorParallelConfig(tp_degree=2)``) on tiny Flux, as "ulysses".

Each result holds the output, the timesteps at which the denoiser really ran (per call, in order), the cache's
stats and the number of torch.distributed collective calls (the cache's: the models' own all-to-alls go through
functional collectives). The functions are imported by the test too, which runs them in one process (no
torch.distributed) for the reference.

CPU workarounds, here and not in the library: a CPU build of torch reports ``torch.accelerator.device_count() == 0``
and ``enable_parallelism`` takes ``rank % device_count()``; diffusers' tensor parallelism lists no "cpu" device.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_spec = importlib.util.spec_from_file_location("processes", Path(__file__).parents[1] / "processes.py")
_processes = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_processes)  # type: ignore[union-attr]
Collectives = _processes.Collectives

HERE = Path(__file__).parent
# the model- and data-parallel cases: uncached, the default fixed schedule, adaptive (predicts some steps of 12 on
# tiny Flux and Wan, and decides differently on the two prompts of the split batch)
CACHES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "fixed": {},
    "adaptive": {"tolerance": 0.2, "error": "output"},
}
# rank -> (generations, steps per generation): the ranks run different amounts of work
PLANS = {0: (2, 12), 1: (3, 16)}


def tiny() -> Any:
    """The tiny pipelines of conftest.py (loaded by path: it is not an importable module)."""
    spec = importlib.util.spec_from_file_location("_tiny_pipelines", HERE / "conftest.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def record_calls(module: torch.nn.Module) -> list[float]:
    """Record the timestep of every call of `module`'s real forward (installed before any hook, which wrap it)."""
    timesteps: list[float] = []
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        timesteps.append(float(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0]))
        return original(*args, **kwargs)

    module.forward = forward
    return timesteps


def build(name: str) -> tuple[Any, dict[str, Any], list[float]]:
    """A tiny pipeline (same weights on every rank: built from seed 0), its call kwargs and its call record."""
    pipe, kwargs = tiny().BUILDERS[name]()
    return pipe, kwargs, record_calls(pipe.transformer)


def generate(pipe: Any, kwargs: dict[str, Any], seeds: list[int], **overrides: Any) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(**{**kwargs, **overrides}, generator=generators)[0].detach().clone()


def result(output: torch.Tensor, calls: list[float], pipe: Any, count: int) -> dict[str, Any]:
    from abcache_diffusers import cache_stats

    stats = cache_stats(pipe).get("transformer")
    return {"output": output, "calls": list(calls), "stats": None if stats is None else stats.as_dict(), "count": count}


def counted() -> Any:
    """Count collectives where torch.distributed runs (the one-process reference has none to count: None)."""
    return Collectives() if dist.is_initialized() else contextlib.nullcontext(None)


# ---------------------------------------------------------------- the scenarios
def run_independent(rank: int) -> dict[str, Any]:
    """This rank's own Flux generations (`PLANS`): default config and tolerance=0.1, process_group left "auto"."""
    from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache

    generations, steps = PLANS[rank]
    pipe, kwargs, calls = build("flux")
    runs: dict[str, Any] = {}
    for label, config in (("default", ()), ("adaptive", (ABCacheConfig(tolerance=0.1),))):
        enable_ab_cache(pipe, *config)  # the default: enable_ab_cache(pipe), as a user writes it
        outputs, per_generation = [], []
        with counted() as counter:
            for g in range(generations):
                calls.clear()
                outputs.append(generate(pipe, kwargs, [100 * rank + g], num_inference_steps=steps))
                per_generation.append(list(calls))
        runs[label] = result(torch.stack(outputs), [], pipe, 0 if counter is None else counter.count)
        runs[label]["calls"] = per_generation  # a list of calls per generation
        disable_ab_cache(pipe)
    return runs


def enable_context_parallel(module: torch.nn.Module, degree: int = 2) -> None:
    from diffusers import ContextParallelConfig

    module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def enable_tensor_parallel(module: torch.nn.Module, degree: int = 2) -> None:
    from diffusers import TensorParallelConfig

    module.enable_parallelism(config=TensorParallelConfig(tp_degree=degree))


def model_parallel_cases(models: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(model, cache, when): uncached, then fixed and adaptive with the cache enabled before / after parallelism."""
    cases = []
    for model in models:
        cases.append((model, "none", "-"))
        cases += [(model, cache, when) for cache in ("fixed", "adaptive") for when in ("before", "after")]
    return cases


def run_model_parallel(models: tuple[str, ...], enable: Any) -> dict[str, Any]:
    """Each case of `model_parallel_cases` on a fresh pipeline; `enable` None: the one-process reference."""
    from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache

    results: dict[str, Any] = {}
    for model, cache, when in model_parallel_cases(models):
        pipe, kwargs, calls = build(model)
        config = CACHES[cache]
        if config is not None and when == "before":
            enable_ab_cache(pipe, ABCacheConfig(**config))
        if enable is not None:
            enable(pipe.transformer)
        if config is not None and when == "after":
            enable_ab_cache(pipe, ABCacheConfig(**config))
        with counted() as counter:
            output = generate(pipe, kwargs, [0])
        key = f"{model}/{cache}/{when}"
        results[key] = result(output, calls, pipe, 0 if counter is None else counter.count)
        if config is not None:  # disabling restores the uncached (parallel) model
            disable_ab_cache(pipe)
            results[key]["disabled"] = generate(pipe, kwargs, [0])
    return results


def split_batch(kwargs: dict[str, Any], rows: slice) -> dict[str, Any]:
    """Flux call kwargs for `rows` of a batch of two prompts (the second prompt's embeddings: the first, times 10)."""
    out = dict(kwargs)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        value = kwargs[key]
        out[key] = torch.cat([value, 10.0 * value])[rows]
    for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        out[key] = torch.cat([kwargs[key]] * 2)[rows]
    return out


def run_data_parallel(rank: int | None) -> dict[str, Any]:
    """The batch of two prompts (seeds 0 and 1), split over the ranks, cached with and without a group; `rank`
    None: one process on the whole batch, and on each row alone."""
    from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache

    pipe, kwargs, calls = build("flux")
    if rank is None:
        parts = {"batch": slice(0, 2), "row0": slice(0, 1), "row1": slice(1, 2)}
        groups: dict[str, Any] = {"none": None}
    else:
        parts = {"rank": slice(rank, rank + 1)}
        groups = {"none": None, "world": dist.group.WORLD}
    results: dict[str, Any] = {}
    for part, rows in parts.items():
        seeds = list(range(2))[rows]
        for cache, config in CACHES.items():
            for group_name, group in groups.items() if config is not None else [("-", None)]:
                if config is not None:
                    enable_ab_cache(pipe, ABCacheConfig(**config, process_group=group))
                calls.clear()
                with counted() as counter:
                    output = generate(pipe, split_batch(kwargs, rows), seeds)
                key = f"{part}/{cache}/{group_name}"
                results[key] = result(output, calls, pipe, 0 if counter is None else counter.count)
                disable_ab_cache(pipe)
    return results


def run_all(rank: int) -> dict[str, Any]:
    """Every scenario on this rank."""
    return {
        "independent": run_independent(rank),
        "ulysses": run_model_parallel(("flux", "wan"), enable_context_parallel),
        "tensor": run_model_parallel(("flux",), enable_tensor_parallel),
        "data": run_data_parallel(rank),
    }


def reference() -> dict[str, Any]:
    """Every scenario in one process, without torch.distributed: each rank's independent runs, the models
    unsplit, the whole batch and each of its rows."""
    return {
        "independent": {rank: run_independent(rank) for rank in PLANS},
        "ulysses": run_model_parallel(("flux", "wan"), None),
        "tensor": run_model_parallel(("flux",), None),
        "data": run_data_parallel(None),
    }


def cpu_workarounds() -> None:
    """Let diffusers' `enable_parallelism` run on a CPU build of torch (gloo, mesh device type "cpu")."""
    import diffusers.hooks.tensor_parallel as tensor_parallel

    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]  # enable_parallelism: rank % count
    if "cpu" not in tensor_parallel._SUPPORTED_TP_DEVICES:
        tensor_parallel._SUPPORTED_TP_DEVICES = (*tensor_parallel._SUPPORTED_TP_DEVICES, "cpu")


def main(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    cpu_workarounds()
    # a collective that one rank never joins fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run_all(rank), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
