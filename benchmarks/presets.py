"""The default and the fast preset on zoo models, seeds 0-2, 64 images: calls and PSNR against the full sampler.

    OMP_NUM_THREADS=1 python benchmarks/presets.py flow flow_ema eps v

A quick check that a change of the runtime leaves the benchmark's default and fast-preset rows where they were
(BENCHMARKS.md), without running the whole benchmark.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from abcache_diffusers import ABCacheConfig
from abcache_examples.compare import FAST_CONFIG, Scorer, make_setup

torch.set_num_threads(1)
for model in sys.argv[1:]:
    scorer = Scorer(model)
    res = {"default": [], "fast": []}
    calls = {}
    for seed in (0, 1, 2):
        setup = make_setup(model, 64, seed)
        ref = setup.run("full", "full")
        for name, cfg in (("default", ABCacheConfig()), ("fast", FAST_CONFIG)):
            run = scorer.score(setup.run(name, name, cache=cfg), ref)
            res[name].append(run.scores["psnr"])
            calls[name] = max(calls.get(name, 0), run.nfe)
    summary = {k: (calls[k], round(float(np.mean(v)), 2), [round(x, 2) for x in v]) for k, v in res.items()}
    print(model, summary, flush=True)
