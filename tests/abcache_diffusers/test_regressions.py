"""Issue 17's wrong answers and crashes on the tiny pipelines, each reproduced before the per-context hook."""

from __future__ import annotations

import pathlib
import re
import warnings

import diffusers
import numpy as np
import pytest
import torch
from abcache_diffusers import (
    ABCacheConfig,
    ExactLMSDiscreteScheduler,
    disable_ab_cache,
    enable_ab_cache,
    get_ab_cache_hook,
)
from abcore import ABConfig

SOURCES = pathlib.Path(__file__).parents[2] / "packages"


class _Stop(Exception):
    pass


def _interrupt_after(module: torch.nn.Module, calls: int) -> None:
    """Make `module.forward` raise at its `calls`-th call from now (an interrupted or failed generation)."""
    forward, count = module.forward, [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            module.forward = forward
            raise _Stop
        return forward(*args, **kwargs)

    module.forward = failing


def test_a_failed_call_of_a_from_pipe_sibling_never_changes_the_next_call(tiny):
    """Item 1: after an exception inside a call of a `from_pipe` sibling with its own scheduler, the original
    pipeline's next call cached on the sibling's grid, silently (max |diff| 0.028-0.058)."""
    pipe, kwargs = tiny.BUILDERS["dit"]()
    enable_ab_cache(pipe)
    before = tiny.run(pipe, kwargs)
    other = diffusers.DiTPipeline.from_pipe(pipe, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
    enable_ab_cache(other)  # follow the sibling's scheduler (same config)
    _interrupt_after(pipe.transformer, 5)
    with pytest.raises(_Stop):
        tiny.run(other, kwargs, num_inference_steps=17)
    enable_ab_cache(pipe)  # and back
    assert torch.equal(tiny.run(pipe, kwargs), before)
    # an interrupted call of the pipeline itself does not leak into its next call either
    _interrupt_after(pipe.transformer, 7)
    with pytest.raises(_Stop):
        tiny.run(pipe, kwargs, num_inference_steps=15)
    assert torch.equal(tiny.run(pipe, kwargs), before)


def test_a_sibling_the_hook_does_not_follow_runs_uncached_with_one_warning_saying_what_to_call(tiny):
    pipe, kwargs = tiny.BUILDERS["dit"]()
    calls = tiny.count_forward(pipe.transformer)
    enable_ab_cache(pipe)
    tiny.run(pipe, kwargs)
    other = diffusers.DiTPipeline.from_pipe(pipe, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
    disable_ab_cache(pipe)
    reference = tiny.run(other, kwargs, num_inference_steps=13)
    enable_ab_cache(pipe)
    tiny.run(pipe, kwargs)
    calls[0] = 0
    with pytest.warns(UserWarning, match=r"enable_ab_cache\(that_pipeline\)") as record:
        assert torch.equal(tiny.run(other, kwargs, num_inference_steps=13), reference)
        tiny.run(other, kwargs, num_inference_steps=13)
    assert len([w for w in record if "enable_ab_cache" in str(w.message)]) == 1
    assert calls[0] == 2 * 13  # never silently wrong: uncached
    enable_ab_cache(other)
    calls[0] = 0
    followed = tiny.run(other, kwargs, num_inference_steps=13)
    assert calls[0] == ABConfig().num_computed(13)
    fresh, _ = tiny.BUILDERS["dit"]()  # the same seeded weights, freshly enabled with that scheduler
    fresh.scheduler = diffusers.DDIMScheduler.from_config(fresh.scheduler.config)
    enable_ab_cache(fresh)
    assert torch.equal(tiny.run(fresh, kwargs, num_inference_steps=13), followed)


def test_a_refused_scheduler_does_not_outlive_its_swap(tiny):
    """Item 1: after a refused `correct=True` scheduler the pipeline kept raising once the scheduler was swapped back."""
    pipe, kwargs = tiny.BUILDERS["dit"]()
    linear = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.scheduler = linear
    enable_ab_cache(pipe, ABCacheConfig(correct=True))
    reference = tiny.run(pipe, kwargs)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(linear.config)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        tiny.run(pipe, kwargs)
    pipe.scheduler = linear
    assert torch.equal(tiny.run(pipe, kwargs), reference)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_force_caches_a_short_run_instead_of_crashing(steps, tiny):
    """Item 3: `ABCacheConfig(force=True)` on a 1-3 step call crashed: "cooldown=4 is longer than the run"."""
    pipe, kwargs = tiny.BUILDERS["flux"]()
    reference = tiny.run(pipe, kwargs, num_inference_steps=steps)
    enable_ab_cache(pipe, ABCacheConfig(force=True))
    assert torch.equal(tiny.run(pipe, kwargs, num_inference_steps=steps), reference)  # all forced: computed


def test_force_on_img2img_at_a_small_strength(tiny):
    from diffusers import FluxImg2ImgPipeline

    base, kwargs = tiny.BUILDERS["flux"]()
    pipe = FluxImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    enable_ab_cache(pipe, ABCacheConfig(force=True))
    for strength in (0.05, 0.1, 0.15):
        out = tiny.run(pipe, kwargs, image=image, strength=strength, num_inference_steps=28)
        assert torch.isfinite(out).all()


def test_direct_calls_alternating_return_dict(tiny):
    """Item 4: direct calls of the hooked transformer alternating `return_dict` raised "call reset() between
    generations"; each structure now keeps its own history and every call returns what it asked for."""
    pipe, kwargs = tiny.BUILDERS["wan"]()
    model, scheduler = pipe.transformer, pipe.scheduler
    enable_ab_cache(pipe, ABCacheConfig(interval=2, warmup=1, cooldown=0))
    scheduler.set_timesteps(12)
    x = torch.randn((1, 4, 2, 2, 2), generator=torch.Generator().manual_seed(7))
    embeds = kwargs["prompt_embeds"]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            flag = i % 2 == 0
            out = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds, return_dict=flag)
            assert isinstance(out, tuple) != flag
            assert torch.isfinite(out[0] if not flag else out.sample).all()


def test_kdpm2_ancestral_runs_and_interval_1_is_uncached(tiny):
    """Item 2: KDPM2AncestralDiscreteScheduler crashed even with interval=1 ("sigma must be positive")."""
    pipe, kwargs = tiny.BUILDERS["dit"]()
    pipe.scheduler = diffusers.KDPM2AncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(0)
    reference = tiny.run(pipe, kwargs, num_inference_steps=20)
    enable_ab_cache(pipe, ABCacheConfig(interval=1))
    torch.manual_seed(0)
    assert torch.equal(tiny.run(pipe, kwargs, num_inference_steps=20), reference)
    disable_ab_cache(pipe)
    enable_ab_cache(pipe, ABCacheConfig(abscissa="sigma"))
    torch.manual_seed(0)
    assert torch.isfinite(tiny.run(pipe, kwargs, num_inference_steps=20)).all()
    grid, s = get_ab_cache_hook(pipe.transformer).grid, pipe.scheduler
    n = grid.size
    np.testing.assert_allclose(grid[0::2], s.sigmas.double().numpy()[0:n:2])  # first-order calls at sigma_j
    np.testing.assert_allclose(grid[1::2], s.sigmas_interpol.double().numpy()[0 : n - 1 : 2])  # then interpolated
    assert np.all(grid > 0)


@pytest.mark.parametrize(
    "setup",
    [dict(steps_offset=1, timestep_spacing="leading", num=50), dict(num=1000)],
    ids=["sd15-leading", "1000-steps"],
)
def test_exact_lms_with_equal_sigmas_follows_diffusers(setup):
    """Item 7: ExactLMSDiscreteScheduler.step raised "grid must be strictly increasing" where sigmas repeat."""
    options = {k: v for k, v in setup.items() if k != "num"}
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **options)
    ours, theirs = ExactLMSDiscreteScheduler(**config), diffusers.LMSDiscreteScheduler(**config)
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(setup["num"])
        x = x0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps[:60]:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x).prev_sample
        results.append(x)
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_exact_lms_pipeline_reloads_with_from_pretrained(tmp_path, tiny):
    """Item 9: a pipeline saved with it named the private module `abcache_diffusers._lms` in model_index.json."""
    pipe, _ = tiny.BUILDERS["dit"]()
    pipe.scheduler = ExactLMSDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is ExactLMSDiscreteScheduler


def test_no_caller_frame_inspection_in_any_package():
    """The hook takes what diffusers hands it; no package walks the caller's frames."""
    pattern = re.compile(r"sys\._getframe|inspect\.(stack|currentframe|getouterframes)|f_back|f_locals")
    offenders = [p for p in SOURCES.glob("*/src/**/*.py") if pattern.search(p.read_text())]
    assert offenders == []
