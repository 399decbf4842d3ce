"""`nox -s bench`: AB-Cache against every peer on every zoo model; writes BENCHMARKS.md, Pareto plots, image strips.

Every run starts from the same noise (and labels) as the full 50-step sampler of the same model and seed and is
scored against it (PSNR, SSIM), against the real images (Frechet distance of the features of the model's classifier:
Fashion-MNIST's test split for `fashion`, the digits for the others) and against the requested class (accuracy).
Each method family runs a grid of its settings; at each budget (denoiser calls per image and guidance branch) the
table shows the family's best setting whose calls, on every seed, are within the budget. Wall-clock ratios are
measured side by side in one process, alternating the methods.

    python -m abcache_examples.bench [--models flow eps] [--seeds 0 1 2] [--batch 64] [--out-dir .]
    python -m abcache_examples.bench --render-only      # re-render from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from abcache_diffusers import ABCacheConfig

from abcache_examples.compare import (
    FAST_CONFIG,
    STEPS,
    FlowSetup,
    Run,
    Scorer,
    Setup,
    diffusers_cache,
    magcache_ratios,
    make_setup,
    save_rows,
    step_jitter,
)
from abcache_examples.models import FLOW_MODELS, UNET_MODELS

ZOO = (*FLOW_MODELS, *UNET_MODELS)
BUDGETS = (10, 13, 15, 18)
TAIL_LABEL = {0: "no tail", 1: "last step computed", 3: "last 3 computed", 4: "last 4 computed"}
DEFAULT_METHOD = "AB-Cache default (budget 5 + n // 5, placed by the sampler's sensitivity)"  # ABCacheConfig()
DEFAULT_FAMILY = "AB-Cache default budget"
PREVIOUS_METHOD = "AB-Cache fixed, last 4 computed, corrected, interval 5"  # ABCacheConfig(interval=5), the old default
FAST_METHOD = "AB-Cache fixed order 3, last 4 computed, corrected, interval 6"  # compare.FAST_CONFIG
MODEL_TITLES = {
    "fashion": "Fashion-MNIST flow DiT (28x28, patch 4), 50 Euler steps, shift 3, true CFG 3",
    "flow": "flow DiT (velocity, 3000 steps), 50 Euler steps, shift 3, true CFG 3",
    "flow_ema": "flow DiT trained 2x longer (EMA 0.9995), 50 Euler steps, shift 3, true CFG 3",
    "eps": "eps UNet, DDIM 50 (leading, no clipping), lambda abscissa",
    "v": "v-prediction UNet, DDIM 50 (leading, no clipping), lambda abscissa",
}
# Grids where the step sizes vary sharply (flow models): there, real-time and step-index spacing differ.
SHARP_GRIDS: dict[str, dict[str, Any]] = {
    "20 steps, shift 10": {"steps": 20, "scheduler": {"shift": 10.0}},
    "16 steps, Karras sigmas": {"steps": 16, "scheduler": {"shift": 3.0, "use_karras_sigmas": True}},
    "20 steps, custom two-speed sigmas": {
        "steps": 20,
        "scheduler": {"shift": 1.0},
        "sigmas": [*np.linspace(1.0, 0.6, 4), *np.linspace(0.5, 0.02, 16)],
    },
}


@dataclass
class Job:
    """One setting of one method family; `ours` marks AB-Cache rows (everything else is a peer)."""

    method: str
    family: str
    ours: bool
    kwargs: dict[str, Any] = field(default_factory=dict)


def fixed_calls(interval: int, cooldown: int, order: int = 2, steps: int = STEPS) -> int:
    config = ABCacheConfig(order=order, warmup=max(2, order), interval=interval, cooldown=cooldown)
    return config.to_ab_config().num_computed(steps)


def _intervals_for(cooldown: int, budgets: Iterable[int], order: int = 2) -> list[int]:
    """For each budget, the smallest interval whose fixed schedule computes at most that many steps."""
    chosen = set()
    for budget in budgets:
        fits = [i for i in range(2, 25) if fixed_calls(i, cooldown, order) <= budget]
        if fits:
            chosen.add(min(fits))
    return sorted(chosen)


def ab_jobs() -> list[Job]:
    # the default, a call budget of its own; the previous default ABCacheConfig(interval=5) is PREVIOUS_METHOD below
    jobs = [Job(DEFAULT_METHOD, DEFAULT_FAMILY, True, {"cache": ABCacheConfig()})]
    families = [(2, cooldown, correct) for cooldown in (0, 1, 3, 4) for correct in (False, True)]
    families += [(3, 3, True), (3, 4, True)]  # order 3 only pays with the tail and the correction
    for order, cooldown, correct in families:
        family = f"AB-Cache fixed{'' if order == 2 else f' order {order}'}, {TAIL_LABEL[cooldown]}"
        family += ", corrected" if correct else ""
        for i in _intervals_for(cooldown, (*BUDGETS, 11), order):
            cache = ABCacheConfig(order=order, warmup=max(2, order), interval=i, cooldown=cooldown, correct=correct)
            jobs.append(Job(f"{family}, interval {i}", family, True, {"cache": cache}))
    for cooldown, correct in ((0, False), (4, True)):
        family = f"AB-Cache adaptive, {TAIL_LABEL[cooldown]}" + (", corrected" if correct else "")
        for interval in (6, 12):
            for tol in (0.05, 0.1, 0.2, 0.3, 0.5):
                cache = ABCacheConfig(interval=interval, cooldown=cooldown, correct=correct, tolerance=tol)
                jobs.append(Job(f"{family}, tol {tol}, <= {interval - 1} in a row", family, True, {"cache": cache}))
    return jobs


def baseline_jobs(setup: Setup) -> list[Job]:
    """Reuse, the paper's Eq. 3.6 (and on eps models its exponential weighting) and fewer steps of other samplers."""
    jobs = []
    for cooldown in (0, 4):
        family = "reuse (order 1)" + ("" if cooldown == 0 else ", last 4 computed")
        for i in _intervals_for(cooldown, BUDGETS):
            cache = ABCacheConfig(order=1, interval=i, cooldown=cooldown, correct=False)
            jobs.append(Job(f"{family}, interval {i}", family, False, {"cache": cache}))
    family = "paper Eq. 3.6 binomial, order 2"
    for i in _intervals_for(0, BUDGETS):
        cache = ABCacheConfig(interval=i, cooldown=0, correct=False, predictor="binomial")
        jobs.append(Job(f"{family}, interval {i}", family, False, {"cache": cache}))
    if setup.default_scheduler.config.get("prediction_type") == "epsilon":
        family = "paper exp. weighting e^-lambda eps, order 2"
        for i in _intervals_for(0, BUDGETS):
            cache = ABCacheConfig(interval=i, cooldown=0, correct=False, weighting="exp-eps")
            jobs.append(Job(f"{family}, interval {i}", family, False, {"cache": cache}))
    base = "Euler" if isinstance(setup, FlowSetup) else "DDIM"
    for name, scheduler in {base: None, **_fewer_step_schedulers(setup)}.items():
        for n in BUDGETS:
            jobs.append(Job(f"{name}, {n} steps", f"{name}, fewer steps", False, {"steps": n, "scheduler": scheduler}))
    return jobs


def _fewer_step_schedulers(setup: Setup) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    config = setup.default_scheduler.config
    if isinstance(setup, FlowSetup):
        common = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": config.shift}
        return {
            "DPM-Solver++(2M)": DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common),
            "UniPC": UniPCMultistepScheduler(solver_order=2, **common),
        }
    return {
        "DPM-Solver++(2M)": DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
        "UniPC": UniPCMultistepScheduler.from_config(config, solver_order=2),
    }


def _image_latents(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
    """SeaCache's view of our 2-D latents: one ``(C, T=1, H, W)`` tensor per sample."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
        return None
    return [h.unsqueeze(1) for h in hidden.unbind(0)]


def block_cache_jobs(setup: FlowSetup) -> list[Job]:
    """diffusers' own caches on the DiT (they need a transformer block stack; the UNets have none)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    jobs = []
    for order in (1, 2):
        family = f"diffusers TaylorSeer, max_order {order}"
        for interval in (3, 4, 5, 6, 8, 10):
            for after in (None, STEPS - 4):
                taylor = TaylorSeerCacheConfig(
                    cache_interval=interval,
                    disable_cache_before_step=2,
                    disable_cache_after_step=after,
                    max_order=order,
                    # its default identifiers ("...attn") do not fullmatch DiT's "attn1": cache whole blocks
                    cache_identifiers=[r"transformer_blocks\.\d+"],
                    taylor_factors_dtype=torch.float32,
                )
                label = f"{family}, interval {interval}" + ("" if after is None else f", after step {after}")
                jobs.append(Job(label, family, False, {"apply": diffusers_cache(taylor)}))
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
        fbc = FirstBlockCacheConfig(threshold=threshold)
        label = f"diffusers FirstBlockCache, threshold {threshold}"
        jobs.append(Job(label, "diffusers FirstBlockCache", False, {"apply": diffusers_cache(fbc)}))
    ratios = magcache_ratios(setup)
    for threshold in (0.06, 0.12, 0.24, 0.48, 0.96):
        for skips in (3, 6):
            mag = MagCacheConfig(
                threshold=threshold, max_skip_steps=skips, num_inference_steps=STEPS, mag_ratios=ratios
            )
            label = f"diffusers MagCache (calibrated), threshold {threshold}, max skip {skips}"
            jobs.append(Job(label, "diffusers MagCache (calibrated)", False, {"apply": diffusers_cache(mag)}))
    try:
        from diffusers import SeaCacheConfig
    except ImportError:  # diffusers < 0.42
        return jobs
    for threshold in (0.1, 0.25, 0.5, 1.0, 2.0):
        for end, most in ((1, 2), (4, 0)):
            sea = SeaCacheConfig(
                threshold=threshold,
                cache_end_steps=end,
                max_consecutive_cached=most,
                raw_vision_callback=_image_latents,
            )
            label = f"diffusers SeaCache, threshold {threshold}, last {end} computed, max run {most or 'any'}"
            jobs.append(Job(label, "diffusers SeaCache", False, {"apply": diffusers_cache(sea)}))
    return jobs


def sharp_jobs(setup: FlowSetup) -> dict[str, tuple[dict[str, Any], list[Job]]]:
    """Per sharp grid: the full-sampler kwargs and AB-Cache on real time against the step index."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    grids = {}
    for grid, spec in SHARP_GRIDS.items():
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **spec["scheduler"])
        full = {"steps": spec["steps"], "scheduler": scheduler, "sigmas": spec.get("sigmas")}
        jobs = []
        for interval in (2, 3):
            for abscissa in ("sigma", "index"):
                for correct in (False, True):
                    cache = ABCacheConfig(interval=interval, cooldown=2, abscissa=abscissa, correct=correct)
                    family = f"order 2 on {'the real sigma' if abscissa == 'sigma' else 'the step index'}"
                    family += ", corrected" if correct else ""
                    jobs.append(
                        Job(f"{family}, interval {interval}", family, abscissa == "sigma", {**full, "cache": cache})
                    )
        grids[grid] = (full, jobs)
    return grids


def _record(run: Run, model: str, seed: int, section: str, job: Job | None) -> dict[str, Any]:
    return {
        "model": model,
        "seed": seed,
        "section": section,
        "method": run.method,
        "family": run.family,
        "ours": job.ours if job is not None else False,
        "nfe": run.nfe,
        "seconds": run.seconds,
        **{k: (None if not np.isfinite(v) else float(v)) for k, v in run.scores.items()},
    }


def _thin(jobs: list[Job]) -> list[Job]:
    """`--quick`: the first setting of each family, the default, the previous default and the fast preset."""
    seen: set[str] = set()
    kept = []
    for job in jobs:
        if job.family not in seen or job.method in (DEFAULT_METHOD, PREVIOUS_METHOD, FAST_METHOD):
            seen.add(job.family)
            kept.append(job)
    return kept


def run_model(model: str, seeds: list[int], batch: int, quick: bool = False) -> dict[str, Any]:
    """Every job on every seed of one zoo model; the images of the first seed are kept for the image strip."""
    setup = make_setup(model, batch)
    scorer = Scorer(model)
    labels = setup.labels if isinstance(setup, FlowSetup) else None
    jobs = ab_jobs() + baseline_jobs(setup) + (block_cache_jobs(setup) if isinstance(setup, FlowSetup) else [])
    grids = sharp_jobs(setup) if isinstance(setup, FlowSetup) else {}
    if quick:
        jobs = _thin(jobs)
        grids = {name: (full, _thin(grid_jobs)) for name, (full, grid_jobs) in list(grids.items())[:1]}
    # the main section on the setup's own grid, then each sharp grid: a full reference, then every job
    sections = [("main", {}, jobs), *((grid, full, grid_jobs) for grid, (full, grid_jobs) in grids.items())]
    records: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}
    for seed in seeds:
        setup.reseed(seed)
        for section, full, section_jobs in sections:
            name = f"full {STEPS} steps" if section == "main" else f"full, {section}"
            reference = setup.run(name, "full", **full)
            scorer.score(reference, reference, labels)
            records.append(_record(reference, model, seed, section, None))
            keep = seed == seeds[0] and section == "main"  # the image strip: the first seed's main runs
            if keep:
                images[reference.method] = reference.images[:10]
            for i, job in enumerate(section_jobs, 1):
                print(
                    f"[{model} seed {seed} {section} {i}/{len(section_jobs)}] {job.method}", file=sys.stderr, flush=True
                )
                run = scorer.score(setup.run(job.method, job.family, **job.kwargs), reference, labels)
                records.append(_record(run, model, seed, section, job))
                if keep:
                    images[job.method] = run.images[:10]
    setup.reseed(seeds[0])
    return {"records": records, "images": images, "jitter": step_jitter(setup)}


def timing(setup: Setup, repeats: int) -> dict[str, Any]:
    """Full, the default and the fast preset, alternated `repeats` times: medians and ratios to the full sampler."""
    configs = {"default": ABCacheConfig(), "fast": FAST_CONFIG}
    seconds: dict[str, list[float]] = {"full": [], **{name: [] for name in configs}}
    nfe = {}
    for _ in range(repeats):
        seconds["full"].append(setup.run("full", "timing").seconds)
        for name, config in configs.items():
            run = setup.run(name, "timing", cache=config)
            seconds[name].append(run.seconds)
            nfe[name] = run.nfe
    full = statistics.median(seconds["full"])
    out: dict[str, Any] = {"full_s": full, "repeats": repeats}
    for name in configs:
        median = statistics.median(seconds[name])
        out[name] = {"s": median, "nfe": nfe[name], "ratio": full / median, "bound": STEPS / nfe[name]}
    return out


# --------------------------------------------------------------------------------------------------- rendering


@dataclass
class Setting:
    """One method setting aggregated over seeds: mean PSNR and its spread, the most calls any seed needed."""

    model: str
    section: str
    method: str
    family: str
    ours: bool
    nfe: float
    psnr: float
    psnr_lo: float
    psnr_hi: float
    ssim: float
    fd: float
    accuracy: float | None
    seeds: int


def aggregate(records: list[dict[str, Any]]) -> list[Setting]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["family"] != "full":
            groups.setdefault((r["model"], r["section"], r["method"]), []).append(r)
    settings = []
    for (model, section, method), rs in groups.items():
        psnrs = [r["psnr"] if r["psnr"] is not None else -np.inf for r in rs]
        acc = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        settings.append(
            Setting(
                model,
                section,
                method,
                rs[0]["family"],
                rs[0]["ours"],
                max(r["nfe"] for r in rs),
                float(np.mean(psnrs)),
                float(min(psnrs)),
                float(max(psnrs)),
                float(np.mean([r["ssim"] for r in rs])),
                float(np.mean([r["fd"] for r in rs])),
                float(np.mean(acc)) if acc else None,
                len(rs),
            )
        )
    return settings


def best(settings: Iterable[Setting], budget: float) -> Setting | None:
    """The setting with the highest mean PSNR among those whose calls stay within `budget` on every seed."""
    chosen = [s for s in settings if s.nfe <= budget + 1e-9 and np.isfinite(s.psnr)]
    return max(chosen, key=lambda s: s.psnr) if chosen else None


def _psnr(s: Setting | None) -> str:
    if s is None:
        return "-"
    return f"{s.psnr:.1f} ({s.psnr_lo:.1f}..{s.psnr_hi:.1f})" if s.seeds > 1 else f"{s.psnr:.1f}"


def _families(settings: list[Setting]) -> list[str]:
    """The families of `settings`, AB-Cache's first, each group alphabetical."""
    return sorted({s.family for s in settings}, key=lambda f: (not f.startswith("AB-Cache"), f))


def _budget_table(settings: list[Setting]) -> list[str]:
    families = _families(settings)
    head = "| family | " + " | ".join(f"<= {b} calls" for b in BUDGETS) + " |"
    lines = [head, "|---|" + "---|" * len(BUDGETS)]
    for family in families:
        cells = []
        for b in BUDGETS:
            s = best([x for x in settings if x.family == family], b)
            cells.append("-" if s is None else f"{_psnr(s)} @ {s.nfe:g}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def _all_table(settings: list[Setting]) -> list[str]:
    lines = ["| method | calls | PSNR dB (seed spread) | SSIM | FD | acc |", "|---|---|---|---|---|---|"]
    for s in sorted(settings, key=lambda s: (not s.ours, s.family, -s.nfe, s.method)):
        acc = "" if s.accuracy is None else f"{s.accuracy:.2f}"
        lines.append(f"| {s.method} | {s.nfe:g} | {_psnr(s)} | {s.ssim:.4f} | {s.fd:.1f} | {acc} |")
    return lines


def targets(settings: list[Setting], timing_: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """Issue 11's targets on one model: (statement with the numbers, met)."""
    ours = [s for s in settings if s.ours]
    peers = [s for s in settings if not s.ours]
    out = []
    for b in (13, 15):
        a, p = best(ours, b), best(peers, b)
        if a is not None and p is not None:
            margin = a.psnr - p.psnr
            out.append(
                (
                    f"<= {b} calls: AB-Cache `{a.method}` {a.psnr:.1f} dB vs best peer `{p.method}` {p.psnr:.1f} dB: "
                    f"{margin:+.1f} dB (target >= +5 dB)",
                    margin >= 5,
                )
            )
    for b, need in ((13, 48), (11, 43), (10, 40)):
        a = best(ours, b)
        got = a.psnr if a is not None else float("nan")
        name = a.method if a is not None else "-"
        out.append((f"<= {b} calls: best AB-Cache `{name}` {got:.1f} dB (target >= {need} dB)", got >= need))
    default = next((s for s in ours if s.method == DEFAULT_METHOD), None)
    if default is not None:
        speedup = STEPS / default.nfe
        out.append(
            (
                f"default (budget 5 + n // 5, placed by the sampler's sensitivity): {default.nfe:g} calls = "
                f"{speedup:.2f}x, "
                f"{default.psnr:.1f} dB (target >= 3x and >= 48 dB)",
                speedup >= 3 and default.psnr >= 48,
            )
        )
    if timing_ is None:
        return out
    d = timing_["default"]
    out.append(
        (
            f"wall clock, default: {d['ratio']:.2f}x of the full sampler against the calls bound {d['bound']:.2f}x: "
            f"{d['ratio'] / d['bound']:.3f} of the bound (target >= 0.97)",
            d["ratio"] / d["bound"] >= 0.97,
        )
    )
    return out


def _pareto(model: str, settings: list[Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    families = _families(settings)
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for n, family in enumerate(families):
        members = sorted((s for s in settings if s.family == family and np.isfinite(s.psnr)), key=lambda s: s.nfe)
        front, top = [], -np.inf  # the family's Pareto front: each point beats every cheaper one
        for s in members:
            if s.psnr > top:
                front.append(s)
                top = s.psnr
        if not front:
            continue
        style = "-o" if family.startswith("AB-Cache") else "--x"
        xs, ys = [s.nfe for s in front], [s.psnr for s in front]
        ax.plot(xs, ys, style, label=family, markersize=4, color=colors[n % len(colors)])
    for b in BUDGETS:
        ax.axvline(b, color="grey", alpha=0.2)
    ax.set_xlim(4, 30)
    ax.set_xlabel("denoiser calls per image and branch (of 50 steps)")
    ax.set_ylabel("PSNR against the full 50-step sampler (dB), mean over seeds")
    ax.set_title(MODEL_TITLES[model], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _gpu_section(path: Path) -> list[str]:
    lines = ["## GPU wall clock (large random-init FLUX-architecture transformer, 1024 px)", ""]
    if not path.exists():
        return [
            *lines,
            f"Not measured: `{path.as_posix()}` does not exist (no GPU was lent when this was run). "
            f"`python benchmarks/gpu_flux.py --out {path.as_posix()}` on a CUDA machine writes it, and the next "
            "`nox -s bench --render-only` reports it here.",
            "",
        ]
    gpu = json.loads(path.read_text())
    lines.append(
        f"From `{path.as_posix()}` (`python benchmarks/gpu_flux.py` on {gpu['gpu']}, torch {gpu['torch']}): "
        f"{gpu['params'] / 1e9:.2f} B parameters, bf16, {gpu['tokens']} image tokens, {gpu['steps']} steps, "
        f"full {np.median(gpu['full_s']):.2f} s; one model call {gpu['model_call_ms']:.1f} ms, one predicted step "
        f"{gpu['predicted_step_ms']:.3f} ms."
    )
    lines.append("")
    for name in ("default", "fast"):
        r = gpu[name]
        lines.append(
            f"- {name}: {r['nfe']} calls, {np.median(r['s']):.2f} s, **{r['speedup']:.2f}x** "
            f"(bound {r['ideal_speedup']:.2f}x)"
        )
    return [*lines, ""]


def _budget_section(path: Path) -> list[str]:
    """The call budgets at 20, 28 and 50 steps (`benchmarks/budget.py --report`), as that script wrote them."""
    lines = ["## Call budgets at 20, 28 and 50 steps (`benchmarks/budget.py`)", ""]
    if not path.exists():
        return [*lines, f"Not measured: `{path.as_posix()}` does not exist (`python benchmarks/budget.py`).", ""]
    return [*lines, path.read_text().strip(), ""]


def _lms_section(path: Path) -> list[str]:
    lines = ["## Exact LMS coefficients against quadrature (50 steps, order 4)", ""]
    if not path.exists():
        return [
            *lines,
            f"Not measured: `{path.as_posix()}` does not exist (`python benchmarks/lms_coefficients.py`).",
            "",
        ]
    lms = json.loads(path.read_text())
    seconds = lms["seconds"]
    quadrature = next(iter(seconds.values()))
    lines += [
        f"From `{path.as_posix()}` (`{lms['command']}`, {lms['date']}, {lms['machine']}; medians of "
        f"{lms['repeats']} alternated repeats in one process). Stable Diffusion's LMS schedule; the ratio is the "
        "first row's time over each row's.",
        "",
        "| coefficients of one schedule | time | ratio |",
        "|---|---|---|",
        *(f"| {name} | {s * 1e6:,.0f} us | {quadrature / s:,.0f}x |" for name, s in seconds.items()),
        "",
        f"`jax.jit` compiles the table once in {lms['jax_compile_s']:.2f} s. Largest error against the exact "
        "integrals of the same float32 sigmas (rationals, relative to each row's largest coefficient): "
        + ", ".join(f"{name} {err:.1e}" for name, err in lms["max_relative_error"].items())
        + " (diffusers integrates in float32).",
        "",
    ]
    return lines


def args_repeats(results: dict[str, dict[str, Any]]) -> int | str:
    repeats = {r["timing"]["repeats"] for r in results.values() if "timing" in r}
    return repeats.pop() if len(repeats) == 1 else "-"


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> str:
    plots = out_dir / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{meta['command']}`. Date: {meta['date']}. Machine: {meta['machine']}. Seeds {meta['seeds']}, "
        f"{meta['batch']} images per run; the quality runs took {meta['minutes']:.1f} min (one core, summed over the models).",
        "",
        "Every run starts from the same noise and labels as the full 50-step sampler of the same model and seed. "
        "PSNR / SSIM: against that full sampler, mean over seeds with the spread (min..max) in brackets. FD: "
        "Frechet distance of the features of the model's classifier to the real images (`fashion`: Fashion-MNIST's "
        "classifier and test split; the others: the digits' classifier and the 1797 digits). acc: that classifier's "
        "accuracy on the requested class. Calls: full denoiser evaluations per image and guidance branch (calls of the "
        "denoiser's last block, so block caches are counted by what they really skip), the most any seed needed. "
        "Each family runs a grid of its settings; at each budget the best setting within it is shown, for "
        "AB-Cache and for every peer alike (peers tuned on the same seeds as ours). The zoo is described in "
        "`packages/abcache-examples/src/abcache_examples/weights/README.md`. The default, `ABCacheConfig()`, is "
        f"the row `{DEFAULT_METHOD}`; the previous default, `ABCacheConfig(interval=5)`, the row `{PREVIOUS_METHOD}`.",
        "",
        "## Targets",
        "",
    ]
    verdicts = []
    aggregated = {m: aggregate(r["records"]) for m, r in results.items()}
    for model, settings in aggregated.items():
        main = [s for s in settings if s.section == "main"]
        lines.append(f"**{model}** ({MODEL_TITLES[model]}):")
        lines.append("")
        for text, ok in targets(main, results[model].get("timing")):
            verdicts.append(ok)
            lines.append(f"- {text}: **{'met' if ok else 'MISSED'}**")
        lines.append("")
    lines += [f"{sum(verdicts)} of {len(verdicts)} targets met.", ""]
    lines += ["## Wall clock (side by side, one process, alternated)", ""]
    lines += [
        "| model | full s | default: calls, s, ratio, bound, ratio/bound | fast preset: calls, s, ratio, bound, ratio/bound |"
    ]
    lines += ["|---|---|---|---|"]
    for model, r in results.items():
        t = r.get("timing")
        if t is None:
            lines.append(f"| {model} | not measured | | |")
            continue
        cells = [
            f"{t[k]['nfe']:g}, {t[k]['s']:.2f} s, {t[k]['ratio']:.2f}x, {t[k]['bound']:.2f}x, {t[k]['ratio'] / t[k]['bound']:.3f}"
            for k in ("default", "fast")
        ]
        lines.append(f"| {model} | {t['full_s']:.2f} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Medians of {args_repeats(results)} alternated repeats at the batch above, with nothing else running; the "
        "bound is steps / calls. Fast preset: `"
        f"ABCacheConfig(order={FAST_CONFIG.order}, warmup={FAST_CONFIG.warmup}, interval={FAST_CONFIG.interval})`.",
        "",
    ]
    lines += _gpu_section(meta["gpu_json"])
    lines += _lms_section(out_dir / "benchmarks" / "results" / "lms_coefficients.json")
    lines += _budget_section(out_dir / "benchmarks" / "results" / "budget_summary.md")
    lines += ["## Fastest AB-Cache setting above 45 dB, per model", ""]
    for model, settings in aggregated.items():
        above = [s for s in settings if s.section == "main" and s.ours and s.psnr_lo >= 45]
        pick = min(above, key=lambda s: (s.nfe, -s.psnr)) if above else None
        lines.append(
            f"- {model}: " + ("none" if pick is None else f"`{pick.method}`, {pick.nfe:g} calls, {_psnr(pick)} dB")
        )
    fast = {m: next((s for s in settings if s.method == FAST_METHOD), None) for m, settings in aggregated.items()}
    cells = [f"{m} {_psnr(s)}" for m, s in fast.items() if s is not None]
    ok = all(s is not None and s.psnr_lo >= 45 for s in fast.values())
    lines += [
        "",
        f"The demo's fast preset, one setting for every model (`{FAST_METHOD}`, "
        f"{FAST_CONFIG.to_ab_config().num_computed(STEPS)} calls): " + ", ".join(cells) + f" dB: "
        f"{'above 45 dB on every model and seed' if ok else 'NOT above 45 dB everywhere'}.",
        "",
    ]
    for model, settings in aggregated.items():
        main = [s for s in settings if s.section == "main"]
        pareto = plots / f"pareto_{model}.png"
        _pareto(model, main, pareto)
        lines += [
            f"## {model}: {MODEL_TITLES[model]}",
            "",
            "Step-to-step jitter of the model output (median of ||f_{n+1} - 2 f_n + f_{n-1}|| / ||f_n|| along the "
            f"full sampler, first branch, seed {meta['seeds'][0]}): {results[model]['jitter']:.4f}.",
            "",
            f"![PSNR against calls, {model}](benchmarks/{pareto.name})",
            "",
        ]
        lines += ["Best setting of each family within each budget (PSNR dB, mean (spread) @ calls):", ""]
        lines += _budget_table(main)
        images = results[model].get("images")
        strip = plots / f"strip_{model}.png"
        if images:  # (the images are not committed: without them, a rendering keeps the strip drawn before)
            ours = best([s for s in main if s.ours], 13)
            peer = best([s for s in main if not s.ours], 13)
            rows = [(f"full {STEPS} steps", images[f"full {STEPS} steps"])]
            for s in (ours, peer):
                if s is not None and s.method in images:
                    head, _, tail = s.method.rpartition(", ")
                    rows.append((f"{head},\n{tail} ({s.nfe:g} calls, {s.psnr:.1f} dB)", images[s.method]))
            save_rows(rows, strip, label_width=330)
        if strip.exists():
            lines += ["", f"At <= 13 calls, seed {meta['seeds'][0]}: full | best AB-Cache | best peer:", ""]
            lines += [f"![image strip, {model}](benchmarks/{strip.name})"]
        sections = sorted({s.section for s in settings} - {"main"})
        if sections:
            lines += [
                "",
                "Sharp step grids (AB-Cache order 2, warm-up 2, last 2 computed; PSNR against the full "
                "sampler on the same grid): the real sigma against the step index.",
                "",
            ]
            lines += ["| grid | setting | calls | PSNR dB |", "|---|---|---|---|"]
            for section in sections:
                for s in sorted((s for s in settings if s.section == section), key=lambda s: s.method):
                    lines.append(f"| {section} | {s.method} | {s.nfe:g} | {_psnr(s)} |")
        lines += ["", "<details><summary>every setting</summary>", "", *_all_table(main), "", "</details>", ""]
    return "\n".join(lines)


def _machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}), "
        f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abcache_examples.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=ZOO, default=list(ZOO))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--timing-repeats", type=int, default=3, help="0: no wall-clock pass")
    parser.add_argument("--timing-only", action="store_true", help="only the wall-clock pass, into existing results")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where BENCHMARKS.md and benchmarks/ go")
    parser.add_argument("--render-only", action="store_true", help="render from benchmarks/results/*.json")
    parser.add_argument("--gpu-json", type=Path, default=Path("benchmarks/gpu_flux.json"))
    parser.add_argument("--command", default=None, help="how the results were produced, for the report's header")
    parser.add_argument("--quick", action="store_true", help="one setting per family, one sharp grid (for tests)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results_dir = args.out_dir / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.render_only and not args.timing_only:
        for model in args.models:
            started = time.time()
            result = run_model(model, args.seeds, args.batch, args.quick)
            images = result.pop("images")
            np.savez_compressed(results_dir / f"{model}_images.npz", **images)
            result["meta"] = {"seeds": args.seeds, "batch": args.batch, "seconds": time.time() - started}
            (results_dir / f"{model}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.render_only and args.timing_repeats > 0:
        for model in args.models:  # one model at a time, after the quality runs
            path = results_dir / f"{model}.json"
            result = json.loads(path.read_text())
            result["timing"] = timing(make_setup(model, result["meta"]["batch"]), args.timing_repeats)
            result["timing"]["machine"] = _machine()
            path.write_text(json.dumps(result, indent=1) + "\n")
    results = {}
    for model in ZOO:
        path = results_dir / f"{model}.json"
        if path.exists():
            results[model] = json.loads(path.read_text())
            npz = results_dir / f"{model}_images.npz"
            results[model]["images"] = dict(np.load(npz)) if npz.exists() else {}
    if not results:
        parser.error(f"no results in {results_dir}")
    first = next(iter(results.values()))["meta"]
    meta = {
        "command": args.command
        or "nox -s bench (python -m abcache_examples.bench" + "".join(f" {a}" for a in argv or []) + ")",
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "seeds": first["seeds"],
        "batch": first["batch"],
        "minutes": sum(r["meta"]["seconds"] for r in results.values()) / 60,
        "gpu_json": args.gpu_json,
    }
    report = render(results, meta, args.out_dir)
    (args.out_dir / "BENCHMARKS.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
