"""Reproducible training of the demo models on the 16x16 digits and on Fashion-MNIST.

Usage::

    python -m abcache_examples.train {classifier,flow,flow_ema,eps,v,fashion_classifier,fashion} --out DIR
        [--steps N] [--seed S] [--threads T] [--checkpoint-every N]

Train the classifier first (``fashion_classifier`` for ``fashion``): the diffusion models evaluate their samples
with it (read from ``--out``). ``fashion`` and ``fashion_classifier`` read Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package (``data.load_fashion``; ``$ABCACHE_FASHION_MNIST`` names another folder).
Everything is seeded (``torch.manual_seed`` and a seeded ``torch.Generator`` for the data order, noise and
timesteps); AdamW with linear warm-up and cosine decay; the diffusion models keep an EMA of their weights,
which is what gets saved. Each run writes ``<name>.safetensors`` / ``<name>.json`` and a sample grid PNG.

Label dropout (flow model): diffusers' ``LabelEmbedding`` drops labels on its own in train mode, but the DiT
evaluates a separate class embedding in each block and in the output layer, each dropping independently;
a "dropped" sample would then be unconditional in some layers only. We therefore switch that internal
dropout off and replace 10 % of the labels by the null class 10 once per sample, so every layer sees it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import load_digits16, load_fashion
from .models import (
    CLASSIFIERS,
    FASHION_MODELS,
    FLOW_MODELS,
    NULL_CLASS,
    build_model,
    default_config,
    load_classifier,
    save_model,
)

LABEL_DROPOUT = 0.1
DEFAULT_STEPS = {
    "classifier": 1500,
    "flow": 3000,
    "flow_ema": 6000,
    "eps": 1500,
    "v": 1500,
    "fashion_classifier": 2000,
    "fashion": 4500,
}
DEFAULT_LR = {
    "classifier": 2e-3,
    "flow": 1e-3,
    "flow_ema": 1e-3,
    "eps": 5e-4,
    "v": 5e-4,
    "fashion_classifier": 2e-3,
    "fashion": 8e-4,
}
EMA_DECAY = {"flow": 0.999, "flow_ema": 0.9995, "eps": 0.999, "v": 0.999, "fashion": 0.999}
BATCH_SIZE = 128


def _lr_lambda(total: int, warmup: int = 100):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05

    return f


def _batches(n: int, steps: int, gen: torch.Generator):
    """Index batches from successive seeded permutations (deterministic data order)."""
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + BATCH_SIZE > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + BATCH_SIZE]
        pos += BATCH_SIZE


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 10, scale: int = 4) -> Path:
    """Write ``(N, 1, H, W)`` images in [-1, 1] as one grayscale PNG grid, ``nrow`` per row, upscaled."""
    from PIL import Image

    x = np.clip((np.asarray(images)[:, 0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), 64, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    return Path(path)


def _data(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Model ``name``'s data set: Fashion-MNIST for the fashion models, else the 16x16 digits."""
    return load_fashion(split) if name in FASHION_MODELS else load_digits16(split)


def _loss(
    name: str, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator, sched
) -> torch.Tensor:
    n = x0.shape[0]
    if name in CLASSIFIERS:
        # augmentation: random shifts of up to 1 pixel and a little Gaussian noise
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x0, shifts=(dy, dx), dims=(2, 3))
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
        return F.cross_entropy(model(x), y)
    noise = torch.randn(x0.shape, generator=gen)
    if name in FLOW_MODELS:
        sigma = torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal(0, 1), as in SD3
        s = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        drop = torch.rand(n, generator=gen) < LABEL_DROPOUT
        labels = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        pred = model(xt, timestep=sigma * 1000.0, class_labels=labels).sample
        return F.mse_loss(pred, noise - x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen)
    pred = model(sched.add_noise(x0, noise, t), t).sample
    target = sched.get_velocity(x0, noise, t) if name == "v" else noise
    return F.mse_loss(pred, target)


def evaluate(name: str, model: torch.nn.Module, out: Path, seed: int) -> dict[str, float]:
    """Score ``model`` with the classifier in ``out`` and write a sample grid there.

    classifier: held-out accuracy. flow models (``fashion`` too): 100 samples (10 per class), 50 steps, guidance 1-4: accuracy on the
    requested class, and at guidance 3 the Frechet distance to the test split. eps: 100 DDIM samples, 50 steps:
    Frechet distance to the test split and the classifier's mean top-class probability.
    """
    from .metrics import classifier_accuracy, classifier_features, classifier_logits, frechet_distance
    from .pipelines import ddim_pipeline, flow_pipeline

    classifier = load_classifier(out, "fashion_classifier" if name in FASHION_MODELS else "classifier")
    test_x, test_y = _data(name, "test")
    if name in CLASSIFIERS:
        return {"test_accuracy": classifier_accuracy(test_x, test_y, classifier)}
    test_feats = classifier_features(test_x, classifier)
    result: dict[str, float] = {}
    if name in FLOW_MODELS:
        labels = torch.arange(10).repeat(10)
        flow = flow_pipeline(model)
        for scale in (1.0, 2.0, 3.0, 4.0):
            gen = torch.Generator().manual_seed(seed + 1)
            x = flow(labels, guidance_scale=scale, generator=gen, output_type="latent", return_dict=False)[0]
            result[f"accuracy_cfg{scale:g}"] = classifier_accuracy(x, labels, classifier)
            if scale == 3.0:
                save_grid(x.numpy(), out / f"{name}_samples.png")
                result["frechet_vs_test_cfg3"] = frechet_distance(classifier_features(x, classifier), test_feats)
        return result
    gen = torch.Generator().manual_seed(seed + 1)
    ddim = ddim_pipeline(model, name)
    images = ddim(batch_size=100, generator=gen, num_inference_steps=50, output_type="np", return_dict=False)[0]
    samples = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2.0 - 1.0
    save_grid(samples.numpy(), out / f"{name}_samples.png")
    probs = torch.softmax(classifier_logits(samples, classifier), dim=1)
    result["mean_max_prob"] = float(probs.max(dim=1).values.mean())
    result["frechet_vs_test"] = frechet_distance(classifier_features(samples, classifier), test_feats)
    return result


def train(
    name: str, steps: int, seed: int, out: Path, log_every: int = 100, checkpoint_every: int = 0
) -> dict[str, float]:
    """Train ``name`` for ``steps`` steps; write its weights, ``<name>_train.json`` (loss curve, time) and
    samples to ``out``. ``checkpoint_every > 0`` also saves the EMA weights to ``out/checkpoint`` that often."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = default_config(name)
    model = build_model(name, config).train()
    if name in FLOW_MODELS:
        from diffusers.models.embeddings import LabelEmbedding

        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # we drop labels ourselves, once per sample (module docstring)
    ema = copy.deepcopy(model).requires_grad_(False) if name not in CLASSIFIERS else None
    from diffusers import DDPMScheduler

    from .models import EPS_SCHEDULER_CONFIG, V_SCHEDULER_CONFIG

    sched = DDPMScheduler(**(V_SCHEDULER_CONFIG if name == "v" else EPS_SCHEDULER_CONFIG))
    # the digits' generators see all 1797 digits; Fashion-MNIST keeps its test split for the metrics
    images, labels = _data(name, "train" if name in CLASSIFIERS or name in FASHION_MODELS else "all")
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=DEFAULT_LR[name], weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    start, running, curve = time.time(), [], []
    for step, idx in enumerate(_batches(len(y_all), steps, gen)):
        loss = _loss(name, model, x_all[idx], y_all[idx], gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if ema is not None:
            _ema_update(ema, model, step, EMA_DECAY[name])
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, float(np.mean(running[-log_every:])), round(time.time() - start, 1)))
            print(f"{name} step {step + 1}/{steps} loss {curve[-1][1]:.4f} {curve[-1][2]:.0f}s", flush=True)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_model(ema if ema is not None else model, name, config, out / "checkpoint")
    final = ema if ema is not None else model
    final.eval()
    save_model(final, name, config, out)
    result = {"final_loss": float(np.mean(running[-200:])), "train_seconds": time.time() - start}
    log = {"steps": steps, "seed": seed, "threads": torch.get_num_threads(), "curve": curve, **result}
    (out / f"{name}_train.json").write_text(json.dumps(log) + "\n")
    result.update(evaluate(name, final, out, seed))
    print(name, result, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(DEFAULT_STEPS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder (copy into weights/ to ship)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save the EMA weights to OUT/checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[args.model]
    if steps < 1:
        parser.error("--steps must be positive")
    try:
        _data(args.model, "test")  # fail before training, with the install hint, when the data set is missing
    except FileNotFoundError as err:
        parser.error(str(err))
    train(args.model, steps, args.seed, args.out, checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    main()
