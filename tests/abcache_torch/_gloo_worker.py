"""One rank of a two-rank gloo run (launched by test_distributed.py, one process per rank).

usage: python _gloo_worker.py MODE RANK PORT OUTDIR, MODE one of

- "agree": the adaptive cache with ``process_group=dist.group.WORLD`` on this rank's half of the batch (`ABCache`
  with two contexts, cond and uncond, and `sample`), then the same half with ``process_group=None``; saves which
  steps computed, the final x and the number of collective calls of each run.
- "independent": the ranks share nothing: each runs its own number of generations of its own length, with
  the default config and with ``tolerance=0.1``, through `ABCache` and `sample`, all with the default
  ``process_group=None``; saves the outputs and the number of collective calls (which must be 0).

The functions are imported by the test too, which runs them in one process for the reference.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import abcore
import torch
import torch.distributed as dist

_spec = importlib.util.spec_from_file_location("processes", Path(__file__).parents[1] / "processes.py")
_processes = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_processes)  # type: ignore[union-attr]
Collectives = _processes.Collectives

ADAPTIVE = abcore.ABConfig(order=3, interval=4, warmup=2, cooldown=0, tolerance=5e-2)
N_STEPS = 30


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and its per-row frequencies: rows 0-1 smooth in sigma, rows 2-3 oscillating."""
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(4, 2)
    return x, torch.tensor([0.5, 0.5, 9.0, 9.0], dtype=torch.float64)


def velocity(x: torch.Tensor, sigma: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    return -x + torch.sin(freq[:, None] * sigma[:, None])


def run_agree(x: torch.Tensor, freq: torch.Tensor, process_group: Any) -> tuple[list[bool], torch.Tensor]:
    """CFG with the adaptive cache (ABCache, two contexts); returns which steps called the model, and the final x."""
    from abcache_torch import ABCache

    calls: dict[str, list[int]] = {"cond": [], "uncond": []}

    def model(x: torch.Tensor, sigma: torch.Tensor, branch: str) -> torch.Tensor:
        calls[branch].append(step)
        scale = 1.0 if branch == "cond" else 0.3
        return velocity(x, sigma.expand(x.shape[0]), scale * freq)

    sigmas = torch.linspace(1.0, 0.0, N_STEPS + 1, dtype=torch.float64)
    cache = ABCache(model, ADAPTIVE, times=sigmas[:-1], process_group=process_group)
    for step in range(N_STEPS):
        sigma = sigmas[step]
        with cache.context("cond"):
            cond = cache(x, sigma, "cond")
        with cache.context("uncond"):
            uncond = cache(x, sigma, "uncond")
        x = x + (sigmas[step + 1] - sigma) * (uncond + 2.0 * (cond - uncond))
    assert calls["cond"] == calls["uncond"], calls  # the contexts decide jointly
    return [step in calls["cond"] for step in range(N_STEPS)], x


def run_sample(x: torch.Tensor, freq: torch.Tensor, process_group: Any) -> tuple[list[bool], torch.Tensor]:
    """`sample` (one ContextState) with the adaptive cache; returns which steps called the model, and the final x."""
    from abcache_torch import flow_euler_step, sample

    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return velocity(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), freq)

    sigmas = torch.linspace(1.0, 0.0, N_STEPS + 1, dtype=torch.float64)
    traj = sample(model, x, sigmas, flow_euler_step, ADAPTIVE, process_group=process_group)
    return traj.computed.tolist(), traj.x


# rank -> (generations, steps per generation): the ranks run different amounts of work
PLANS = {0: (2, 12), 1: (3, 20)}


def run_independent(rank: int) -> dict[str, Any]:
    """This rank's own generations (`PLANS`), default config and tolerance=0.1, ABCache and sample, no group."""
    from abcache_torch import ABCache, flow_euler_step, sample

    generations, n = PLANS[rank]
    sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    freq = torch.tensor([0.5, 3.0], dtype=torch.float64)

    def model(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return velocity(x, torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), freq)

    results: dict[str, Any] = {}
    for label, config in (("default", abcore.ABConfig()), ("adaptive", abcore.ABConfig(tolerance=0.1))):
        cache = ABCache(model, config, num_steps=n)
        finals, sampled = [], []
        for g in range(generations):
            x0 = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64).reshape(2, 2) * (1.0 + 0.5 * g)
            x = x0
            for i in range(n):
                x = x + (sigmas[i + 1] - sigmas[i]) * cache(x, sigmas[i])
            finals.append(x)
            traj = sample(model, x0, sigmas, flow_euler_step, config)
            sampled.append((traj.x, traj.computed.tolist()))
        results[label] = {"finals": finals, "sampled": sampled, "stats": cache.stats.as_dict()}
    return results


def main(mode: str, rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a collective that one rank never joins fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        with Collectives() as counter:
            if mode == "agree":
                x, freq = batch()
                shard = slice(2 * rank, 2 * rank + 2)
                result: dict[str, Any] = {}
                for name, run in (("abcache", run_agree), ("sample", run_sample)):
                    before = counter.count
                    decisions, out = run(x[shard], freq[shard], dist.group.WORLD)
                    grouped = counter.count - before
                    local, _ = run(x[shard], freq[shard], None)  # the same shard, no collective
                    collectives = (grouped, counter.count - before - grouped)
                    result[name] = {"decisions": decisions, "x": out, "local": local, "collectives": collectives}
            else:
                result = {"runs": run_independent(rank)}
                result["collectives"] = counter.count
        torch.save(result, os.path.join(outdir, f"{mode}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
