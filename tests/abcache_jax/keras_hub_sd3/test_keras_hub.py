"""`abcache_jax.keras_hub` on a tiny random-init keras-hub Stable Diffusion 3 (KERAS_BACKEND=jax; nothing downloaded).

The denoiser calls are counted where they happen: a `jax.debug.callback` in the MMDiT's `call`, which
runs only when a `lax.cond` branch that calls it is taken. The oracles are keras-hub's own generate
function and `abcore.sample` (numpy) driven by keras-hub's own `denoise_step`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported: these tests are about the JAX backend

import abcore
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import jax  # noqa: E402
import keras  # noqa: E402
from abcache_jax.keras_hub import computed_steps, disable_ab_cache, enable_ab_cache  # noqa: E402
from keras_hub.src.models.clip.clip_preprocessor import CLIPPreprocessor  # noqa: E402
from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder  # noqa: E402
from keras_hub.src.models.clip.clip_tokenizer import CLIPTokenizer  # noqa: E402
from keras_hub.src.models.vae.vae_backbone import VAEBackbone  # noqa: E402

GUIDANCE = 7.0
README = Path(__file__).resolve().parents[3] / "packages" / "abcache-jax" / "README.md"


def build_sd3(image_size: int = 64, hidden_dim: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A random-init `StableDiffusion3TextToImage` from explicit arguments, with a 14-token BPE vocabulary."""
    keras.utils.set_random_seed(seed)
    merges = ["a i", "p l", "n e</w>", "p o", "r t</w>", "ai r", "pl a", "po rt</w>", "pla ne</w>"]
    vocab = sorted({p for m in merges for p in m.split()} | {m.replace(" ", "") for m in merges})
    vocab = {token: i for i, token in enumerate([*vocab, "<|endoftext|>", "<|startoftext|>"])}
    preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor(
        CLIPPreprocessor(CLIPTokenizer(vocab, merges, pad_with_end_token=True)),
        CLIPPreprocessor(CLIPTokenizer(vocab, merges)),
    )
    backbone = keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=hidden_dim,
        mmdit_num_layers=num_layers,
        mmdit_num_heads=num_heads,
        mmdit_position_size=192,
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=VAEBackbone([32] * 4, [1] * 4, [32] * 4, [1] * 4, sampler_method="mode", name="vae"),
        clip_l=CLIPTextEncoder(20, 64, 64, 2, 2, 128, "quick_gelu", -2, name="clip_l"),
        clip_g=CLIPTextEncoder(20, 128, 128, 2, 2, 256, "gelu", -2, name="clip_g"),
        image_shape=(image_size, image_size, 3),
    )
    return keras_hub.models.StableDiffusion3TextToImage(backbone, preprocessor)


class Calls:
    """Counts the MMDiT's executions (a host callback in its `call`)."""

    def __init__(self, diffuser) -> None:
        self.count = 0
        original = diffuser.call

        def counted(*args, **kwargs):
            jax.debug.callback(self._add)
            return original(*args, **kwargs)

        object.__setattr__(diffuser, "call", counted)

    def _add(self) -> None:
        self.count += 1


@pytest.fixture(scope="module")
def sd3():
    """(task, calls, latents, token_ids) of one tiny SD3, shared by the module."""
    task = build_sd3()
    calls = Calls(task.backbone.diffuser)
    latents = keras.random.normal((1, *task.latent_shape[1:]), seed=3)
    preprocess = task.preprocessor.generate_preprocess
    return task, calls, latents, (preprocess(["airplane"]), preprocess([""]))


def generate(sd3, num_steps: int, guidance: float | None = GUIDANCE) -> tuple[np.ndarray, int]:
    """The float images of the installed generate function on fixed latents, and the denoiser calls it made."""
    task, calls, latents, token_ids = sd3
    task.backbone.configure_scheduler(num_steps)  # what StableDiffusion3TextToImage.generate does first
    task.generate_function = None  # keras-hub's own compiled function keeps its first sigma table
    fn = task.make_generate_function()
    calls.count = 0
    scale = None if guidance is None else keras.ops.convert_to_tensor(guidance)
    images = np.asarray(fn(latents, token_ids, keras.ops.convert_to_tensor(num_steps, "int32"), scale))
    return images, calls.count


@pytest.fixture(scope="module")
def stock(sd3):
    """keras-hub's own images and calls: {(num_steps, guidance): (images, calls)}."""
    disable_ab_cache(sd3[0])
    return {key: generate(sd3, *key) for key in [(8, GUIDANCE), (28, GUIDANCE), (8, None)]}


@pytest.mark.parametrize(("num_steps", "guidance"), [(8, GUIDANCE), (28, GUIDANCE), (8, None)])
def test_every_step_computed_is_stock_bit_for_bit(sd3, stock, num_steps, guidance):
    images, calls = stock[num_steps, guidance]
    assert calls == num_steps and np.all(np.isfinite(images))
    enable_ab_cache(sd3[0], abcore.ABConfig(interval=1))
    got, got_calls = generate(sd3, num_steps, guidance)
    np.testing.assert_array_equal(got, images)
    assert got_calls == num_steps and computed_steps(sd3[0]).all()


@pytest.mark.parametrize(
    ("interval", "num_steps", "expected"),
    [
        # the default budget, 5 + n // 5 calls: under 9 calls crowding towards the end, where SD3's shifted sigma
        # steps are longest; from 9 calls one warm-up step, the last 3 steps and the rest evenly
        (None, 8, [0, 2, 4, 5, 6, 7]),
        (None, 28, [0, 2, 7, 10, 15, 19, 23, 25, 26, 27]),
        # interval=5: the previous default, the fixed schedule (warm-up 2, cool-down 4)
        (5, 8, [0, 1, 4, 5, 6, 7]),
        (5, 28, [0, 1, 5, 10, 15, 20, 24, 25, 26, 27]),
    ],
)
def test_default_config_calls_the_denoiser_at_the_planned_steps(sd3, stock, interval, num_steps, expected):
    config = abcore.ABConfig(interval=interval)
    enable_ab_cache(sd3[0], None if interval is None else config)
    images, calls = generate(sd3, num_steps)
    assert calls == len(expected) == config.num_computed(num_steps)
    np.testing.assert_array_equal(np.flatnonzero(computed_steps(sd3[0])), expected)
    assert np.all(np.isfinite(images)) and not np.array_equal(images, stock[num_steps, GUIDANCE][0])


def test_default_config_matches_the_numpy_reference_on_keras_hubs_own_step(sd3, monkeypatch):
    # abcore.sample (float64 numpy) on keras-hub's denoise_step, its Euler step removed so that it
    # returns the guided velocity; the same latents decoded by keras-hub. Checks the weights, the
    # correction on the Euler step and the sigma table, not only the call pattern.
    task, _, latents, (tokens, negative) = sd3
    n = 28
    enable_ab_cache(task)
    images, _ = generate(sd3, n)
    backbone = task.backbone
    backbone.configure_scheduler(n)
    sigmas = np.asarray(backbone.scheduler.sigmas, np.float64)
    embeddings = backbone.encode_text_step(tokens, negative)
    monkeypatch.setattr(backbone, "euler_step", lambda latents, noise, sigma, sigma_next: noise)

    def velocity(x, sigma):
        (step,) = np.flatnonzero(sigmas == sigma)
        v = backbone.denoise_step(keras.ops.convert_to_tensor(x, "float32"), embeddings, int(step), n, GUIDANCE)
        return np.asarray(v, np.float64)

    config = abcore.ABConfig()
    steps = abcore.LinearSteps.euler(sigmas)
    ref = abcore.sample(velocity, np.asarray(latents, np.float64), sigmas, None, config, steps=steps)
    np.testing.assert_array_equal(ref.computed, computed_steps(task))
    want = np.asarray(backbone.decode_step(keras.ops.convert_to_tensor(ref.x, "float32")))
    np.testing.assert_allclose(images, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_uncorrected_config_differs_from_the_corrected_default(sd3):
    enable_ab_cache(sd3[0])
    corrected, _ = generate(sd3, 28)
    enable_ab_cache(sd3[0], abcore.ABConfig(correct=False))
    uncorrected, calls = generate(sd3, 28)
    assert calls == 10 and not np.allclose(corrected, uncorrected, rtol=0, atol=1e-6)


def test_repeated_calls_with_other_step_counts_and_compile_give_identical_images(sd3):
    task = sd3[0]
    enable_ab_cache(task)
    first = task.generate("airplane", num_steps=28, seed=7)
    counts = [int(computed_steps(task).sum())]
    ten = task.generate("airplane", num_steps=10, seed=7)
    counts.append(int(computed_steps(task).sum()))
    again = task.generate("airplane", num_steps=28, seed=7)
    counts.append(int(computed_steps(task).sum()))
    task.compile()
    compiled = task.generate("airplane", num_steps=28, seed=7)
    counts.append(int(computed_steps(task).sum()))
    assert counts == [10, 7, 10, 10]
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3) and first.std() > 0 and ten.std() > 0
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(compiled, first)
    # the float images too (a NaN image is all zeros in uint8): 28 after 10 equals 28 before it
    before, _ = generate(sd3, 28)
    generate(sd3, 10)
    after, _ = generate(sd3, 28)
    assert np.all(np.isfinite(after))
    np.testing.assert_array_equal(after, before)


def test_config_options_reach_the_loop(sd3, stock):
    task = sd3[0]
    mask = (True, True, False, True, False, False, True, True)
    enable_ab_cache(task, abcore.ABConfig(order=3, compute_mask=mask))
    _, calls = generate(sd3, 8)
    assert calls == 5 and computed_steps(task).tolist() == list(mask)
    # adaptive, any error too large: every step computes, so the image is keras-hub's bit for bit
    enable_ab_cache(task, abcore.ABConfig(tolerance=1e-12, cooldown=0))
    images, calls = generate(sd3, 8)
    assert calls == 8
    np.testing.assert_array_equal(images, stock[8, GUIDANCE][0])
    # adaptive, any error small enough: at most max_predicted steps in a row are predicted
    enable_ab_cache(task, abcore.ABConfig(tolerance=1e3, max_predicted=2, cooldown=0))
    images, calls = generate(sd3, 8)
    assert calls == 4 and computed_steps(task).tolist() == [True, True, False, False, True, False, False, True]
    assert np.all(np.isfinite(images))


def test_disable_restores_keras_hubs_loop(sd3, stock):
    task = sd3[0]
    enable_ab_cache(task)
    disable_ab_cache(task)
    assert "make_generate_function" not in task.__dict__ and computed_steps(task) is None
    images, calls = generate(sd3, 8)
    assert calls == 8
    np.testing.assert_array_equal(images, stock[8, GUIDANCE][0])


def test_bad_arguments_name_the_parameter(sd3):
    with pytest.raises(TypeError, match="task"):
        enable_ab_cache(object())
    with pytest.raises(TypeError, match="config"):
        enable_ab_cache(sd3[0], {"order": 2})


def test_readme_example_runs(sd3):
    # The README's keras-hub example, on the tiny model instead of the preset it downloads.
    task, calls = sd3[0], sd3[1]
    text = README.read_text().split("## keras-hub: Stable Diffusion 3")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    preset = 'keras_hub.models.StableDiffusion3TextToImage.from_preset("stable_diffusion_3_medium")'
    assert preset in code
    namespace = {"TINY": task}
    calls.count = 0
    exec(compile(code.replace(preset, "TINY"), str(README), "exec"), namespace)
    jax.effects_barrier()
    assert calls.count == 10 + abcore.ABConfig(order=3, warmup=3, interval=6).num_computed(50) == 10 + 14
    assert namespace["image"].shape == (64, 64, 3) and namespace["image"].dtype == np.uint8
    assert "make_generate_function" not in task.__dict__
