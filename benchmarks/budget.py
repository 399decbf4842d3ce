"""Call budgets on the zoo models at 20, 28 and 50 steps: which N computed steps, and how to predict the others.

For each model, step count n and budget N (n/2, n/3, n/4, n/5 rounded, and the count of `abcore.ABConfig()`),
PSNR of the final sample against the full n-step sampler from the same noise, per evaluation seed, for:

- default: `abcore.ABConfig()` (the budget 5 + n // 5) with the sampler's `LinearSteps` (the correction on), and
  `interval 5`: `ABConfig(interval=5)`, the previous default;
- budget: `abcore.ABConfig(calls=N, **kwargs)` for each entry of `BUDGET_VARIANTS` (skipped when ABConfig has no
  ``calls``);
- adaptive: `abcore.ABConfig(tolerance=tol, max_predicted=m)` for (tol, m) in `ADAPTIVE` (its calls vary);
- searched: the mask of N computed steps found by simulated annealing + hill climbing on calibration seeds
  (BudCache's idea), run with our predictor and correction;
- learned / learned+correction: the budget mask with least-squares linear prediction weights fitted on the full
  calibration trajectory (L2P's idea; abcore's opt-in `abcore.fit_weights`), without and with our correction.

Flow models stack both CFG branches as one output (as benchmarks/rule_sweep.py). Model outputs are memoised per
(step, exact state), so runs that share a prefix of the trajectory (all of them share step 0) call the model once.

    OMP_NUM_THREADS=1 python benchmarks/budget.py                       # everything (benchmarks/results/budget.json)
    python benchmarks/budget.py --report benchmarks/results/budget.md  # all tables + Pareto plots; prints the summary
    python benchmarks/budget.py --selfcheck                            # an independent loop against abcore's
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import abcore
import numpy as np
from abcore.theory import extrapolation_weights

BUDGET_VARIANTS: list[tuple[str, dict[str, Any]]] = [("budget", {})]
# (tolerance, most predicted steps in a row): error="state", the estimated change of the final sample
ADAPTIVE: list[tuple[float, int | None]] = [(0.002, None), (0.004, None), (0.008, None), (0.016, None)]
ADAPTIVE += [(0.008, 8), (0.016, 8), (0.03, 8)]
METHODS = ("default", "budget", "adaptive", "searched", "learned")
ORDER = 2
RESULTS = Path(__file__).resolve().parent / "results"
MEMO_BYTES = 1_500_000_000  # per context; least recently used outputs are dropped beyond this


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """`abcache_examples.metrics.psnr` of the images clipped to [-1, 1] (mean over images of 10 log10(4 / MSE))."""
    from abcache_examples.metrics import psnr as mean_psnr

    return mean_psnr(np.clip(a, -1, 1), np.clip(b, -1, 1), data_range=2.0)


def budgets(n: int) -> list[int]:
    return sorted({round(n / 2), round(n / 3), round(n / 4), round(n / 5), abcore.ABConfig().num_computed(n)})


def mask_of(indices: Any, n: int) -> tuple[bool, ...]:
    mask = [False] * n
    for i in indices:
        mask[int(i)] = True
    return tuple(mask)


def config_mask(config: abcore.ABConfig, steps: abcore.LinearSteps) -> tuple[bool, ...]:
    """Where `config` computes on the sampler's `steps` (a budget places its calls by their sensitivity)."""
    return tuple(bool(m) for m in abcore.schedule(config, steps=steps).forced)


def mask_config(mask: tuple[bool, ...]) -> abcore.ABConfig:
    return abcore.ABConfig(compute_mask=mask, order=ORDER, warmup=1, cooldown=0)


# ---------------------------------------------------------------------------------------------- the models


class Model:
    """A zoo model on an n-step grid: abscissa `grid` (n + 1), `steps` (LinearSteps), and `call(i, x)`."""

    def __init__(self, name: str, n: int) -> None:
        import torch
        from abcache_examples import models

        self.name, self.n, self.torch = name, n, torch
        self.flow = name in models.FLOW_MODELS
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.net = models.load_flow_model(name=name).eval()
            scheduler = FlowMatchEulerDiscreteScheduler(**models.FLOW_SCHEDULER_CONFIG)
            scheduler.set_timesteps(n)
            self.grid = scheduler.sigmas.double().numpy()
            self.t_model = scheduler.timesteps.float()  # sigma * 1000, as the pipeline passes it
            self.steps = abcore.LinearSteps.euler(self.grid)
            self.guidance, self.null = 3.0, models.NULL_CLASS
        else:
            from diffusers import DDIMScheduler

            self.net = models.load_eps_model(name=name).eval()
            base = models.V_SCHEDULER_CONFIG if name == "v" else models.EPS_SCHEDULER_CONFIG
            scheduler = DDIMScheduler.from_config({**base, "clip_sample": False})
            scheduler.set_timesteps(n)
            self.t_model = scheduler.timesteps.numpy().astype(int)
            alphas = scheduler.alphas_cumprod.double().numpy()
            ratio = scheduler.config.num_train_timesteps // n
            prev = [alphas[t - ratio] if t - ratio >= 0 else float(scheduler.final_alpha_cumprod) for t in self.t_model]
            abar = np.append(alphas[self.t_model], prev[-1])
            assert np.allclose(abar[1:-1], prev[:-1]), "DDIM grid: the previous timesteps are not the next ones"
            self.grid = abcore.lambda_from_alphas_cumprod(np.minimum(abar, 1 - 1e-12))
            prediction = scheduler.config.prediction_type
            self.steps = abcore.LinearSteps.ddim(np.sqrt(abar), np.sqrt(1 - abar), prediction)
        cfg = self.net.config
        self.shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.index = {float(v): i for i, v in enumerate(self.grid[:-1])}

    def start(self, seed: int, batch: int) -> tuple[np.ndarray, Any]:
        torch = self.torch
        x = torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(batch) % 10 if self.flow else None
        return x.double().numpy(), labels

    def call(self, i: int, x: np.ndarray, labels: Any) -> np.ndarray:
        """The raw model output at step i, float32 (flow: (2, B, ...) cond and uncond stacked)."""
        torch = self.torch
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if self.flow:
                both = torch.cat([xt, xt])
                lab = torch.cat([labels, torch.full_like(labels, self.null)])
                t = self.t_model[i].expand(both.shape[0])
                out = self.net(both, timestep=t, class_labels=lab).sample
                return out.reshape(2, *x.shape).numpy()
            return self.net(xt, int(self.t_model[i])).sample.numpy()

    def step(self, i: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.flow:  # Euler on the guided velocity (a = 1, b = sigma_{i+1} - sigma_i)
            guided = out[1] + self.guidance * (out[0] - out[1])
            return x + float(self.steps.b[i]) * guided
        return self.steps.apply(i, x, out)


class Context:
    """One (model, n, seed, batch): the noise, the memoised model, and the full reference."""

    def __init__(self, model: Model, seed: int, batch: int) -> None:
        self.model, self.seed, self.batch = model, seed, batch
        self.x0, self.labels = model.start(seed, batch)
        self.memo: collections.OrderedDict[tuple[int, bytes], np.ndarray] = collections.OrderedDict()
        self.memo_bytes = 0
        self.calls = 0  # real model calls (memo misses)
        full = abcore.sample(self.model_fn, self.x0, model.grid, self.step_fn, abcore.ABConfig(interval=1, cooldown=0))
        self.full_x = full.x
        self.full_outputs = np.stack(full.outputs)  # (n, ...) the raw outputs: nothing is corrected

    def call(self, i: int, x: np.ndarray) -> np.ndarray:
        key = (i, hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest())
        out = self.memo.get(key)
        if out is None:
            out = self.model.call(i, x, self.labels)
            self.calls += 1
            self.memo[key] = out
            self.memo_bytes += out.nbytes
            while self.memo_bytes > MEMO_BYTES:
                self.memo_bytes -= self.memo.popitem(last=False)[1].nbytes
        else:
            self.memo.move_to_end(key)
        return out.astype(np.float64)

    def model_fn(self, x: np.ndarray, t: float) -> np.ndarray:
        return self.call(self.model.index[t], x)

    def step_fn(self, x: np.ndarray, out: np.ndarray, t: float, t_next: float) -> np.ndarray:
        return self.model.step(self.model.index[t], x, out)

    def run(self, config: abcore.ABConfig, weights: Any = None) -> tuple[float, np.ndarray]:
        """(PSNR against the full sampler, computed mask) of `abcore.sample` with `config` and the LinearSteps
        (`weights`: learned prediction weights, `abcore.fit_weights`)."""
        traj = abcore.sample(
            self.model_fn, self.x0, self.model.grid, self.step_fn, config, steps=self.model.steps, weights=weights
        )
        return psnr(traj.x, self.full_x), np.asarray(traj.computed)


# ------------------------------------------------------------- an independent loop: the check of abcore's


def lagrange_weights(t: np.ndarray, j: int, history: list[int]) -> np.ndarray:
    """abcore's prediction weights at step j over the stored steps `history` (newest first)."""
    return extrapolation_weights(t[history], float(t[j]))


def masked_loop(
    call: Any,
    step: Any,
    x: np.ndarray,
    t: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    mask: tuple[bool, ...],
    weights: Any,
    correct: bool,
    order: int = ORDER,
) -> np.ndarray:
    """A sampler with the compute mask `mask`, predicted outputs sum_i weights(j, history)_i H_i (history newest
    first, at most `order` computed outputs), and optionally abcore's correction at the computed step after a run of
    predicted steps: out_n = f_n + (a_n/b_n) sum_j s_j (f~_j - f^_j), s_j = b_j prod_{l=j+1}^{n-1} a_l, f~_j the
    Lagrange interpolant through f_n and the stored outputs at t_j, f^_j the output used at step j.
    call(i, x) -> f; step(i, x, out) -> x_{i+1}. Returns the final state."""
    hist: list[int] = []
    outs: list[np.ndarray] = []
    pending: list[list[Any]] = []  # [j, f^_j, s_j]
    for i in range(len(mask)):
        if mask[i]:
            f = call(i, x)
            out = f
            if correct and pending:
                nodes = t[[i, *hist]]
                total = 0.0
                for j, fhat, s in pending:
                    w = extrapolation_weights(nodes, float(t[j]))
                    ftilde = sum(float(wl) * h for wl, h in zip(w, [f, *outs]))
                    total = total + s * (ftilde - fhat)
                out = f + (float(a[i]) / float(b[i])) * total
            hist, outs, pending = [i, *hist][:order], [f, *outs][:order], []
        else:
            w = weights(i, hist)
            out = sum(float(wl) * h for wl, h in zip(w, outs))
            for p in pending:
                p[2] *= float(a[i])
            pending.append([i, out, float(b[i])])
        x = step(i, x, out)
    return x


def check_learned_loop(trials: int = 20, seed: int = 0) -> float:
    """`masked_loop` with the Lagrange weights reproduces `abcore.sample(ABConfig(compute_mask=mask, order=2,
    warmup=1, cooldown=0))` on a random "model" and random linear steps, with and without the correction; with
    random weights it reproduces abcore's learned-weights opt-in (`abcore.sample(..., weights=...)`)."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for trial in range(trials):
        n, dim = int(rng.integers(4, 30)), 6
        t = np.sort(rng.uniform(0, 5, n + 1))[::-1].copy() if trial % 2 else np.cumsum(rng.uniform(0.1, 1, n + 1))
        steps = abcore.LinearSteps(rng.uniform(0.8, 1.2, n), rng.uniform(-0.3, 0.3, n) + 0.05)
        mats = rng.normal(size=(n, dim, dim)) / np.sqrt(dim)
        bias = rng.normal(size=(n, dim))
        index = {float(v): i for i, v in enumerate(t[:-1])}
        x0 = rng.normal(size=(3, dim))
        calls = int(rng.integers(1, n + 1))
        mask = mask_of({0, *rng.choice(np.arange(1, n), calls - 1, replace=False).tolist()}, n)

        def call(i: int, x: np.ndarray, mats: np.ndarray = mats, bias: np.ndarray = bias) -> np.ndarray:
            return np.tanh(x @ mats[i].T + bias[i])

        def step(i: int, x: np.ndarray, out: np.ndarray, steps: abcore.LinearSteps = steps) -> np.ndarray:
            return steps.apply(i, x, out)

        for correct in (False, True):
            ref = abcore.sample(
                lambda x, ti, call=call, index=index: call(index[ti], x),
                x0,
                t,
                None,
                abcore.ABConfig(compute_mask=mask, order=ORDER, warmup=1, cooldown=0, correct=correct),
                steps=steps,
            ).x
            mine = masked_loop(
                call, step, x0, t, steps.a, steps.b, mask, lambda j, h, t=t: lagrange_weights(t, j, h), correct
            )
            err = float(np.max(np.abs(mine - ref)) / max(1.0, float(np.max(np.abs(ref)))))
            worst = max(worst, err)
            assert err < 1e-10, f"trial {trial} correct={correct}: masked_loop differs from abcore.sample by {err}"
            # random learned weights: this loop against abcore's opt-in (`abcore.sample(weights=...)`)
            table = rng.normal(size=(n, ORDER))
            config = abcore.ABConfig(compute_mask=mask, order=ORDER, warmup=1, cooldown=0, correct=correct)
            ref = abcore.sample(
                lambda x, ti, call=call, index=index: call(index[ti], x),
                x0,
                t,
                None,
                config,
                steps=steps,
                weights=table,
            ).x
            mine = masked_loop(call, step, x0, t, steps.a, steps.b, mask, lambda j, h, w=table: w[j][: len(h)], correct)
            err = float(np.max(np.abs(mine - ref)) / max(1.0, float(np.max(np.abs(ref)))))
            worst = max(worst, err)
            assert err < 1e-10, f"trial {trial} correct={correct}: learned weights differ from abcore's by {err}"
    return worst


# ---------------------------------------------------------------------------------------------- the search


def search_mask(
    score: Any, start: tuple[bool, ...], evals: int, rng: np.random.Generator, log: Any = None
) -> tuple[tuple[bool, ...], float, int]:
    """Simulated annealing (~70% of `evals`, temperature 1 dB -> 0.02 dB) from `start`, then hill climbing with
    single-step moves +-1 / +-2. score(mask) -> PSNR (maximised); each new mask costs one evaluation.
    Returns (best mask, its score, evaluations used)."""
    n = len(start)
    cache: dict[tuple[bool, ...], float] = {}

    def value(mask: tuple[bool, ...]) -> float:
        if mask not in cache:
            cache[mask] = score(mask)
        return cache[mask]

    current, cur = start, value(start)
    best, best_value = current, cur
    sa_evals = int(0.7 * evals)
    t_hi, t_lo = 1.0, 0.02
    tries = 0
    while len(cache) < sa_evals and tries < 20 * evals:
        tries += 1
        on = [i for i in range(1, n) if current[i]]
        off = [i for i in range(1, n) if not current[i]]
        if not on or not off:
            break
        p = int(rng.choice(on))
        near = [q for q in off if 0 < abs(q - p) <= 3]
        q = int(rng.choice(near)) if near and rng.random() < 0.75 else int(rng.choice(off))
        cand = list(current)
        cand[p], cand[q] = False, True
        cand_t = tuple(cand)
        fresh = cand_t not in cache
        v = value(cand_t)
        if fresh and log:
            log(len(cache), v)
        temp = t_hi * (t_lo / t_hi) ** min(1.0, len(cache) / max(sa_evals, 1))
        if v >= cur or rng.random() < math.exp((v - cur) / temp):
            current, cur = cand_t, v
        if v > best_value:
            best, best_value = cand_t, v
    current, cur = best, best_value
    improved = True
    while improved and len(cache) < evals:
        improved = False
        on = [i for i in range(1, n) if current[i]]
        moves = [(p, p + d) for p in on for d in (-2, -1, 1, 2) if 0 < p + d < n and not current[p + d]]
        rng.shuffle(moves)
        for p, q in moves:
            if len(cache) >= evals:
                break
            cand = list(current)
            cand[p], cand[q] = False, True
            v = value(tuple(cand))
            if v > cur:
                current, cur, improved = tuple(cand), v, True
                break
    return current, cur, len(cache)


# ---------------------------------------------------------------------------------------------- the benchmark


def indices(mask: Any) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.asarray(mask))]


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        label = row["method"] + (f" tol {row['tolerance']}" if row.get("tolerance") is not None else "")
        print(
            f"{row['model']:<8} n {row['steps']:>2} {label:<22} budget {row['budget']!s:>4} seed {row['seed']:>2} "
            f"calls {row['calls']:>3} psnr {row['psnr']:6.2f}  ({row['seconds']:.1f}s)",
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))

    for name in args.models:
        for n in args.steps:
            run_one(name, n, args, emit)
    return rows


def run_one(name: str, n: int, args: argparse.Namespace, emit: Any) -> None:
    """Every method and budget on model `name` with n steps; `emit(row)` records each row."""
    start_mn = time.perf_counter()
    model = Model(name, n)
    contexts = [Context(model, seed, args.batch) for seed in args.seeds]
    calibs = [Context(model, seed, args.calib_batch) for seed in args.calib_seeds]
    base = {"model": name, "steps": n}

    def evaluate(method: str, budget: Any, runner: Any, mask: Any = None, **extra: Any) -> None:
        for ctx in contexts:
            t0 = time.perf_counter()
            value, computed = runner(ctx)
            emit(
                {
                    **base,
                    "method": method,
                    "budget": budget,
                    "seed": ctx.seed,
                    "calls": int(np.sum(computed)),
                    "psnr": value,
                    "mask": indices(computed) if mask is not None else None,
                    "seconds": time.perf_counter() - t0,
                    **extra,
                }
            )

    if "default" in args.methods:
        config = abcore.ABConfig()
        evaluate("default", config.num_computed(n), lambda ctx, c=config: ctx.run(c))
        config = abcore.ABConfig(interval=5)  # the default before the budget (issue 20)
        evaluate("interval 5", config.num_computed(n), lambda ctx, c=config: ctx.run(c))
    if "adaptive" in args.methods:
        for tol, most in ADAPTIVE:
            config = abcore.ABConfig(tolerance=tol, max_predicted=most)
            label = "adaptive" if most is None else f"adaptive, <= {most} in a row"
            evaluate(label, None, lambda ctx, c=config: ctx.run(c), tolerance=tol)
    for calls in budgets(n):
        budget_mask = config_mask(abcore.ABConfig(calls=calls, **BUDGET_VARIANTS[0][1]), model.steps)
        if "budget" in args.methods:
            for label, kwargs in BUDGET_VARIANTS:
                config = abcore.ABConfig(calls=calls, **kwargs)
                evaluate(label, calls, lambda ctx, c=config: ctx.run(c), mask=True)
        if "searched" in args.methods:
            t0 = time.perf_counter()
            misses = sum(c.calls for c in calibs)

            def score(mask: tuple[bool, ...]) -> float:
                return float(np.mean([c.run(mask_config(mask))[0] for c in calibs]))

            rng = np.random.default_rng(1000 * n + calls)
            found, value, used = search_mask(score, budget_mask, args.search_evals, rng)
            misses = sum(c.calls for c in calibs) - misses
            print(
                f"{name:<8} n {n:>2} searched budget {calls}: {used} masks, calib psnr "
                f"{score(budget_mask):.2f} -> {value:.2f}, {misses} model calls, "
                f"{time.perf_counter() - t0:.1f}s; mask {indices(found)}",
                flush=True,
            )
            config = mask_config(found)
            evaluate("searched", calls, lambda ctx, c=config: ctx.run(c), mask=True, calib_psnr=value)
        if "learned" in args.methods:
            config = mask_config(budget_mask)  # abcore's opt-in, fitted on the calibration runs' full trajectories
            learned = abcore.fit_weights(
                abcore.schedule(config, model.grid[:-1], model.steps), np.stack([c.full_outputs for c in calibs])
            )
            for label, correct in (("learned", False), ("learned+correction", True)):
                config = dataclasses.replace(mask_config(budget_mask), correct=correct)
                evaluate(label, calls, lambda ctx, c=config, w=learned: ctx.run(c, w), mask=True)
    calls_made = sum(c.calls for c in contexts + calibs)
    print(f"== {name} n {n}: {time.perf_counter() - start_mn:.1f}s, {calls_made} model calls", flush=True)


# ---------------------------------------------------------------------------------------------- the report


def summary(path: str) -> str:
    """The compact tables of BENCHMARKS.md: mean PSNR over the evaluation seeds (min..max), per model and step count."""
    rows = json.loads(Path(path).read_text())
    cell: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        cell[row["model"], row["steps"], row["method"], row["budget"], row.get("tolerance")].append(row)

    def psnr_of(key: tuple, spread: bool = False) -> str:
        values = [r["psnr"] for r in cell.get(key, [])]
        if not values:
            return "-"
        text = f"{np.mean(values):.1f}"
        return text + (f" ({min(values):.1f}..{max(values):.1f})" if spread else "")

    models = list(dict.fromkeys(r["model"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    out = [
        "| model | steps | default: calls (speedup) | default dB | interval 5 (previous default) dB |",
        "|---|---|---|---|---|",
    ]
    for model in models:
        for n in steps:
            calls = next((k[3] for k in cell if k[:3] == (model, n, "default")), None)
            if calls is not None:
                out.append(
                    f"| {model} | {n} | {calls} ({n / calls:.1f}x) | {psnr_of((model, n, 'default', calls, None), True)} "
                    f"| {psnr_of((model, n, 'interval 5', calls, None), True)} |"
                )
    out += [
        "",
        "| model | steps | calls (speedup) | budget `calls=N` | searched mask (BudCache-style) | learned weights "
        "(L2P-style) | learned + our correction |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for n in steps:
            for calls in sorted({k[3] for k in cell if k[:3] == (model, n, "budget")}):
                values = [psnr_of((model, n, m, calls, None)) for m in ("budget", "searched", "learned")]
                values.append(psnr_of((model, n, "learned+correction", calls, None)))
                out.append(f"| {model} | {n} | {calls} ({n / calls:.1f}x) | " + " | ".join(values) + " |")
    out += ["", "| model | steps | adaptive (state test) | tolerance: calls, dB |", "|---|---|---|---|"]
    for model in models:
        for n in steps:
            for method in sorted({k[2] for k in cell if k[:2] == (model, n) and k[2].startswith("adaptive")}):
                keys = sorted((k for k in cell if k[:3] == (model, n, method)), key=lambda k: k[4])
                items = [f"{k[4]}: {max(r['calls'] for r in cell[k])}, {psnr_of(k)}" for k in keys]
                limit = "at most 4 in a row" if method == "adaptive" else method.split(", ", 1)[1]
                out.append(f"| {model} | {n} | {limit} | " + "; ".join(items) + " |")
    return "\n".join(out)


def report(path: str, out: str | None = None) -> str:
    rows = json.loads(Path(path).read_text())
    groups: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        key = (row["model"], row["steps"], row["method"], row["budget"], row.get("tolerance"))
        groups[key].append(row)
    lines = []
    for model, n in dict.fromkeys((r["model"], r["steps"]) for r in rows):
        lines += [
            "",
            f"### {model}, {n} steps",
            "",
            "| method | budget | calls | PSNR dB | min..max | seeds |",
            "|---|---|---|---|---|---|",
        ]
        keys = [k for k in groups if k[:2] == (model, n)]
        keys.sort(key=lambda k: (k[2], k[3] or 0, k[4] or 0))
        for key in keys:
            values = [r["psnr"] for r in groups[key]]
            method = key[2] + (f" tol {key[4]}" if key[4] is not None else "")
            budget = "" if key[3] is None else key[3]
            calls = max(r["calls"] for r in groups[key])
            lines.append(
                f"| {method} | {budget} | {calls} | {np.mean(values):.2f} | {min(values):.2f}..{max(values):.2f} "
                f"| {len(values)} |"
            )
    text = "\n".join(lines)
    if out:
        Path(out).write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no Pareto plots", file=sys.stderr)
        return text
    for n in sorted({r["steps"] for r in rows}):
        names = list(dict.fromkeys(r["model"] for r in rows if r["steps"] == n))
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
        for ax, model in zip(axes[0], names):
            methods = dict.fromkeys(k[2] for k in groups if k[:2] == (model, n))
            for method in methods:
                points = sorted(
                    (np.mean([r["calls"] for r in g]), np.mean([r["psnr"] for r in g]))
                    for k, g in groups.items()
                    if k[:3] == (model, n, method)
                )
                ax.plot(*zip(*points), marker="o", label=method)
            ax.set_title(f"{model}, {n} steps")
            ax.set_xlabel("calls per image and branch")
            ax.set_ylabel("mean PSNR vs full (dB)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        RESULTS.mkdir(parents=True, exist_ok=True)
        fig.savefig(RESULTS / f"budget_pareto_{n}.png", dpi=100)
        plt.close(fig)
        print(f"wrote {RESULTS / f'budget_pareto_{n}.png'}", file=sys.stderr)
    return text


def main() -> None:
    from abcache_examples.models import FLOW_MODELS, UNET_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*FLOW_MODELS, *UNET_MODELS])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 28, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[10])
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--search-evals", type=int, default=120)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default=str(RESULTS / "budget.json"))
    parser.add_argument("--report", metavar="FILE", help="write the markdown tables of --out to FILE (and plots)")
    parser.add_argument(
        "--selfcheck",
        action="store_true",
        help="check abcore.sample (and its learned weights) against an independent loop",
    )
    args = parser.parse_args()
    if args.selfcheck:
        print(f"check_learned_loop: ok, worst relative difference {check_learned_loop():.2e}")
        return
    if args.report:
        report(args.out, args.report)
        text = summary(args.out)
        (RESULTS / "budget_summary.md").write_text(text + "\n")  # `nox -s bench` puts it into BENCHMARKS.md
        print(text)
        return
    start = time.perf_counter()
    benchmark(args)
    print(f"total {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
