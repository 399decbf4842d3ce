"""Wall clock of keras-hub SD3 `generate`, stock against `enable_ab_cache`, side by side in one process.

    KERAS_BACKEND=jax OMP_NUM_THREADS=1 python tests/abcache_jax/keras_hub_sd3/bench_keras_hub.py

A random-init SD3 built from explicit arguments (`build_sd3` of test_keras_hub.py), its MMDiT large
enough that the denoiser dominates `generate`. Each variant is compiled by one untimed call, then the
calls alternate stock / cached and the median of each (and of the pairs' ratios) is reported; the images are compared as floats
(the generate function's output before keras-hub's uint8 conversion).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"

import abcore
import keras
import numpy as np
from abcache_jax.keras_hub import computed_steps, disable_ab_cache, enable_ab_cache

_spec = importlib.util.spec_from_file_location("test_keras_hub", Path(__file__).with_name("test_keras_hub.py"))
tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task = tests.build_sd3(args.image, args.hidden, args.layers, args.heads)
    stock_task = tests.build_sd3(args.image, args.hidden, args.layers, args.heads)  # same seed: same weights
    enable_ab_cache(task, abcore.ABConfig())
    prompt, seed = "airplane", 7

    def timed(t):
        start = time.perf_counter()
        t.generate(prompt, num_steps=args.steps, seed=seed)
        return time.perf_counter() - start

    compile_s = {"stock": timed(stock_task), "cached": timed(task)}
    runs: dict[str, list[float]] = {"stock": [], "cached": []}
    for _ in range(args.repeats):
        runs["stock"].append(timed(stock_task))
        runs["cached"].append(timed(task))
    calls = int(computed_steps(task).sum())

    latents = keras.random.normal((1, *task.latent_shape[1:]), seed=3)
    tokens = (task.preprocessor.generate_preprocess([prompt]), task.preprocessor.generate_preprocess([""]))
    n = keras.ops.convert_to_tensor(args.steps, "int32")
    guidance = keras.ops.convert_to_tensor(7.0)
    disable_ab_cache(stock_task)
    stock_task.backbone.configure_scheduler(args.steps)
    stock = np.asarray(stock_task.make_generate_function()(latents, tokens, n, guidance))
    cached = np.asarray(task.make_generate_function()(latents, tokens, n, guidance))

    params = task.backbone.diffuser.count_params()
    print(
        f"SD3 random-init, image {args.image}x{args.image}, MMDiT hidden {args.hidden} x {args.layers} layers "
        f"({params / 1e6:.1f} M parameters), {args.steps} steps, CFG 7.0, batch 1, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, jax {__import__('jax').__version__}"
    )
    s, c = statistics.median(runs["stock"]), statistics.median(runs["cached"])
    print("| generate | denoiser calls | wall clock (median) | first call (compile + run) |")
    print("|---|---|---|---|")
    print(f"| keras-hub stock | {args.steps} | {s:.2f} s | {compile_s['stock']:.1f} s |")
    print(f"| enable_ab_cache(task) | {calls} | {c:.2f} s | {compile_s['cached']:.1f} s |")
    rel = np.linalg.norm(cached - stock) / np.linalg.norm(stock)
    pairs = statistics.median(a / b for a, b in zip(runs["stock"], runs["cached"], strict=True))
    print(
        f"speedup {s / c:.2f}x (median of the alternating pairs' ratios {pairs:.2f}x; calls {args.steps / calls:.2f}x); "
        f"images: max |diff| {np.abs(cached - stock).max():.3g}"
    )
    print(
        f"relative L2 {rel:.3g}; runs stock {[round(r, 2) for r in runs['stock']]}, cached {[round(r, 2) for r in runs['cached']]}"
    )


if __name__ == "__main__":
    main()
