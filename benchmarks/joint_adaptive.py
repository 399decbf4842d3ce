"""The diffusers hook on the zoo: the correction on / off, and the adaptive mode, whose one decision per step holds
for all cache contexts (cond and uncond make the same calls; deciding per context was measured against it in
benchmark v2 and is no longer a mode of the hook).

    OMP_NUM_THREADS=1 python benchmarks/joint_adaptive.py [--batch 100] [--models flow eps]

PSNR against the full 50-step sampler from the same noise; calls per image and guidance branch.
"""

from __future__ import annotations

import argparse

from abcache_diffusers import ABCacheConfig
from abcache_examples.compare import Scorer, make_setup
from abcache_examples.models import CLASSIFIERS, MODEL_NAMES


def rows() -> list[tuple[str, ABCacheConfig]]:
    out = [
        ("fixed default, correct=False", ABCacheConfig(correct=False)),
        ("fixed default, correct=True", ABCacheConfig(correct=True)),
    ]
    for tol in (0.05, 0.1, 0.2):
        out.append((f"adaptive tol {tol}, interval 6, corrected", ABCacheConfig(tolerance=tol, interval=6)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models", nargs="+", default=["flow", "eps"], choices=[m for m in MODEL_NAMES if m not in CLASSIFIERS]
    )
    args = parser.parse_args()
    for model in args.models:
        scorer = Scorer(model)
        setup = make_setup(model, args.batch, args.seed)
        reference = setup.run("full", "full")
        print(
            f"\n{model} ({args.batch} images, seed {args.seed})\n\n| setting | calls per branch | PSNR dB |\n|---|---|---|"
        )
        for label, config in rows():
            run = scorer.score(setup.run(label, label, cache=config), reference)
            print(f"| {label} | {run.nfe:g} | {run.scores['psnr']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
