"""Side-by-side runs of the shipped models under each acceleration method, scored against the full sampler.

Every run starts from the same noise (and labels) as the full 50-step reference, so PSNR / SSIM measure how far a
method moves the result, the Frechet distance (features of the model's classifier, against the real images it was
trained on: Fashion-MNIST's test split for ``fashion``, the digits for the others) measures the sample distribution,
and NFE counts full denoiser evaluations per image and guidance branch (calls of the last layer of the denoiser's
last block, so block-level caches such as FirstBlockCache are counted by what they really skip).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .metrics import (
    classifier_accuracy,
    classifier_features,
    classifier_for,
    feature_stats,
    frechet_distance_of_stats,
    load_reference_stats,
    psnr,
    ssim,
)
from .models import FLOW_MODELS, UNET_MODELS, load_classifier
from .pipelines import make_ddim_pipeline, make_flow_pipeline

STEPS = 50
# The demo's fast preset: the fewest calls (14 of 50) whose PSNR stays above 45 dB on every zoo model (BENCHMARKS.md)
FAST_CONFIG = ABCacheConfig(order=3, warmup=3, interval=6)


@dataclass
class Run:
    """One sampling run: images in [-1, 1] as (N, 1, H, W), NFE per image and branch, wall time."""

    method: str
    family: str
    nfe: float
    seconds: float
    images: np.ndarray = field(repr=False)
    scores: dict[str, float] = field(default_factory=dict)


def _last_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The last parameterised leaf layer of the denoiser's last block: it runs iff the whole stack runs."""
    for name in ("transformer_blocks", "up_blocks", "blocks"):
        blocks = getattr(module, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            leaves = [m for m in blocks[-1].modules() if not list(m.children()) and list(m.parameters())]
            if leaves:
                return leaves[-1]
    raise ValueError(f"cannot find the last block of {type(module).__name__}")


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count full evaluations of `module`: forward calls of its last block's last layer.

    Block-level caches (FirstBlockCache, MagCache, TaylorSeer) replace a skipped block's forward without
    calling its layers, so this counts what they really compute.
    """
    counter = [0]
    handle = _last_layer(module).register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


class Setup:
    """A pipeline and its fixed inputs (noise, labels); subclasses say how to call it."""

    branches = 1
    name = ""

    def __init__(self, pipe: Any, batch: int, seed: int) -> None:
        self.pipe, self.batch = pipe, batch
        self.default_scheduler = pipe.scheduler
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Draw the initial noise of the following runs from `seed`."""
        self.seed = seed

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def _call(self, steps: int, sigmas: Any = None) -> np.ndarray:
        raise NotImplementedError

    def run(
        self,
        method: str,
        family: str,
        *,
        cache: ABCacheConfig | None = None,
        apply: Callable[[torch.nn.Module], Callable[[], None]] | None = None,
        scheduler: Any = None,
        steps: int = STEPS,
        sigmas: Any = None,
    ) -> Run:
        """Sample once. `cache`: AB-Cache config; `apply(denoiser) -> undo`: another cache; `scheduler`: swap;
        `sigmas`: a custom grid (flow models)."""
        self.pipe.scheduler = scheduler if scheduler is not None else self.default_scheduler
        undo = None
        if cache is not None:
            enable_ab_cache(self.pipe, cache)
        if apply is not None:
            undo = apply(self.denoiser)
        try:
            with count_calls(self.denoiser) as calls:
                start = time.perf_counter()
                images = self._call(steps, sigmas)
                seconds = time.perf_counter() - start
        finally:
            if cache is not None:
                disable_ab_cache(self.pipe)
            if undo is not None:
                undo()
            self.pipe.scheduler = self.default_scheduler
        return Run(method, family, calls[0] / self.branches, seconds, images)


class FlowSetup(Setup):
    """A class-conditional flow DiT of the zoo, true CFG (separate cond / uncond calls), FLUX-like shifted grid."""

    branches = 2

    def __init__(self, batch: int = 40, seed: int = 0, guidance_scale: float = 3.0, model: str = "flow") -> None:
        self.labels = torch.arange(batch) % 10
        self.guidance_scale = guidance_scale
        self.name = model
        super().__init__(make_flow_pipeline(name=model), batch, seed)

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        cfg = self.pipe.transformer.config
        gen = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(self.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def _call(self, steps: int, sigmas: Any = None) -> np.ndarray:
        out = self.pipe(
            self.labels,
            num_inference_steps=steps,
            sigmas=sigmas,
            guidance_scale=self.guidance_scale,
            latents=self.latents,
            output_type="latent",
        )
        return out.images.clamp(-1, 1).float().numpy()


class EpsSetup(Setup):
    """An unconditional UNet of the zoo (eps or v-prediction) with diffusers' DDIMPipeline (eta = 0)."""

    def __init__(self, batch: int = 40, seed: int = 0, model: str = "eps") -> None:
        self.name = model
        super().__init__(make_ddim_pipeline(name=model), batch, seed)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def _call(self, steps: int, sigmas: Any = None) -> np.ndarray:
        if sigmas is not None:
            raise ValueError("sigmas: DDIMPipeline takes no custom grid")
        gen = torch.Generator().manual_seed(self.seed)
        if not isinstance(self.pipe.scheduler, DDIMScheduler):
            return self._loop(steps, gen)
        out = self.pipe(batch_size=self.batch, generator=gen, num_inference_steps=steps, eta=0.0, output_type="np")
        return np.asarray(out.images).transpose(0, 3, 1, 2) * 2.0 - 1.0

    @torch.no_grad()
    def _loop(self, steps: int, gen: torch.Generator) -> np.ndarray:
        """DDIMPipeline's loop for a scheduler whose ``step`` takes no ``eta`` (DPM-Solver, UniPC): same noise."""
        unet, scheduler = self.pipe.unet, self.pipe.scheduler
        size = unet.config.sample_size
        x = randn_tensor((self.batch, unet.config.in_channels, size, size), generator=gen) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        return (x / 2 + 0.5).clamp(0, 1).numpy() * 2.0 - 1.0


def step_jitter(setup: Setup) -> float:
    """How unsmooth the denoiser's output is along the full sampler: the median over steps of
    ``||f_{n+1} - 2 f_n + f_{n-1}|| / ||f_n||`` (first guidance branch). Smooth outputs make extrapolation easy."""
    outputs: list[torch.Tensor] = []

    def keep(module: Any, args: Any, out: Any) -> None:
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        outputs.append(out.detach().double().clone())

    handle = setup.denoiser.register_forward_hook(keep)
    try:
        setup.run("jitter", "full")
    finally:
        handle.remove()
    f = torch.stack(outputs[:: setup.branches]).flatten(1)
    second = (f[2:] - 2 * f[1:-1] + f[:-2]).norm(dim=1) / f[1:-1].norm(dim=1)
    return float(second.median())


def make_setup(model: str, batch: int, seed: int = 0) -> Setup:
    """The setup of zoo model `model`: a `FlowSetup` for the DiTs (labels ``arange(batch) % 10``), an `EpsSetup`
    for the UNets."""
    if model in FLOW_MODELS:
        return FlowSetup(batch, seed, model=model)
    if model in UNET_MODELS:
        return EpsSetup(batch, seed, model=model)
    raise ValueError(f"model must be one of {(*FLOW_MODELS, *UNET_MODELS)}, got {model!r}")


GridBlock = tuple[str, list[str], list[tuple[str, np.ndarray]]]
"""One block of an image grid: a title, column headers (may be empty) and labelled rows of images ``(N, 1, H, W)``."""


def grid_image(
    blocks: list[GridBlock], per_row: int = 10, min_tile: int = 64, label_width: int = 0, pad: int = 2
) -> Any:
    """The blocks drawn one under the other as one greyscale ``PIL.Image``: per block its title and the column headers
    (each a line of text, left out when empty), then one row per entry, its label on the left and its first
    `per_row` images ``(1, H, W)`` in [-1, 1].

    Every image is scaled (nearest neighbour, by an integer factor) to one tile size, the smallest multiple of all
    the image sizes that is at least `min_tile` pixels, so the columns of blocks of different image sizes line up
    (28x28 and 16x16: 112 px). The label column is as wide as the widest label (at least `label_width`), so no label
    is cut.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not blocks or not all(rows for _, _, rows in blocks):
        raise ValueError("blocks must be a non-empty list of (title, headers, rows) with at least one row each")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        _, _, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return int(right), int(bottom)

    sizes = {int(images.shape[-1]) for _, _, rows in blocks for _, images in rows}
    base = math.lcm(*sizes)
    tile = base * max(1, math.ceil(min_tile / base))
    n = min(per_row, max(len(images) for _, _, rows in blocks for _, images in rows))
    labels = [label for _, _, rows in blocks for label, _ in rows] + [title for title, _, _ in blocks]
    label_width = max(label_width, *(text_size(label)[0] + 12 for label in labels))
    line = text_size("Ag")[1] + 6
    height = sum(line * (bool(title) + bool(headers)) + len(rows) * (tile + pad) for title, headers, rows in blocks)
    canvas = Image.new("L", (label_width + n * (tile + pad), height + pad), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, headers, rows in blocks:
        if title:
            draw.text((4, y + 3), title, fill=0, font=font)
            y += line
        if headers:
            for i, header in enumerate(headers[:n]):
                x = label_width + i * (tile + pad) + (tile - text_size(header)[0]) // 2
                draw.text((x, y + 3), header, fill=0, font=font)
            y += line
        for label, images in rows:
            draw.multiline_text((4, y + (tile - text_size(label)[1]) // 2), label, fill=0, font=font)
            for i, img in enumerate(images[:per_row]):
                pixels = ((np.clip(img[0], -1, 1) + 1) * 127.5).astype(np.uint8)
                canvas.paste(
                    Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST),
                    (label_width + i * (tile + pad), y),
                )
            y += tile + pad
    return canvas


def save_grid(blocks: list[GridBlock], path: Any, per_row: int = 10, min_tile: int = 64) -> None:
    """Write :func:`grid_image` of `blocks` to `path` (PNG)."""
    grid_image(blocks, per_row, min_tile).save(path)


def save_rows(
    rows: list[tuple[str, np.ndarray]], path: Any, label_width: int = 0, per_row: int = 10, min_tile: int = 64
) -> None:
    """One labelled row of images (each ``(1, H, W)`` in [-1, 1], at most `per_row`) per entry, as one PNG
    (:func:`grid_image` with one untitled block; the label column is at least `label_width` wide)."""
    grid_image([("", [], rows)], per_row, min_tile, label_width).save(path)


class Scorer:
    """PSNR / SSIM against a reference run; Frechet distance to the real images and class accuracy, both measured by
    the shipped classifier that scores zoo model `model` (:func:`metrics.classifier_for`), the Frechet distance
    against that classifier's shipped reference statistics (:func:`metrics.load_reference_stats`)."""

    def __init__(self, model: str = "flow") -> None:
        self.classifier_name = classifier_for(model)
        self.classifier = load_classifier(name=self.classifier_name)
        self.reference = load_reference_stats(self.classifier_name)

    def score(self, run: Run, reference: Run, labels: Any = None) -> Run:
        features = classifier_features(run.images, self.classifier)
        run.scores = {
            "psnr": psnr(run.images, reference.images, data_range=2.0),
            "ssim": ssim(run.images, reference.images, data_range=2.0),
            "fd": frechet_distance_of_stats(feature_stats(features), self.reference),
        }
        if labels is not None:
            run.scores["accuracy"] = classifier_accuracy(run.images, labels, self.classifier)
        return run


def diffusers_cache(config: Any) -> Callable[[torch.nn.Module], Callable[[], None]]:
    """`apply(denoiser) -> undo` for one of diffusers' own caches (`CacheMixin.enable_cache`)."""

    def apply(module: Any) -> Callable[[], None]:
        module.enable_cache(config)
        return cast(Callable[[], None], module.disable_cache)

    return apply


def _float_lists(text: str) -> list[list[float]]:
    found = []
    for line in text.splitlines():
        try:
            value = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            found.append([float(v) for v in value])
    return found


def magcache_ratios(setup: Setup, steps: int = STEPS) -> list[float]:
    """Calibrate diffusers' MagCache on this model (mean over guidance branches).

    Its calibration mode only prints the ratios, so they are read from the captured output.
    """
    from diffusers import MagCacheConfig

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        setup.run(
            "magcache-calibration",
            "calibration",
            apply=diffusers_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps)),
            steps=steps,
        )
    lists = [r for r in _float_lists(buffer.getvalue()) if len(r) == steps]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(np.mean(col)) for col in zip(*lists, strict=True)]
