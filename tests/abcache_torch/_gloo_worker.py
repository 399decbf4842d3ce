"""Two-rank gloo run of the adaptive cache (launched by test_distributed.py as a script).

usage: python _gloo_worker.py PORT OUTDIR. Each rank samples its half of the batch with the
adaptive cache and saves (decisions, final x, local decisions) to OUTDIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys

import abcore
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIG = abcore.ABConfig(order=3, interval=4, warmup=2, cooldown=0, tolerance=5e-2)
N_STEPS = 30


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and its per-row frequencies: rows 0-1 smooth in sigma, rows 2-3 oscillating."""
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(4, 2)
    return x, torch.tensor([0.5, 0.5, 9.0, 9.0], dtype=torch.float64)


def velocity(x: torch.Tensor, sigma: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    return -x + torch.sin(freq[:, None] * sigma[:, None])


def run(x: torch.Tensor, freq: torch.Tensor) -> tuple[list[bool], torch.Tensor]:
    """Sample with the adaptive cache; returns which steps called the model, and the final x."""
    from abcache_torch import flow_euler_step, sample

    def model(x, sigma):
        return velocity(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), freq)

    sigmas = torch.linspace(1.0, 0.0, N_STEPS + 1, dtype=torch.float64)
    traj = sample(model, x, sigmas, flow_euler_step, CONFIG)
    return traj.computed.tolist(), traj.x


def worker(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, freq = batch()
        shard = slice(2 * rank, 2 * rank + 2)
        decisions, out = run(x[shard], freq[shard])
        dist.destroy_process_group()
        local, _ = run(x[shard], freq[shard])  # the same shard without the all-reduce
        torch.save({"decisions": decisions, "x": out, "local": local}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
