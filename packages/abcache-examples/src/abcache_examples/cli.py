"""`abcache demo`: AB-Cache on the zoo models: the full sampler, the default, the fast preset and plain reuse.

The Fashion-MNIST model (`fashion`, a flow DiT on real 28x28 images) runs first, then the models trained on the
16x16 digits. Prints a table (calls, wall time, PSNR / SSIM against the full sampler, Frechet distance and class
accuracy by each model's classifier) and writes one PNG grid: a block per model, one row per method, one class per
column.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abcache_examples.compare import GridBlock, Run, Setup


NFE_NOTE = "NFE: denoiser evaluations per image and guidance branch"
MIN_BATCH = 2  # the Frechet distance needs the covariance of the samples' features: at least 2 images
MODEL_TITLES = {
    "fashion": "Fashion-MNIST 28x28, flow DiT, true CFG 3",
    "flow": "digits 16x16, flow DiT, true CFG 3",
    "flow_ema": "digits 16x16, flow DiT trained 2x longer, true CFG 3",
    "eps": "digits 16x16, eps UNet (unconditional), DDIM",
    "v": "digits 16x16, v-prediction UNet (unconditional), DDIM",
}


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


def _batch(text: str) -> int:
    """``--batch``: an integer >= MIN_BATCH."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {MIN_BATCH}, got {text!r}") from None
    if value < MIN_BATCH:
        raise argparse.ArgumentTypeError(
            f"must be >= {MIN_BATCH} (the Frechet distance needs the covariance of at least 2 images), got {value}"
        )
    return value


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``abcache`` parser and its subcommands' parsers (each prints its own ``--help``)."""
    parser = argparse.ArgumentParser(prog="abcache", description="AB-Cache command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run AB-Cache on the shipped models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--batch", type=_batch, default=40, help=f"images per model, >= {MIN_BATCH} (default 40)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    demo.add_argument(
        "--out", type=Path, default=Path("abcache-demo.png"), help="PNG grid to write (default abcache-demo.png)"
    )
    demo.add_argument("--no-jax", action="store_true", help="skip the JAX/Flax run of the flow model")
    return parser, {"demo": demo}


def _check_out(out: Path, parser: argparse.ArgumentParser) -> None:
    """Create ``--out``'s folder now, so that a bad path fails before the sampling, not after it."""
    if out.is_dir():
        parser.error(f"--out must be a file to write, got the folder {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out: cannot create the folder {out.parent}: {err.strerror or err}")
    if not os.access(out.parent, os.W_OK):
        parser.error(f"--out: the folder {out.parent} is not writable")


def _block(setup: Setup, runs: list[Run]) -> GridBlock:
    """The demo grid's block of one model: one row per method, the first 10 images (classes 0..9 for the DiTs)."""
    from abcache_examples.compare import FlowSetup
    from abcache_examples.data import FASHION_CLASSES

    headers: list[str] = []
    if isinstance(setup, FlowSetup):
        names = FASHION_CLASSES if setup.name == "fashion" else tuple(str(c) for c in range(10))
        headers = [names[int(c)] for c in setup.labels[:10]]
    rows = []
    for run in runs:
        quality = "reference" if run is runs[0] else f"{run.scores['psnr']:.1f} dB"
        rows.append((f"{run.method}\n{run.nfe:g} calls, {quality}", run.images))
    return (f"{setup.name}: {MODEL_TITLES.get(setup.name, '')}", headers, rows)


def demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the demo with the parsed ``abcache demo`` arguments; errors are reported through ``parser``."""
    _check_out(args.out, parser)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from abcache_diffusers import ABCacheConfig
    from tqdm.auto import tqdm

    from abcache_examples.compare import FAST_CONFIG, FlowSetup, Scorer, make_setup, save_grid
    from abcache_examples.models import FASHION_MODELS, FLOW_MODELS, UNET_MODELS

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    default = ABCacheConfig()  # a call budget: 5 + 50 // 5 = 15 calls, placed by the sampler's sensitivity
    reuse = ABCacheConfig(order=1, interval=5, warmup=2, correct=False)  # the previous default's schedule, 15 calls
    # the model trained on real images first, then the digits models
    models = sorted((*FLOW_MODELS, *UNET_MODELS), key=lambda m: m not in FASHION_MODELS)
    setups = [make_setup(m, args.batch, args.seed) for m in models]
    # the JAX run's model: the Flax port loads the flow model's weights
    flow = next(setup for setup in setups if isinstance(setup, FlowSetup) and setup.name == "flow")
    methods: list[tuple[str, dict[str, Any]]] = [
        ("full 50 steps", {}),
        ("AB-Cache default (budget 5 + n // 5, placed by the sampler's sensitivity)", {"cache": default}),
        (
            f"AB-Cache fast (order {FAST_CONFIG.order}, interval {FAST_CONFIG.interval}, last {FAST_CONFIG.cooldown})",
            {"cache": FAST_CONFIG},
        ),
        ("reuse (order 1)", {"cache": reuse}),
    ]
    scorers = {setup.name: Scorer(setup.name) for setup in setups}
    runs: dict[str, list[Run]] = {setup.name: [] for setup in setups}
    progress = tqdm(total=len(setups) * len(methods) + (0 if args.no_jax else 1), desc="abcache demo", unit="run")
    for setup in setups:
        labels = setup.labels if isinstance(setup, FlowSetup) else None
        for method, kwargs in methods:
            progress.set_postfix_str(f"{setup.name}: {method}")
            run = setup.run(method, setup.name, **kwargs)
            reference = runs[setup.name][0] if runs[setup.name] else run
            scorers[setup.name].score(run, reference, labels)
            runs[setup.name].append(run)
            progress.update()
    if not args.no_jax:
        progress.set_postfix_str("flow: JAX/Flax AB-Cache")
        from abcache_examples.jax_flow import sample_flow_jax

        run = sample_flow_jax(flow, default.to_ab_config())
        runs[flow.name].append(scorers[flow.name].score(run, runs[flow.name][0], flow.labels))
        progress.update()
    progress.close()

    rows = [_row(run, group[0]) for group in runs.values() for run in group]
    columns = ["model", "method", "NFE", "wall s", "speedup", "PSNR dB", "SSIM", "FD", "acc"]
    print()
    print(_table(rows, columns))
    print(f"\n{NFE_NOTE}; PSNR/SSIM against the full sampler from the same noise.")
    print("FD: Frechet distance of the model classifier's features to the real images (fashion: the Fashion-MNIST")
    print("classifier and test split; the others: the digits classifier and the digits). acc: that classifier's")
    print("accuracy on the requested class.")
    save_grid([_block(setup, runs[setup.name]) for setup in setups], args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``abcache COMMAND ...``: parse ``argv`` (default: the command line) and run the subcommand."""
    parser, commands = _parsers()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return demo(args, commands[args.command])


if __name__ == "__main__":
    raise SystemExit(main())
