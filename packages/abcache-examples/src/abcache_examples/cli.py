"""`abcache demo`: AB-Cache on the zoo models: the full sampler, the default, the fast preset and plain reuse."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abcache_examples.compare import Run


NFE_NOTE = "NFE: denoiser evaluations per image and guidance branch"


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _row(run: Run, full: Run) -> dict[str, object]:
    s = run.scores
    return {
        "model": run.family,
        "method": run.method,
        "NFE": f"{run.nfe:g}",
        "wall s": f"{run.seconds:.2f}",
        "speedup": f"{full.seconds / run.seconds:.2f}x",
        "PSNR dB": "ref" if run is full else f"{s['psnr']:.1f}",
        "SSIM": "ref" if run is full else f"{s['ssim']:.4f}",
        "FD": f"{s['fd']:.2f}",
        "acc": f"{s['accuracy']:.2f}" if "accuracy" in s else "",
    }


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="abcache demo", description=__doc__)
    parser.add_argument("--batch", type=int, default=40, help="images per model (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("abcache-demo.png"), help="PNG grid to write")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX/Flax run of the flow model")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from abcache_diffusers import ABCacheConfig
    from tqdm.auto import tqdm

    from abcache_examples.compare import FAST_CONFIG, FlowSetup, Scorer, make_setup, save_rows
    from abcache_examples.models import FLOW_MODELS, UNET_MODELS

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    default = ABCacheConfig()
    reuse = ABCacheConfig(order=1, interval=default.interval, warmup=default.warmup, correct=False)
    setups = [make_setup(m, args.batch, args.seed) for m in (*FLOW_MODELS, *UNET_MODELS)]
    flow = next(setup for setup in setups if isinstance(setup, FlowSetup))  # the JAX run's model
    methods: list[tuple[str, dict[str, Any]]] = [
        ("full 50 steps", {}),
        (f"AB-Cache default (interval {default.interval}, last {default.cooldown} computed)", {"cache": default}),
        (
            f"AB-Cache fast (order {FAST_CONFIG.order}, interval {FAST_CONFIG.interval}, last {FAST_CONFIG.cooldown})",
            {"cache": FAST_CONFIG},
        ),
        ("reuse (order 1)", {"cache": reuse}),
    ]
    jobs = [(setup, method, kwargs) for setup in setups for method, kwargs in methods]
    scorer = Scorer()
    runs: dict[str, list[Run]] = {setup.name: [] for setup in setups}
    progress = tqdm(total=len(jobs) + (0 if args.no_jax else 1), desc="abcache demo", unit="run")
    for setup, method, kwargs in jobs:
        progress.set_postfix_str(f"{setup.name}: {method}")
        run = setup.run(method, setup.name, **kwargs)
        reference = runs[setup.name][0] if runs[setup.name] else run
        scorer.score(run, reference, setup.labels if isinstance(setup, FlowSetup) else None)
        runs[setup.name].append(run)
        progress.update()
    if not args.no_jax:
        progress.set_postfix_str("flow: JAX/Flax AB-Cache")
        from abcache_examples.jax_flow import sample_flow_jax

        run = sample_flow_jax(flow, default.to_ab_config())
        runs[flow.name].append(scorer.score(run, runs[flow.name][0], flow.labels))
        progress.update()
    progress.close()

    rows = [_row(run, group[0]) for group in runs.values() for run in group]
    columns = ["model", "method", "NFE", "wall s", "speedup", "PSNR dB", "SSIM", "FD", "acc"]
    print()
    print(_table(rows, columns))
    print(f"\n{NFE_NOTE}; PSNR/SSIM against the full sampler from the same noise; FD: Frechet distance of the")
    print("shipped classifier's features to the real digits; acc: classifier accuracy on the requested class.")
    grid = [(f"{r.family}: {r.method.split(' (')[0]}", r.images) for group in runs.values() for r in group[:3]]
    save_rows(grid, args.out, label_width=110)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="abcache", description="AB-Cache command line")
    parser.add_argument("command", choices=["demo"], help="demo: run AB-Cache on the shipped models")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return demo(rest)
    return 2  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
