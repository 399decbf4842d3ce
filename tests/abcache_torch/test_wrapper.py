"""ABCache behaviour: time lookup, CFG contexts, generation reset, fallbacks, stats, bad input, compile."""

from __future__ import annotations

import math
import warnings

import abcore
import pytest
import torch
from abcache_torch import ABCache, CacheStats, ContextState, ContextStats, weighted_sum

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


def run_step(state: ContextState, i: int, time, compute):
    """One step of a context: the prediction, or `compute()` recorded (what `ABCache` and `sample` do)."""
    leaves = state.predict(i, time)
    if leaves is None:
        return state.record(i, compute(), time)
    return state.skip(i, leaves, time)


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
    with pytest.warns(UserWarning, match="nothing is cached"):  # and says so
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
    state = ContextState(abcore.schedule(abcore.ABConfig(order=2, interval=2, warmup=1, cooldown=0)))
    outs = [run_step(state, i, t, lambda t=t: torch.full(next(shapes), t)) for i, t in enumerate(TIMES[:6])]
    # steps: 0 C, 1 P, 2 C, 3 P, ... with warmup 1 interval 2; forcing shapes through computed steps
    assert [o.shape for o in outs] == [(2,), (2,), (2,), (2,), (3,), (3,)]
    assert len(state.history) == 1 and state.step == 6
    torch.testing.assert_close(outs[5], torch.full((3,), 0.6))  # order capped to the one fresh entry


def test_non_finite_prediction_falls_back_and_is_counted():
    values = {1.0: 1.0, 0.9: 1e308, 0.8: 5.0, 0.7: 7.0}
    # computes 0, 1, 4: steps 2, 3 predicted
    state = ContextState(abcore.schedule(abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0)))
    calls = []

    def compute(t):
        calls.append(t)
        return torch.tensor([values.get(t, 0.0)], dtype=torch.float64)

    outs = [run_step(state, i, t, lambda t=t: compute(t)) for i, t in enumerate((1.0, 0.9, 0.8, 0.7))]
    # step 2: 2 * 1e308 - 1 overflows -> computed instead; step 3: 2 * 5 - 1e308 is finite -> predicted
    assert calls == [1.0, 0.9, 0.8]
    assert state.stats.fallbacks == 1 and state.stats.computed == 3 and state.stats.predicted == 1
    assert outs[2].item() == 5.0
    assert outs[3].item() == pytest.approx(2 * 5.0 - 1e308, rel=1e-12)


def test_non_finite_fallback_with_announced_plan_replans():
    values = [1.0, 1e308, 5.0, 6.0, 7.0, 8.0]
    times = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    state = ContextState(abcore.schedule(abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0), times))
    calls = []

    def compute(i):
        calls.append(i)
        return torch.tensor([values[i]], dtype=torch.float64)

    outs = [run_step(state, i, None, lambda i=i: compute(i)) for i in range(6)]
    assert state.stats.fallbacks == 1
    # plan computes 0, 1, 4; the fallback at 2 makes the history (2, 1): step 3 predicts from it
    assert calls == [0, 1, 2, 4]
    assert math.isfinite(outs[3].item())


def test_adaptive_records_max_error_of_accepted_predictions():
    tolerance = 3e-2
    stats = CacheStats()  # what ABCache keeps: one ContextStats per context, which its ContextState counts into
    config = abcore.ABConfig(order=3, interval=5, warmup=1, cooldown=0, tolerance=tolerance)
    state = ContextState(abcore.schedule(config), stats.context("default"))
    for i, t in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]):
        run_step(state, i, t, lambda t=t: torch.tensor([math.exp(t), t]))
    assert state.stats is stats.context("default")
    assert (state.stats.computed, state.stats.predicted) == (6, 4)
    assert 1e-3 < state.stats.max_error <= tolerance
    d = stats.as_dict()
    assert d["saved_calls"] == d["predicted"] == 4 and d["steps"] == 10 and d["max_error"] == state.stats.max_error
    assert f"max_error={state.stats.max_error:.3g}" in repr(stats)


def test_stats_repr_and_properties():
    cache = ABCache(lambda x, t: x * t, CONFIG)
    for t in TIMES:
        cache(torch.ones(1), t)
    s = cache.stats
    assert (s.computed, s.predicted, s.steps, s.saved_calls) == (4, 3, 7, 3)
    assert s.speedup_bound == pytest.approx(7 / 4)
    assert repr(s) == (
        "CacheStats(steps=7, computed=4, predicted=3, saved_calls=3, fallbacks=0, max_error=None, speedup_bound=1.75x)"
    )
    cache.reset()
    assert cache.stats.steps == 7
    cache.reset_stats()
    assert cache.stats.steps == 0
    for t in TIMES[:3]:  # the contexts count into the new stats
        cache(torch.ones(1), t)
    assert (cache.stats.computed, cache.stats.predicted) == (2, 1) and s.steps == 7


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
        (lambda: ABCache(lambda x, t: x, CONFIG, num_steps=0), ValueError, "num_steps"),
        (lambda: abcore.schedule(CONFIG, num_steps=0), ValueError, "num_steps"),
        (lambda: ABCache(lambda x, t: x, CONFIG, num_steps=3, times=[1.0, 0.5]), ValueError, "times"),
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
        (lambda: ContextState(abcore.schedule(CONFIG)).predict(0), ValueError, "time"),
        (lambda: ABCache(lambda x, t: x, CONFIG, times=[1.0, 0.5])(torch.ones(1), 0.7), ValueError, "time 0.7"),
        (lambda: ContextState(abcore.schedule(CONFIG)).record(1, torch.ones(1), 1.0), ValueError, "predict"),
        (lambda: weighted_sum([], torch.ones(2)), ValueError, "history"),
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
    explanation = torch._dynamo.explain(weighted_sum)(history, weights)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(weighted_sum, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(history, weights), weighted_sum(history, weights)):
        torch.testing.assert_close(got, want)
    # a different weights row reuses the graph: weights are data, not constants
    compiled(history, torch.tensor([2.0, -1.0, 0.0]))


# ----------------------------------------------------------------------------- issue 17 item 9: no silent failure
def test_unknown_time_keyword_warns_and_names_time_arg():
    """`noise_level=` is no known time keyword: the labels (2nd positional) are read as the time. It must not
    silently cache nothing: the context restarts at every call, and the cache says so once, naming the fix."""
    model = Recorder()

    def forward(x, labels, noise_level=None):
        return model(x, timestep=noise_level)

    cache = ABCache(forward, CONFIG)
    x, labels = torch.ones(1, 2), torch.tensor([3])  # one label: a valid "time" that repeats at every call
    with pytest.warns(UserWarning, match=r"second positional argument .* Pass time_arg= or time_fn=") as record:
        for t in TIMES:
            cache(x, labels, noise_level=t)
    assert len(record) == 1 and "context 'default'" in str(record[0].message)
    assert cache.stats.predicted == 0 and len(model.calls) == len(TIMES)
    # different labels in the batch: an error that says where the time was read
    with pytest.raises(ValueError, match=r"different times .*second positional argument; pass time_arg= or time_fn="):
        cache(torch.ones(2, 2), torch.tensor([3, 7]), noise_level=0.5)
    # the fix the warning names
    fixed = ABCache(forward, CONFIG, time_arg="noise_level")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in TIMES:
            fixed(x, labels, noise_level=t)
    assert fixed.stats.predicted == 3


@pytest.mark.parametrize("time_kw", [{"time_arg": 1}, {"time_fn": lambda a, k: a[1]}])
def test_restart_warning_names_the_time_arg_or_time_fn_given(time_kw):
    cache = ABCache(lambda x, t: x * t, CONFIG, **time_kw)
    where = "time_arg=1" if "time_arg" in time_kw else "time_fn"
    with pytest.warns(UserWarning, match=f"the time read from {where} repeats"):
        for _ in range(4):
            cache(torch.ones(2), 0.5)


@pytest.mark.parametrize("pattern", ["heun", "twice"])
def test_two_calls_per_step_in_one_context_warn(pattern):
    """A Heun-style loop calls the model twice per step (at t_i and t_{i+1}, or twice at t_i): in one context
    a time repeats every second call, each repeat restarts the generation and nothing is cached; it warns
    once, naming the remedy (a context per call)."""
    sigmas = [1.0 - i / 12 for i in range(13)]
    calls = []
    cache = ABCache(lambda x, t: calls.append(t) or x * t, CONFIG)
    x = torch.ones(2)
    with pytest.warns(UserWarning, match=r"two model calls per step \(Heun\) needs a context per call") as record:
        for i in range(12):
            cache(x, sigmas[i])
            cache(x, sigmas[i + 1] if pattern == "heun" else sigmas[i])
    assert len(record) == 1
    assert cache.stats.predicted == 0 and len(calls) == 24
    # one context per stage, as the warning says: both cache, silently
    staged = ABCache(lambda x, t: x * t, CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(12):
            with staged.context("stage1"):
                staged(x, sigmas[i])
            with staged.context("stage2"):
                staged(x, sigmas[i + 1] if pattern == "heun" else sigmas[i])
    assert staged.stats.contexts["stage1"].predicted > 0 and staged.stats.contexts["stage2"].predicted > 0


def test_driving_past_num_steps_names_num_steps():
    """ABCache(num_steps=20) driven for 30 steps was silently accepted (it wrapped to step 0 mid-generation)."""
    cache = ABCache(lambda x, t: x * t, abcore.ABConfig(), num_steps=20)
    sigmas = [1.0 - i / 30 for i in range(30)]
    for t in sigmas[:20]:
        cache(torch.ones(2), t)
    with pytest.raises(ValueError, match=r"num_steps=20, but context 'default' goes on past its last step"):
        cache(torch.ones(2), sigmas[20])
    # a new generation after 20 steps is fine (the time goes back up), and counts like the first
    for t in sigmas[:20]:
        cache(torch.ones(2), t)
    assert cache.stats.steps == 40 and cache.stats.computed == 2 * abcore.ABConfig().num_computed(20)


def test_stats_add():
    """CacheStats and ContextStats add with +: counts summed context by context, the larger max_error kept."""
    a = ContextStats(computed=3, predicted=5, fallbacks=1, max_error=0.02)
    b = ContextStats(computed=4, predicted=2, fallbacks=0, max_error=None)
    assert a + b == ContextStats(7, 7, 1, 0.02) == b + a
    assert ContextStats() + ContextStats() == ContextStats()
    assert (b + ContextStats(max_error=0.05)).max_error == 0.05
    first, second = CacheStats(), CacheStats()
    for stats, name, counters in ((first, "cond", a), (first, "uncond", b), (second, "cond", b)):
        for field in ("computed", "predicted", "fallbacks"):
            setattr(stats.context(name), field, getattr(counters, field))
        stats.context(name).max_error = counters.max_error
    total = first + second
    assert total.contexts == {"cond": a + b, "uncond": b}
    assert (total.computed, total.predicted, total.fallbacks, total.max_error) == (11, 9, 1, 0.02)
    assert total.steps == first.steps + second.steps and total.speedup_bound == pytest.approx(20 / 11)
    assert first.contexts == {"cond": a, "uncond": b} and second.contexts == {"cond": b}  # operands unchanged
    assert (first + CacheStats()).as_dict() == first.as_dict()
    # stats of two caches (e.g. two ranks, two pipelines) add up to one report
    runs = []
    for _ in range(2):
        cache = ABCache(lambda x, t: x * t, CONFIG)
        for t in TIMES:
            cache(torch.ones(1), t)
        runs.append(cache.stats)
    assert (runs[0] + runs[1]).as_dict()["contexts"]["default"] == {
        "computed": 8,
        "predicted": 6,
        "fallbacks": 0,
        "max_error": None,
    }


def test_adaptive_without_announced_times_caches():
    """Adaptive mode with the time read at each call (no times, or only num_steps): the first call crashed
    ("time is required"), as the joint decision got no time for a context without history."""
    config = abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0, tolerance=0.2)  # |p2 - p1| / |p2| < 0.2
    for kw in ({}, {"num_steps": len(TIMES)}):
        model = Recorder()
        cache = ABCache(model, config, **kw)
        outs = [cache(torch.ones(2), t) for t in TIMES]
        assert cache.stats.predicted > 0 and len(model.calls) == cache.stats.computed
        for out, t in zip(outs, TIMES):
            torch.testing.assert_close(out, torch.ones(2) * t * 2.0)  # linear in t: predictions are exact


def test_new_inputs_after_a_failed_first_call():
    """A first call that raised leaves its context at step 0; a call with other inputs then takes it over
    (it kept the old inputs' key, and the next call restarted the context mid-generation)."""
    fail = [True]

    def model(x, t):
        if fail:
            fail.pop()
            raise RuntimeError("out of memory")
        return x * t

    cache = ABCache(model, CONFIG, times=TIMES)
    with pytest.raises(RuntimeError):
        cache(torch.ones(2, 2), TIMES[0])
    outs = [cache(torch.ones(4, 2), t) for t in TIMES]  # another batch size
    assert cache.stats.computed == 4 and cache.stats.predicted == 3
    torch.testing.assert_close(outs[2], torch.ones(4, 2) * TIMES[2])
