"""diffusers' cache contract (what its CacheTesterMixin checks of its own caches), for `apply_ab_cache`.

On the tiny random-init Flux, SD3 and Wan transformers: the enabled state, the hooks registered and all removed,
inference that differs from the uncached model and has no NaN, equal first passes in two cache contexts, the reset
of the stateful cache; one cache at a time with diffusers' own `enable_cache`, in either order; and
`torch.compile(fullgraph=True)` without recompilation over two pipeline calls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from abcache_diffusers import (
    AB_CACHE_HOOK,
    ABCacheConfig,
    ABCacheHook,
    apply_ab_cache,
    enable_ab_cache,
    get_ab_cache_hook,
    remove_ab_cache,
)
from abcore import ABConfig
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.cache_utils import CacheMixin

STEPS = 12
SETTINGS = dict(order=2, interval=3, warmup=2, cooldown=1)  # computes steps 0, 1, 3, 6, 9, 11 of 12
MODELS = ("flux", "sd3", "wan")


def _inputs(name: str) -> dict[str, Any]:
    """Dummy forward inputs for the tiny transformers of conftest (the timestep is set per step)."""
    g = torch.Generator().manual_seed(3)
    if name == "flux":
        ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
        return dict(
            hidden_states=torch.randn(1, 16, 4, generator=g),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            img_ids=torch.cat([torch.zeros(16, 1), ids.float()], dim=1),
            txt_ids=torch.zeros(8, 3),
        )
    if name == "sd3":
        return dict(
            hidden_states=torch.randn(1, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
        )
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 16, generator=g)
    )


def _model(name: str, tiny) -> tuple[torch.nn.Module, FlowMatchEulerDiscreteScheduler, list[int]]:
    pipe, _ = tiny.BUILDERS[name]()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    return pipe.transformer, scheduler, tiny.count_forward(pipe.transformer)


def _call(name: str, model: torch.nn.Module, inputs: dict[str, Any], t: torch.Tensor, step: int) -> torch.Tensor:
    """One denoiser call at timestep `t`; the input varies with the step, as in a denoising loop."""
    hidden = inputs["hidden_states"] + 0.1 * step
    timestep = (t / 1000 if name == "flux" else t).expand(1)  # FLUX's pipeline passes timestep / 1000
    with torch.no_grad():
        return model(**{**inputs, "hidden_states": hidden}, timestep=timestep, return_dict=False)[0]


def _context(model: torch.nn.Module, name: str) -> Any:
    """`model.cache_context(name)`; SD3's transformer is not a `CacheMixin`, but its mechanism applies all the same."""
    return CacheMixin.cache_context(model, name)


def _hooks_named(model: torch.nn.Module, hook_name: str) -> int:
    registries = (getattr(m, "_diffusers_hook", None) for m in model.modules())
    return sum(r is not None and r.get_hook(hook_name) is not None for r in registries)


@pytest.mark.parametrize("name", MODELS)
def test_enable_disable_state_and_hooks_all_removed(name, tiny):
    model, scheduler, _ = _model(name, tiny)
    forward = model.forward
    assert get_ab_cache_hook(model) is None
    hook = apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
    assert isinstance(hook, ABCacheHook) and get_ab_cache_hook(model) is hook
    assert _hooks_named(model, AB_CACHE_HOOK) == 1  # one hook, on the denoiser itself
    with pytest.raises(ValueError, match="already applied"):
        apply_ab_cache(model, ABCacheConfig(), scheduler=scheduler)
    # diffusers' cache bookkeeping sees it (issue 17 item 6), where the model has it (CacheMixin)
    assert getattr(model, "is_cache_enabled", True)
    remove_ab_cache(model)
    assert not getattr(model, "is_cache_enabled", False)
    assert get_ab_cache_hook(model) is None and _hooks_named(model, AB_CACHE_HOOK) == 0
    assert not model._diffusers_hook.hooks
    assert model.forward == forward  # the original forward is back
    remove_ab_cache(model)  # a no-op once removed


@pytest.mark.parametrize("name", MODELS)
def test_inference_differs_from_uncached_at_predicted_steps_and_has_no_nan(name, tiny):
    model, scheduler, calls = _model(name, tiny)
    inputs = _inputs(name)
    uncached = [_call(name, model, inputs, t, i) for i, t in enumerate(scheduler.timesteps)]
    apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
    calls[0] = 0
    with _context(model, "cond"):
        cached = [_call(name, model, inputs, t, i) for i, t in enumerate(scheduler.timesteps)]
    computed = [0, 1, 3, 6, 9, 11]
    assert calls[0] == len(computed) == ABConfig(**SETTINGS).num_computed(STEPS)
    for i, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        assert torch.isfinite(a).all()
        if i in computed[:2]:  # before any prediction the model's own output
            assert torch.equal(a, b)
        elif i not in computed:  # a prediction: an approximation
            assert not torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_first_pass_in_two_contexts_is_equal_and_reset_starts_afresh(name, tiny):
    model, scheduler, calls = _model(name, tiny)
    inputs = _inputs(name)
    t0 = scheduler.timesteps[0]
    uncached = _call(name, model, inputs, t0, 0)
    hook = apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
    calls[0] = 0
    with _context(model, "context_1"):
        first = _call(name, model, inputs, t0, 0)
    with _context(model, "context_2"):
        second = _call(name, model, inputs, t0, 0)
    assert torch.equal(first, second) and torch.equal(first, uncached)
    assert calls[0] == 2  # each context computes its first step
    with _context(model, "context_1"):
        for i, t in enumerate(scheduler.timesteps[1:4], start=1):
            _call(name, model, inputs, t, i)
    with _context(model, "context_1"):
        ((state, _, _),) = hook.state_manager.get_state().runs.values()
    assert len(state.history) == 2  # order 2: the last two computed outputs
    model._reset_stateful_cache()
    assert hook.state_manager.branches() == []
    calls[0] = 0
    with _context(model, "context_1"):
        again = _call(name, model, inputs, t0, 0)
    assert calls[0] == 1 and torch.equal(again, uncached)


@pytest.mark.parametrize("ours_first", [True, False])
def test_one_cache_at_a_time_with_diffusers_own_in_either_order(ours_first, tiny):
    """Issue 17 item 6: with AB-Cache on, `enable_cache(FirstBlockCacheConfig(...))` succeeded and two caches ran."""
    from diffusers.hooks import FirstBlockCacheConfig

    model, scheduler, _ = _model("flux", tiny)
    inputs = _inputs("flux")
    if ours_first:
        apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
        assert model.is_cache_enabled
        with pytest.raises(ValueError, match="already been enabled"):
            model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with _context(model, "cond"):
            outs = [_call("flux", model, inputs, t, i) for i, t in enumerate(scheduler.timesteps)]
        assert all(torch.isfinite(o).all() for o in outs)
        remove_ab_cache(model)
    else:
        model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(ValueError, match="FirstBlockCacheConfig"):
            apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
        assert get_ab_cache_hook(model) is None
        model.disable_cache()
    assert not model.is_cache_enabled
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in model.modules())
    # and then the other cache can be enabled and disabled again
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    model.disable_cache()
    apply_ab_cache(model, ABCacheConfig(**SETTINGS), scheduler=scheduler)
    remove_ab_cache(model)


def test_compiled_forward_fullgraph_does_not_recompile_over_two_pipeline_calls(tiny):
    """The hook decides on the host (`torch.compiler.disable`), so the hooked forward cannot be one graph; the
    denoiser's own forward, compiled with fullgraph=True before the hook, runs under it with no recompilation."""
    from torch._dynamo.utils import counters

    pipe, kwargs = tiny.BUILDERS["sd3"]()
    enable_ab_cache(pipe, ABCacheConfig(**SETTINGS))
    eager = [tiny.run(pipe, kwargs) for _ in range(2)]

    pipe, kwargs = tiny.BUILDERS["sd3"]()  # the same seeded weights
    pipe.transformer.forward = torch.compile(pipe.transformer.forward, fullgraph=True, backend="eager")
    calls = tiny.count_forward(pipe.transformer)  # counts the compiled forward's calls, outside the graph
    enable_ab_cache(pipe, ABCacheConfig(**SETTINGS))
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [tiny.run(pipe, kwargs) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once, reused by every computed step
    assert calls[0] == 2 * ABConfig(**SETTINGS).num_computed(STEPS)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
