"""Sweep of abcore's step rule on the shipped models: schedule, tail, correction, adaptive.

Runs `abcore.sample` (the numpy reference executor) around the shipped torch models, with both CFG branches
stacked as one output (so every branch has the same calls, and the correction of each branch enters the guided
output with its guidance weight). PSNR against the full 50-step sampler from the same noise, per seed.

    OMP_NUM_THREADS=1 python benchmarks/rule_sweep.py --seeds 0 --out benchmarks/rule_sweep.json | tee -a LOG
    python benchmarks/rule_sweep.py --report LOG     # the markdown table over every seed in LOG
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path

import abcore
import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

STEPS = 50
DEMO = Path(__file__).resolve().parents[1] / "packages/abcache-examples/src/abcache_examples"


def _demo_models():  # the model definitions only, without importing the library that caches them
    spec = importlib.util.spec_from_file_location("abcache_demo_models", DEMO / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _demo_models()
EPS_SCHEDULER_CONFIG, NULL_CLASS = models.EPS_SCHEDULER_CONFIG, models.NULL_CLASS


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of 10 log10(2^2 / MSE) on [-1, 1] images (as the demo's metrics.psnr)."""
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(4.0 / mse)))


class Flow:
    """The flow DiT, CFG 3, FlowMatchEuler shift 3 (the demo's setting)."""

    name = "flow DiT, CFG 3, FlowMatchEuler shift 3"

    def __init__(self, batch: int, guidance: float = 3.0) -> None:
        self.model = models.load_flow_model(DEMO / "weights").eval()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        scheduler.set_timesteps(STEPS)
        self.grid = scheduler.sigmas.double().numpy()
        self.steps = abcore.LinearSteps.euler(self.grid)
        self.batch, self.guidance = batch, guidance

    def start(self, seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (self.batch,), generator=g)
        return torch.randn(self.batch, 1, 16, 16, generator=g).numpy()

    @torch.no_grad()
    def model_fn(self, x: np.ndarray, sigma: float) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        both = torch.cat([xt, xt])
        labels = torch.cat([self.labels, torch.full_like(self.labels, NULL_CLASS)])
        t = torch.full((2 * self.batch,), sigma * 1000.0)
        out = self.model(both, timestep=t, class_labels=labels).sample
        return out.reshape(2, *x.shape).numpy().astype(np.float64)

    def step_fn(self, x: np.ndarray, out: np.ndarray, t: float, t_next: float) -> np.ndarray:
        guided = out[1] + self.guidance * (out[0] - out[1])
        return x + (t_next - t) * guided


class Eps:
    """The eps UNet, DDIM 50 steps, clip_sample off so that the step is linear in eps.

    "leading" spacing (980, 960, ..., 0): with "trailing" the first step starts at alpha = 5e-5, where DDIM
    without clipping multiplies the model's eps error by alpha'/alpha = 640 and the full sampler diverges.
    """

    name = "eps UNet, DDIM 50 leading (clip_sample off), lambda abscissa"

    def __init__(self, batch: int) -> None:
        self.model = models.load_eps_model(DEMO / "weights").eval()
        scheduler = DDIMScheduler.from_config(
            {**EPS_SCHEDULER_CONFIG, "clip_sample": False, "timestep_spacing": "leading"}
        )
        scheduler.set_timesteps(STEPS)
        self.timesteps = scheduler.timesteps.numpy()
        abar = scheduler.alphas_cumprod.double().numpy()[self.timesteps]
        abar = np.append(abar, float(scheduler.final_alpha_cumprod))
        self.grid = abcore.lambda_from_alphas_cumprod(np.minimum(abar, 1 - 1e-12))
        self.steps = abcore.LinearSteps.ddim(np.sqrt(abar), np.sqrt(1 - abar), "epsilon")
        self.index = {float(v): i for i, v in enumerate(self.grid)}
        self.batch = batch

    def start(self, seed: int) -> np.ndarray:
        return torch.randn(self.batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).numpy()

    @torch.no_grad()
    def model_fn(self, x: np.ndarray, lam: float) -> np.ndarray:
        t = int(self.timesteps[self.index[lam]])
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self.model(xt, t).sample.numpy().astype(np.float64)

    def step_fn(self, x: np.ndarray, out: np.ndarray, t: float, t_next: float) -> np.ndarray:
        return self.steps.apply(self.index[t], x, out)


def configs() -> list[tuple[str, abcore.ABConfig]]:
    rows = [("previous default (interval 3, no tail)", abcore.ABConfig(interval=3, cooldown=0, correct=False))]
    for interval in (3, 4, 5, 6, 8):
        for cooldown in (0, 2, 4):
            for correct in (False, True):
                rows.append(
                    (
                        f"fixed interval {interval}, cooldown {cooldown}, correct {correct}",
                        abcore.ABConfig(interval=interval, cooldown=cooldown, correct=correct),
                    )
                )
    for tolerance in (0.1, 0.2):
        for cooldown in (0, 4):
            for correct in (False, True):
                rows.append(
                    (
                        f"adaptive tol {tolerance}, <= 4 predicted, cooldown {cooldown}, correct {correct}",
                        abcore.ABConfig(interval=5, tolerance=tolerance, cooldown=cooldown, correct=correct),
                    )
                )
    return rows


def report(log: str) -> str:
    """Markdown tables (mean and spread over seeds) from the lines this script printed."""
    import collections
    import re

    scores: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    calls: dict[tuple[str, str], int] = {}
    for line in Path(log).read_text().splitlines():
        match = re.match(r"(\w+) seed (\d+) (.*?)\s+calls\s+(\d+) psnr\s+(\S+)", line)
        if match:
            model, _, method, count, value = match.groups()
            scores[model, method].append(float(value))
            calls[model, method] = int(count)
    out = []
    for model in dict.fromkeys(m for m, _ in scores):
        out += ["", f"| {model}: method | calls | PSNR dB | min..max | seeds |", "|---|---|---|---|---|"]
        for (m, method), values in scores.items():
            if m == model:
                spread = f"{min(values):.1f}..{max(values):.1f}" if len(values) > 1 else ""
                mean = sum(values) / len(values)
                out.append(f"| {method} | {calls[m, method]} | {mean:.1f} | {spread} | {len(values)} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["flow", "eps"])
    parser.add_argument("--filter", default="")
    parser.add_argument("--out", default="benchmarks/rule_sweep.json")
    parser.add_argument("--report", help="print the tables of a log of earlier runs and exit")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    results = []
    for key in args.models:
        setup = Flow(args.batch) if key == "flow" else Eps(args.batch)
        for seed in args.seeds:
            x0 = setup.start(seed)
            full = abcore.sample(
                setup.model_fn, x0, setup.grid, setup.step_fn, abcore.ABConfig(interval=1, cooldown=0)
            ).x
            for label, config in configs():
                if args.filter not in label:
                    continue
                start = time.perf_counter()
                traj = abcore.sample(setup.model_fn, x0, setup.grid, setup.step_fn, config, steps=setup.steps)
                row = {
                    "model": key,
                    "seed": seed,
                    "method": label,
                    "calls": int(traj.computed.sum()),
                    "psnr": psnr(np.clip(traj.x, -1, 1), np.clip(full, -1, 1)),
                    "seconds": time.perf_counter() - start,
                }
                results.append(row)
                print(f"{key} seed {seed} {label:<70} calls {row['calls']:>3} psnr {row['psnr']:6.2f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
