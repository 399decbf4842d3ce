"""`nox -s bench`: AB-Cache against every alternative on the shipped models; writes BENCHMARKS.md and a Pareto plot.

All methods start from the same noise and labels as the full 50-step sampler and are scored against it (PSNR,
SSIM), against the real digits (Frechet distance of classifier features) and against the requested class
(accuracy). Wall-clock ratios are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache
from abcache_diffusers.demo.compare import (
    STEPS,
    EpsSetup,
    FlowSetup,
    Run,
    Scorer,
    Setup,
    count_calls,
    diffusers_cache,
    magcache_ratios,
)

FLOW_TARGET_NFE = 18


def _flow_schedulers(pipe: Any) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    shift = pipe.scheduler.config.shift
    common = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    return {
        "DPM-Solver++(2M)": DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common),
        "UniPC": UniPCMultistepScheduler(solver_order=2, **common),
    }


def flow_methods(setup: FlowSetup, quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    orders, intervals = ((1, 2, 3), (2, 3, 4)) if quick else ((1, 2, 3, 4), (2, 3, 4, 5, 6))
    nfes = (13, 18) if quick else (10, 13, 18, 25)
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for i in (*intervals, 8):  # the default: the last 4 steps computed, predicted steps corrected
        family = "AB-Cache order 2, last 4 computed, corrected"
        jobs.append((f"{family}, interval {i}", family, {"cache": ABCacheConfig(interval=i)}))
    for k in orders:
        family = "reuse (order 1)" if k == 1 else f"AB-Cache order {k}, no tail"
        for i in intervals:
            cache = ABCacheConfig(order=k, interval=i, warmup=max(2, k), cooldown=0, correct=False)
            jobs.append((f"{family}, interval {i}", family, {"cache": cache}))
    for i in intervals:  # the same extrapolation on the step index, as the peers do
        cache = ABCacheConfig(order=2, interval=i, warmup=2, cooldown=0, correct=False, abscissa="index")
        family = "order 2 on the step index (not AB-Cache's default)"
        jobs.append((f"{family}, interval {i}", family, {"cache": cache}))
    for most in (3, 5):
        for tol in (0.05, 0.1) if quick else (0.02, 0.05, 0.1, 0.15, 0.2):
            cache = ABCacheConfig(order=2, interval=most + 1, warmup=2, cooldown=0, correct=False, tolerance=tol)
            family = f"AB-Cache adaptive (order 2, <= {most} predicted in a row)"
            jobs.append((f"{family}, tol {tol}", family, {"cache": cache}))
    for k in (2, 3):
        for i in intervals:
            cache = ABCacheConfig(order=k, interval=i, warmup=max(2, k), cooldown=0, predictor="binomial")
            family = f"paper Eq. 3.6 binomial, order {k}"
            jobs.append((f"{family}, interval {i}", family, {"cache": cache}))
    for n in nfes:
        jobs.append((f"Euler, {n} steps", "Euler, fewer steps", {"steps": n}))
        for name, scheduler in _flow_schedulers(setup.pipe).items():
            jobs.append((f"{name}, {n} steps", name, {"steps": n, "scheduler": scheduler}))
    for i in (2, 3, 4) if quick else (2, 3, 4, 5):
        # its default identifiers ("...attn") do not fullmatch DiT's "attn1": cache whole blocks instead
        taylor = TaylorSeerCacheConfig(
            cache_interval=i,
            disable_cache_before_step=2,
            max_order=1,
            cache_identifiers=[r"transformer_blocks\.\d+"],
            taylor_factors_dtype=torch.float32,
        )
        jobs.append((f"TaylorSeer, interval {i}", "diffusers TaylorSeer", {"apply": diffusers_cache(taylor)}))
    for thr in (0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.4):
        fbc = FirstBlockCacheConfig(threshold=thr)
        jobs.append((f"FirstBlockCache, threshold {thr}", "diffusers FirstBlockCache", {"apply": diffusers_cache(fbc)}))
    ratios = magcache_ratios(setup)
    for thr in (0.1, 0.3) if quick else (0.06, 0.12, 0.24, 0.48):
        mag = MagCacheConfig(threshold=thr, max_skip_steps=5, num_inference_steps=STEPS, mag_ratios=ratios)
        jobs.append((f"MagCache, threshold {thr}", "diffusers MagCache", {"apply": diffusers_cache(mag)}))
    return jobs


def eps_methods(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    intervals = (2, 3, 4) if quick else (2, 3, 4, 5, 6)
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for k in (1, 2, 3):
        family = "reuse (order 1)" if k == 1 else f"AB-Cache order {k} (eps on lambda)"
        for i in intervals:
            cache = ABCacheConfig(order=k, interval=i, warmup=max(2, k), cooldown=0)
            jobs.append((f"{family}, interval {i}", family, {"cache": cache}))
    for k in (2, 3):
        cache = ABCacheConfig(order=k, interval=3, warmup=max(2, k), cooldown=0, weighting="exp-eps")
        family = f"paper exp. weighting e^-lambda eps, order {k}"
        jobs.append((f"{family}, interval 3", family, {"cache": cache}))
        cache = ABCacheConfig(order=k, interval=3, warmup=max(2, k), cooldown=0, predictor="binomial")
        family = f"paper Eq. 3.6 binomial, order {k}"
        jobs.append((f"{family}, interval 3", family, {"cache": cache}))
    for n in (13, 18) if quick else (10, 13, 18, 25):
        jobs.append((f"DDIM, {n} steps", "DDIM, fewer steps", {"steps": n}))
    return jobs


def _fmt(run: Run) -> str:
    s = run.scores
    acc = f"{s['accuracy']:.2f}" if "accuracy" in s else ""
    psnr = "ref" if not np.isfinite(s["psnr"]) else f"{s['psnr']:.1f}"
    return f"| {run.method} | {run.nfe:g} | {psnr} | {s['ssim']:.4f} | {s['fd']:.2f} | {acc} |"


def _table(runs: list[Run]) -> list[str]:
    lines = ["| method | NFE | PSNR dB | SSIM | FD | acc |", "|---|---|---|---|---|---|"]
    return lines + [_fmt(r) for r in sorted(runs, key=lambda r: (r.family, -r.nfe, r.method))]


def _pareto(runs: dict[str, list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5))
    for ax, (title, group) in zip(np.atleast_1d(axes), runs.items(), strict=True):
        families: dict[str, list[Run]] = {}
        for run in group:
            if np.isfinite(run.scores["psnr"]):
                families.setdefault(run.family, []).append(run)
        for family, members in sorted(families.items()):
            members.sort(key=lambda r: r.nfe)
            style = "-o" if family.startswith("AB-Cache") else "--x"
            ax.plot([r.nfe for r in members], [r.scores["psnr"] for r in members], style, label=family)
        ax.set_xlabel("NFE (denoiser evaluations per image and branch)")
        ax.set_ylabel("PSNR against the full 50-step sampler (dB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _timing(setup: FlowSetup, repeats: int) -> dict[str, float]:
    """Full vs default AB-Cache wall clock, alternated; per-call and per-predicted-step times."""
    full, cached = [], []
    default = ABCacheConfig()
    for _ in range(repeats):
        full.append(setup.run("full", "timing").seconds)
        cached.append(setup.run("ab", "timing", cache=default).seconds)
    call, pred = _step_times(setup, default)
    nfe = default.to_ab_config().num_computed(STEPS)
    return {
        "full_s": statistics.median(full),
        "ab_s": statistics.median(cached),
        "ratio": statistics.median(full) / statistics.median(cached),
        "ideal": STEPS / nfe,
        "nfe": nfe,
        "call_ms": call * 1e3,
        "pred_ms": pred * 1e3,
        "history_bytes": 2 * default.order * setup.latents.numel() * setup.latents.element_size(),
    }


def _step_times(setup: FlowSetup, config: ABCacheConfig) -> tuple[float, float]:
    """Median time of a denoiser call that computes, and of one that is predicted, through the hook."""
    module = setup.denoiser
    enable_ab_cache(setup.pipe, config)
    hooked = module.forward
    computed: list[float] = []
    predicted: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        before = calls[0]
        start = time.perf_counter()
        out = hooked(*args, **kwargs)
        (computed if calls[0] > before else predicted).append(time.perf_counter() - start)
        return out

    module.forward = timed
    try:
        with count_calls(module) as calls:
            setup._call(STEPS)
    finally:
        del module.forward
        disable_ab_cache(setup.pipe)
    return statistics.median(computed), statistics.median(predicted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abcache_diffusers.bench", description=__doc__)
    parser.add_argument("--batch", type=int, default=100, help="images per run (default 100)")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (for tests)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where BENCHMARKS.md and the plot go")
    parser.add_argument("--gpu-json", type=Path, default=Path("benchmarks/gpu_flux.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    started = time.time()
    scorer = Scorer()
    flow, eps = FlowSetup(args.batch, seed=0), EpsSetup(args.batch, seed=0)

    results: dict[str, list[Run]] = {}
    noise: dict[str, list[float]] = {}
    setups: list[tuple[Setup, list[tuple[str, str, dict[str, Any]]]]] = [
        (flow, flow_methods(flow, args.quick)),
        (eps, eps_methods(args.quick)),
    ]
    for setup, jobs in setups:
        labels = flow.labels if setup is flow else None
        reference = setup.run(f"full {STEPS} steps", "full")
        scorer.score(reference, reference, labels)
        group = [reference]
        # run-to-run noise of the full sampler: other seeds, same labels
        fds = [reference.scores["fd"]]
        for seed in range(1, 3 if args.quick else 5):
            setup.reseed(seed)
            fds.append(scorer.score(setup.run("full", "full"), reference, labels).scores["fd"])
        setup.reseed(0)
        noise[setup.name] = fds
        for i, (method, family, kwargs) in enumerate(jobs, 1):
            print(f"[{setup.name} {i}/{len(jobs)}] {method}", file=sys.stderr, flush=True)
            group.append(scorer.score(setup.run(method, family, **kwargs), reference, labels))
        results[setup.name] = group
    timing = _timing(flow, 2 if args.quick else 3)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot = args.out_dir / "benchmarks" / "pareto.png"
    plot.parent.mkdir(exist_ok=True)
    _pareto(
        {"flow DiT, 50 Euler steps, shifted grid, CFG 3": results["flow"], "eps UNet, DDIM 50": results["eps"]}, plot
    )
    report = render(args, results, noise, timing, time.time() - started, plot)
    (args.out_dir / "BENCHMARKS.md").write_text(report)
    print(report)
    return 0


def _matched(family: str) -> Callable[[Run], bool]:
    return lambda r: r.family == family and r.nfe <= FLOW_TARGET_NFE


def _best(runs: list[Run], predicate: Callable[[Run], bool]) -> Run | None:
    chosen = [r for r in runs if predicate(r) and np.isfinite(r.scores["psnr"])]
    return max(chosen, key=lambda r: r.scores["psnr"]) if chosen else None


def render(
    args: Any,
    results: dict[str, list[Run]],
    noise: dict[str, list[float]],
    timing: dict[str, float],
    seconds: float,
    plot: Path,
) -> str:
    flow, eps = results["flow"], results["eps"]
    ours = _best(flow, lambda r: r.family.startswith("AB-Cache") and r.nfe <= FLOW_TARGET_NFE)
    rivals = []
    for family in sorted(
        {r.family for r in flow if not r.family.startswith(("AB-Cache", "full", "order 2 on the step index"))}
    ):
        best = _best(flow, _matched(family))
        if best is not None:
            rivals.append(best)
    fd_lo, fd_hi = min(noise["flow"]), max(noise["flow"])
    default = next(r for r in eps if r.method.startswith("AB-Cache order 2") and r.method.endswith("interval 3"))
    ddim18: Run | None = next((r for r in eps if r.method == "DDIM, 18 steps"), None)
    exp = [r for r in eps if r.family.startswith("paper exp")]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `nox -s bench` (`python -m abcache_diffusers.bench --batch {args.batch}"
        f"{' --quick' if args.quick else ''}`). Date: {datetime.date.today().isoformat()}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}), "
        f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; took {seconds / 60:.1f} min.",
        "",
        f"Shipped models (see `packages/abcache-diffusers/src/abcache_diffusers/demo/weights/README.md`), "
        f"{args.batch} images per run from the same noise and labels as the full {STEPS}-step sampler. "
        "NFE: full denoiser evaluations per image and guidance branch (calls of the denoiser's last block). "
        "PSNR / SSIM: against the full sampler. FD: Frechet distance of the shipped classifier's penultimate "
        "features to the real digits. acc: classifier accuracy on the requested class.",
        "",
        f"![PSNR against NFE]({plot.relative_to(args.out_dir).as_posix()})",
        "",
        "## Targets",
        "",
    ]
    if ours is not None:
        margin = min((ours.scores["psnr"] - r.scores["psnr"] for r in rivals), default=float("inf"))
        best_rival = max(rivals, key=lambda r: r.scores["psnr"]) if rivals else None
        lines.append(
            f"- Flow, NFE <= {FLOW_TARGET_NFE}: best AB-Cache `{ours.method}` at {ours.scores['psnr']:.1f} dB; best "
            f"NFE-matched alternative `{best_rival.method if best_rival else '-'}` at "
            f"{best_rival.scores['psnr'] if best_rival else float('nan'):.1f} dB: margin {margin:.1f} dB "
            f"(target >= 5 dB: {'met' if margin >= 5 else 'MISSED'})."
        )
        lines.append(
            f"- Flow FD: AB-Cache {ours.scores['fd']:.2f}; full sampler over {len(noise['flow'])} seeds "
            f"{fd_lo:.2f} .. {fd_hi:.2f} (target: within that spread: "
            f"{'met' if fd_lo - 1e-9 <= ours.scores['fd'] <= fd_hi + 1e-9 else 'MISSED'})."
        )
    need = 0.95 * timing["ideal"]
    lines.append(
        f"- Wall clock (flow, default config, NFE {timing['nfe']}): full {timing['full_s']:.2f} s, AB-Cache "
        f"{timing['ab_s']:.2f} s, ratio {timing['ratio']:.2f}x against 0.95 x {timing['ideal']:.2f} = {need:.2f}x "
        f"({'met' if timing['ratio'] >= need else 'MISSED'})."
    )
    if ddim18 is not None:
        gap = default.scores["psnr"] - ddim18.scores["psnr"]
        lines.append(
            f"- Eps / DDIM 50, interval 3: default `{default.method}` {default.scores['psnr']:.1f} dB vs 18 DDIM "
            f"steps {ddim18.scores['psnr']:.1f} dB: +{gap:.1f} dB (target >= 8 dB: {'met' if gap >= 8 else 'MISSED'}); "
            "paper's exponential weighting: "
            + ", ".join(f"{r.method.split(', ', 1)[1]}: {r.scores['psnr']:.1f} dB" for r in exp)
            + f" ({'met' if all(default.scores['psnr'] > r.scores['psnr'] for r in exp) else 'MISSED'})."
        )
    lines += [
        "",
        "## Cost of a step (flow model, CPU)",
        "",
        f"- One denoiser call through the hook (computed step): {timing['call_ms']:.2f} ms; one predicted step "
        f"(extrapolation through the hook): {timing['pred_ms']:.3f} ms "
        f"({timing['pred_ms'] / timing['call_ms']:.1%} of a call).",
        f"- Memory held by the cache: {timing['history_bytes'] / 1024:.0f} KiB (2 guidance contexts x order 2 "
        "stored outputs; at most `order` outputs per context).",
        "",
    ]
    if not args.gpu_json.exists():
        lines += [
            "## GPU wall clock",
            "",
            f"Not measured in this run: `{args.gpu_json.as_posix()}` does not exist. `python benchmarks/gpu_flux.py "
            f"--out {args.gpu_json.as_posix()}` on a CUDA machine writes it (a large random-init FLUX transformer, "
            "bf16, full against AB-Cache), and the next `nox -s bench` reports it here.",
            "",
        ]
    else:
        import json

        gpu = json.loads(args.gpu_json.read_text())
        lines += [
            "## GPU wall clock (large random-init FLUX-architecture transformer)",
            "",
            f"From `{args.gpu_json.as_posix()}` (`python benchmarks/gpu_flux.py`, run once on a lent {gpu['gpu']}, "
            f"torch {gpu['torch']}): {gpu['params'] / 1e9:.2f} B parameters, bf16, {gpu['tokens']} image tokens, "
            f"{gpu['steps']} steps. Full {np.median(gpu['full_s']):.2f} s, AB-Cache (NFE {gpu['nfe_abcache']}) "
            f"{np.median(gpu['abcache_s']):.2f} s: **{gpu['speedup']:.2f}x** (ideal {gpu['ideal_speedup']:.2f}x). "
            f"One model call {gpu['model_call_ms']:.1f} ms, one predicted step {gpu['predicted_step_ms']:.3f} ms. "
            f"Peak memory above the weights: full {gpu['peak_extra_bytes_full'] / 2**20:.0f} MiB, AB-Cache "
            f"{gpu['peak_extra_bytes_abcache'] / 2**20:.0f} MiB.",
            "",
        ]
    lines += [
        "## Flow model (class-conditional DiT, rectified flow, 50 Euler steps, FLUX-like shift 3, true CFG 3.0)",
        "",
        f"Full-sampler FD over seeds: {', '.join(f'{v:.2f}' for v in noise['flow'])}.",
        "",
        *_table(flow),
        "",
        "## Eps model (UNet2DModel, eps prediction, DDIMPipeline 50 steps, cosine schedule)",
        "",
        f"Full-sampler FD over seeds: {', '.join(f'{v:.2f}' for v in noise['eps'])}.",
        "",
        *_table(eps),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
