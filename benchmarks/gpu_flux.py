"""Wall-clock of AB-Cache on a GPU with a large random-init FLUX-architecture transformer.

Runs the flow-matching Euler loop (FLUX-like shifted grid, 50 steps) with the transformer
called every step, and with `abcache_torch.ABCache` at the default `ABConfig()` (a budget of
5 + 50 // 5 = 15 calls placed by the Euler step's sensitivity, corrected) and the demo's fast preset
(interval 6: 13 calls),
alternated on the same machine; reports the ratios, the time of one model call against one
predicted step, and the peak-memory overhead of the cache.

    python benchmarks/gpu_flux.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import time

import abcore
import numpy as np
import torch
from abcache_torch import ABCache, extrapolate
from diffusers import FluxTransformer2DModel


def flux_sigmas(n: int, shift: float = 3.0) -> np.ndarray:
    s = np.linspace(1.0, 1.0 / n, n)
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0)


def run(model, x, kwargs, sigmas) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)  # float32: ABCache reads the time
        v = model(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    return x


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--single-layers", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="gpu_flux.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=24, help="attention heads (x128 = hidden size; FLUX: 24)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), torch.bfloat16
    cuda = dev.type == "cuda"
    with dev:
        model = FluxTransformer2DModel(
            num_layers=args.layers,
            num_single_layers=args.single_layers,
            num_attention_heads=args.width,
            joint_attention_dim=4096,
            guidance_embeds=True,
        ).to(dtype)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    side = args.resolution // 16  # VAE /8, then 2x2 patches
    tokens, text = side * side, 512
    x0 = torch.randn(1, tokens, 64, device=dev, dtype=dtype)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, text, 4096, device=dev, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device=dev, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=dev, dtype=dtype),
        img_ids=torch.cat([torch.zeros(tokens, 1), ids.float()], 1).to(dev, dtype),
        txt_ids=torch.zeros(text, 3, device=dev, dtype=dtype),
    )
    sigmas = flux_sigmas(args.steps)
    configs = {"default": abcore.ABConfig(), "fast": abcore.ABConfig(interval=6)}
    steps = abcore.LinearSteps.euler(sigmas)
    caches = {name: ABCache(model, c, times=sigmas[:-1], steps=steps) for name, c in configs.items()}
    runners = {"full": model, **caches}
    with torch.inference_mode():
        run(model, x0, kwargs, sigmas[:4])  # warm-up kernels
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        peaks, outs = {}, {}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                took, outs[name] = timed(lambda fn=fn: run(fn, x0, kwargs, sigmas))
                seconds[name].append(took)
                peaks[name] = (torch.cuda.max_memory_allocated() - base) if cuda else 0
        # one model call against one predicted step (the weighted sum of two stored outputs)
        t = torch.full((1,), 0.5, device=dev, dtype=dtype)
        call_s, out = timed(
            lambda: [model(hidden_states=x0, timestep=t, return_dict=False, **kwargs) for _ in range(5)]
        )
        hist = [[out[-1][0]], [out[-2][0]]]
        w = torch.tensor([2.0, -1.0], device=dev)
        pred_s, _ = timed(lambda: [extrapolate(hist, w) for _ in range(50)])
    full = outs["full"].float()
    result = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "params": params,
        "tokens": tokens,
        "steps": args.steps,
        "full_s": seconds["full"],
        "model_call_ms": 1000 * call_s / 5,
        "predicted_step_ms": 1000 * pred_s / 50,
        "peak_extra_bytes_full": peaks["full"],
        "output_bytes": out[-1][0].numel() * out[-1][0].element_size(),
    }
    for name, cache in caches.items():
        result[name] = {
            "nfe": cache.stats.computed // args.repeats,
            "s": seconds[name],
            "speedup": float(np.median(seconds["full"]) / np.median(seconds[name])),
            "ideal_speedup": args.steps / configs[name].num_computed(args.steps),
            "peak_extra_bytes": peaks[name],
            "relative_deviation_random_init": float((outs[name].float() - full).norm() / full.norm()),
        }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
