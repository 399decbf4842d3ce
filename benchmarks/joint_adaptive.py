"""The diffusers hook on the zoo: the correction on / off, and one adaptive decision for all cache contexts
(joint, the default) against one decision per context (cond and uncond deciding alone).

    OMP_NUM_THREADS=1 python benchmarks/joint_adaptive.py [--batch 100] [--models flow eps]

PSNR against the full 50-step sampler from the same noise; calls per image and guidance branch (the mean of the
branches: deciding per context, cond and uncond may make different calls).
"""

from __future__ import annotations

import argparse

from abcache_diffusers import ABCacheConfig, ABCacheHook
from abcache_examples.compare import Scorer, make_setup
from abcache_examples.models import MODEL_NAMES


def rows() -> list[tuple[str, ABCacheConfig, bool]]:
    out = [
        ("fixed default, correct=False", ABCacheConfig(correct=False), True),
        ("fixed default, correct=True", ABCacheConfig(correct=True), True),
    ]
    for tol in (0.05, 0.1, 0.2):
        for joint in (False, True):
            label = f"adaptive tol {tol}, interval 6, corrected, {'joint' if joint else 'per context'}"
            out.append((label, ABCacheConfig(tolerance=tol, interval=6), joint))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models", nargs="+", default=["flow", "eps"], choices=[m for m in MODEL_NAMES if m != "classifier"]
    )
    args = parser.parse_args()
    scorer = Scorer()
    for model in args.models:
        setup = make_setup(model, args.batch, args.seed)
        reference = setup.run("full", "full")
        print(
            f"\n{model} ({args.batch} images, seed {args.seed})\n\n| setting | calls per branch | PSNR dB |\n|---|---|---|"
        )
        for label, config, joint in rows():
            ABCacheHook._joint = joint
            try:
                run = scorer.score(setup.run(label, label, cache=config), reference)
            finally:
                ABCacheHook._joint = True
            print(f"| {label} | {run.nfe:g} | {run.scores['psnr']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
