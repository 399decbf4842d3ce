"""ABCache behaviour: time lookup, CFG contexts, generation reset, fallbacks, stats, bad input, compile."""

from __future__ import annotations

import math

import abcore
import pytest
import torch
from abcache_torch import ABCache, CacheEngine, extrapolate

CONFIG = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
TIMES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # computes steps 0, 1, 3, 6


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls: list[tuple[str, float]] = []

    def forward(self, x, t=None, *, cond=None, timestep=None, sigma=None):
        time = next(v for v in (timestep, sigma, t) if v is not None)
        tf = float(time) if not isinstance(time, torch.Tensor) else float(time.reshape(-1)[0])
        self.calls.append(("x", tf))
        shift = 0.0 if cond is None else cond
        return (x * tf + shift).detach() * self.scale.detach()


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        (lambda m, x, t: m(x, t), {}),
        (lambda m, x, t: m(x, timestep=t), {}),
        (lambda m, x, t: m(x, sigma=torch.tensor(t)), {}),
        (lambda m, x, t: m(x, torch.full((3,), t)), {}),
        (lambda m, x, t: m(x, None, timestep=t), {"time_arg": "timestep"}),
        (lambda m, x, t: m(x, t), {"time_arg": 1}),
        (lambda m, x, t: m(x, t), {"time_fn": lambda a, k: -math.log(a[1])}),
    ],
    ids=["positional", "timestep", "sigma-0d", "batch", "time_arg-str", "time_arg-int", "time_fn"],
)
def test_time_is_read_from_the_call(call, kwargs):
    model = Recorder()
    cache = ABCache(model, CONFIG, **kwargs)
    x = torch.ones(3, 2)
    outs = [call(cache, x, t) for t in TIMES]
    assert [c[1] for c in model.calls] == pytest.approx([1.0, 0.9, 0.7, 0.4])
    assert cache.stats.computed == 4 and cache.stats.predicted == 3
    # linear extrapolation is exact for an output linear in t (on the sigma abscissa)
    if "time_fn" not in kwargs:
        torch.testing.assert_close(outs[2], x * 0.8 * 2.0)


def test_wrapper_delegates_attributes():
    model = Recorder()
    cache = ABCache(model, CONFIG)
    assert cache.scale is model.scale
    assert "Recorder" in repr(cache)


def test_cfg_contexts_have_separate_histories():
    model = Recorder()
    cache = ABCache(model, CONFIG)
    x = torch.ones(2)
    cond_out, uncond_out = [], []
    for t in TIMES:
        with cache.context("cond"):
            cond_out.append(cache(x, t, cond=torch.tensor(10.0)))
        with cache.context("uncond"):
            uncond_out.append(cache(x, t))
    assert len(model.calls) == 8
    assert cache.stats.contexts["cond"].computed == 4 and cache.stats.contexts["uncond"].predicted == 3
    # each prediction extrapolates its own branch exactly (outputs are linear in t)
    for i, t in enumerate(TIMES):
        torch.testing.assert_close(cond_out[i], (x * t + 10.0) * 2.0)
        torch.testing.assert_close(uncond_out[i], x * t * 2.0)
    assert "cond" in repr(cache.stats) and "uncond" in repr(cache.stats)


def test_same_time_twice_in_one_context_starts_fresh_history():
    model = Recorder()
    cache = ABCache(model, CONFIG)
    for t in TIMES[:3]:
        cache(torch.ones(2), t)
        cache(torch.ones(2), t)  # uncontexted CFG: never mixes, never predicts
    assert cache.stats.predicted == 0


@pytest.mark.parametrize("announce", [False, True])
def test_new_generation_when_time_goes_back_up(announce):
    model = Recorder()
    cache = ABCache(model, CONFIG, times=TIMES if announce else None)
    x = torch.ones(2)
    for t in TIMES[:5]:  # an aborted generation: computes 0, 1, 3; predicts 2, 4
        cache(x, t)
    second = [cache(x * 3.0, t) for t in TIMES]  # time goes back up (a float, read in both modes)
    assert [c[1] for c in model.calls] == pytest.approx([1.0, 0.9, 0.7, 1.0, 0.9, 0.7, 0.4])
    torch.testing.assert_close(second[2], x * 3.0 * 0.8 * 2.0)  # no output of the first generation used


def test_counter_wraps_after_announced_grid_and_reset():
    model = Recorder()
    cache = ABCache(model, CONFIG, times=TIMES)
    x = torch.ones(2)
    for _ in range(2):
        for t in TIMES:
            cache(x, torch.tensor(t))
    assert len(model.calls) == 8
    for t in TIMES[:3]:
        cache(x, torch.tensor(t))
    cache.reset()
    cache(x, torch.tensor(TIMES[0]))
    cache(x, torch.tensor(TIMES[1]))
    assert len(model.calls) == 8 + 2 + 2


def test_batch_change_starts_new_generation():
    model = Recorder()
    cache = ABCache(model, CONFIG, times=TIMES)
    for t in TIMES[:3]:
        cache(torch.ones(2, 2), torch.tensor(t))
    out = cache(torch.ones(4, 2), torch.tensor(TIMES[0]))  # new batch: step 0 again, computed
    assert out.shape == (4, 2)
    assert len(model.calls) == 3


def test_output_shape_change_drops_old_history():
    shapes = iter([(2,), (2,), (3,), (3,)])
    state = CacheEngine(abcore.ABConfig(order=2, interval=2, warmup=1, cooldown=0))
    outs = [state.step(t, lambda t=t: torch.full(next(shapes), t)) for t in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    # steps: 0 C, 1 P, 2 C, 3 P, ... with warmup 1 interval 2; forcing shapes through computed steps
    assert [o.shape for o in outs] == [(2,), (2,), (2,), (2,), (3,), (3,)]
    assert state.history_length() == 1
    torch.testing.assert_close(outs[5], torch.full((3,), 0.6))  # order capped to the one fresh entry


def test_non_finite_prediction_falls_back_and_is_counted():
    values = {1.0: 1.0, 0.9: 1e308, 0.8: 5.0, 0.7: 7.0}
    state = CacheEngine(
        abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0)
    )  # computes 0, 1, 4: steps 2, 3 predicted
    calls = []

    def compute(t):
        calls.append(t)
        return torch.tensor([values.get(t, 0.0)], dtype=torch.float64)

    outs = [state.step(t, lambda t=t: compute(t)) for t in (1.0, 0.9, 0.8, 0.7)]
    # step 2: 2 * 1e308 - 1 overflows -> computed instead; step 3: 2 * 5 - 1e308 is finite -> predicted
    assert calls == [1.0, 0.9, 0.8]
    assert state.stats.fallbacks == 1 and state.stats.computed == 3 and state.stats.predicted == 1
    assert outs[2].item() == 5.0
    assert outs[3].item() == pytest.approx(2 * 5.0 - 1e308, rel=1e-12)


def test_non_finite_fallback_with_announced_plan_replans():
    values = [1.0, 1e308, 5.0, 6.0, 7.0, 8.0]
    times = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    state = CacheEngine(abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0), times)
    calls = []

    def compute(i):
        calls.append(i)
        return torch.tensor([values[i]], dtype=torch.float64)

    outs = [state.step(None, lambda i=i: compute(i)) for i in range(6)]
    assert state.stats.fallbacks == 1
    # plan computes 0, 1, 4; the fallback at 2 makes the history (2, 1): step 3 predicts from it
    assert calls == [0, 1, 2, 4]
    assert math.isfinite(outs[3].item())


def test_adaptive_records_max_error_of_accepted_predictions():
    tolerance = 3e-2
    state = CacheEngine(abcore.ABConfig(order=3, interval=5, warmup=1, cooldown=0, tolerance=tolerance))
    for t in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]:
        state.step(t, lambda t=t: torch.tensor([math.exp(t), t]))
    assert (state.stats.computed, state.stats.predicted) == (6, 4)
    assert 1e-3 < state.stats.max_error <= tolerance
    d = state.stats.as_dict()
    assert d["saved_calls"] == d["predicted"] == 4 and d["steps"] == 10
    assert f"max_error={state.stats.max_error:.3g}" in repr(state.stats)


def test_stats_repr_and_properties():
    state = CacheEngine(CONFIG)
    for t in TIMES:
        state.step(t, lambda t=t: torch.tensor([t]))
    s = state.stats
    assert (s.computed, s.predicted, s.steps, s.saved_calls) == (4, 3, 7, 3)
    assert s.speedup_bound == pytest.approx(7 / 4)
    assert repr(s) == (
        "CacheStats(steps=7, computed=4, predicted=3, saved_calls=3, fallbacks=0, max_error=None, speedup_bound=1.75x)"
    )
    state.reset()
    assert state.stats.steps == 7
    state.reset_stats()
    assert state.stats.steps == 0


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: abcore.ABConfig(order=0), ValueError, "order"),
        (lambda: abcore.ABConfig(interval=0), ValueError, "interval"),
        (lambda: ABCache(lambda x, t: x, {"order": 2}), TypeError, "config"),
        (lambda: ABCache(3, CONFIG), TypeError, "model"),
        (lambda: ABCache(lambda x, t: x, CONFIG, time_arg=1.5), TypeError, "time_arg"),
        (lambda: ABCache(lambda x, t: x, CONFIG, time_arg=-1), ValueError, "time_arg"),
        (lambda: ABCache(lambda x, t: x, CONFIG, time_arg=1, time_fn=lambda a, k: 0), ValueError, "time_fn"),
        (lambda: ABCache(lambda x, t: x, times=[1.0, float("nan")]), ValueError, "times"),
        (lambda: ABCache(lambda x, t: x, times=[1.0, 0.5, 0.7]), ValueError, "times"),
        (lambda: CacheEngine(CONFIG, num_steps=0), ValueError, "num_steps"),
        (lambda: ABCache(lambda x, t: x, CONFIG)(torch.ones(1), float("inf")), ValueError, "time"),
        (lambda: ABCache(lambda x, t: x, CONFIG)(torch.ones(1), "1.0"), TypeError, "time"),
        (lambda: ABCache(lambda x, t: x, CONFIG)(torch.ones(1)), TypeError, "time_arg"),
        (lambda: ABCache(lambda x, t: x, CONFIG)(torch.ones(2), torch.tensor([1.0, 0.5])), ValueError, "time"),
        (lambda: ABCache(lambda x, t: "text", CONFIG)(torch.ones(1), 1.0), TypeError, "output"),
        (
            lambda: ABCache(lambda x, t: torch.ones(1, dtype=torch.long), CONFIG)(torch.ones(1), 1.0),
            TypeError,
            "output",
        ),
        (lambda: CacheEngine(CONFIG).step(None, lambda: torch.ones(1)), ValueError, "time"),
        (lambda: CacheEngine(CONFIG, [1.0, 0.5]).step(0.7, lambda: torch.ones(1)), ValueError, "time"),
        (lambda: extrapolate([], torch.ones(2)), ValueError, "history"),
    ],
)
def test_bad_input_names_the_parameter(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_compiled_model_inside_the_wrapper():
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4).double()
    compiled = torch.compile(lambda x, t: model(x) * t, backend="aot_eager")
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eager_cache = ABCache(lambda x, t: model(x) * t, CONFIG)
    compiled_cache = ABCache(compiled, CONFIG)
    with torch.no_grad():
        for t in TIMES:
            torch.testing.assert_close(compiled_cache(x, t), eager_cache(x, t), rtol=1e-12, atol=1e-12)
    assert compiled_cache.stats.predicted == 3


def test_predicted_path_compiles_without_graph_breaks():
    torch._dynamo.reset()
    history = [[torch.randn(3, 5), torch.randn(2)] for _ in range(3)]
    weights = torch.tensor([3.0, -3.0, 1.0])
    explanation = torch._dynamo.explain(extrapolate)(history, weights)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(extrapolate, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(history, weights), extrapolate(history, weights)):
        torch.testing.assert_close(got, want)
    # a different weights row reuses the graph: weights are data, not constants
    compiled(history, torch.tensor([2.0, -1.0, 0.0]))
