"""Parity with `abcore.sample` over `config_sweep()`, joint adaptive decisions, the correction, and the
inputs that used to be silently wrong (each now a clear error or a correct result)."""

from __future__ import annotations

import math
import warnings

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import ABCache, ContextState, flow_euler_step, predict_jointly, sample
from abcore.testing import config_sweep, make_grid, parity_model

N = 12
GRID = make_grid("shifted", N)
X0 = np.linspace(-1.5, 1.5, 6).reshape(2, 3)
SWEEP = config_sweep()


def config_id(c: abcore.ABConfig) -> str:
    return (
        f"k{c.order}i{c.interval}w{c.warmup}c{c.cooldown}-{c.correct}-tol{c.tolerance}-{c.abscissa}-{c.predictor}"
        f"-{c.weighting}-mask{c.compute_mask is not None}"
    )


def reference(config: abcore.ABConfig) -> abcore.Trajectory:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the amplification warning of high orders
        return abcore.sample(lambda x, t: parity_model(x, t, np), X0, GRID, None, config,
                             steps=abcore.LinearSteps.euler(GRID))  # fmt: skip


def assert_matches(ref: abcore.Trajectory, computed, x: torch.Tensor, outputs) -> None:
    np.testing.assert_array_equal(np.asarray(computed), ref.computed)
    np.testing.assert_allclose(x.numpy(), ref.x, rtol=0, atol=1e-10)
    assert len(outputs) == len(ref.outputs)
    for got, want in zip(outputs, ref.outputs):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", SWEEP, ids=config_id)
def test_sample_matches_reference(config):
    traj = sample(lambda x, t: parity_model(x, t, torch), torch.tensor(X0), GRID, flow_euler_step, config,
                  steps=abcore.LinearSteps.euler(GRID))  # fmt: skip
    assert_matches(reference(config), traj.computed, traj.x, traj.outputs)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("announce", ["times", "num_steps"])
@pytest.mark.parametrize("config", SWEEP, ids=config_id)
def test_abcache_manual_loop_matches_reference(config, announce):
    calls: list[float] = []

    def model(x, t):
        calls.append(float(t))
        return parity_model(x, t, torch)

    grid_kw = {"times": GRID[:-1]} if announce == "times" else {"num_steps": N}
    cache = ABCache(model, config, steps=abcore.LinearSteps.euler(GRID), **grid_kw)
    x, outputs = torch.tensor(X0), []
    for i in range(N):
        out = cache(x, torch.tensor(GRID[i], dtype=torch.float64))
        outputs.append(out)
        x = x + (GRID[i + 1] - GRID[i]) * out
    ref = reference(config)
    assert calls == GRID[:-1][ref.computed].tolist()
    assert cache.stats.computed == int(ref.computed.sum()) and cache.stats.predicted == N - cache.stats.computed
    assert_matches(ref, [c in calls for c in GRID[:-1].tolist()], x, outputs)


# ----------------------------------------------------------------------------- two contexts (CFG)
def smooth(x, t, xp):
    return parity_model(x, t, xp)


def rough(x, t, xp):
    return 0.2 * x + xp.sin(6.0 * t) * (1.0 + 0.1 * x)


def joint_reference(config: abcore.ABConfig, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Two contexts on abcore's rule in numpy, one decision per step: predict only when both pass."""
    models = {"cond": smooth, "uncond": rough}
    sched = abcore.schedule(config, GRID[:-1])
    states = {k: abcore.begin(sched) for k in models}
    history: dict[str, list[np.ndarray]] = {k: [] for k in models}
    x, computed = X0.copy(), np.zeros(N, dtype=bool)
    for i in range(N):
        decisions = {k: abcore.decide(sched, states[k], i) for k in models}
        out = None
        if not any(bool(d.compute) for d in decisions.values()):
            preds = {k: sum(w * h for w, h in zip(d.weights, history[k])) for k, d in decisions.items()}
            deltas = {k: sum(e * h for e, h in zip(d.error_weights, history[k])) for k, d in decisions.items()}
            delta_sq = np.array([np.sum(deltas[k] ** 2) for k in models])
            pred_sq = np.array([np.sum(preds[k] ** 2) for k in models])
            if abcore.joint(delta_sq, pred_sq, config.tolerance):
                out = preds
        if out is None:
            out = {k: m(x, GRID[i], np) for k, m in models.items()}
            for k in models:
                history[k] = [out[k], *history[k]][: config.order]
            computed[i] = True
        states = {k: abcore.complete(sched, states[k], i, computed[i]) for k in models}
        v = out["uncond"] + scale * (out["cond"] - out["uncond"])
        x = x + (GRID[i + 1] - GRID[i]) * v
    return computed, x


ADAPTIVE = abcore.ABConfig(order=2, interval=5, warmup=2, cooldown=1, tolerance=0.3, correct=False)


@pytest.mark.parametrize("announce", ["times", "num_steps"])
def test_two_contexts_decide_jointly(announce):
    calls: dict[str, list[int]] = {"cond": [], "uncond": []}
    step = [0]

    def model(x, t, branch):
        calls[branch].append(step[0])
        return (smooth if branch == "cond" else rough)(x, t, torch)

    grid_kw = {"times": GRID[:-1]} if announce == "times" else {"num_steps": N}
    cache = ABCache(model, ADAPTIVE, **grid_kw)
    x = torch.tensor(X0)
    for i in range(N):
        step[0] = i
        t = torch.tensor(GRID[i], dtype=torch.float64)
        with cache.context("cond"):
            cond = cache(x, t, "cond")
        with cache.context("uncond"):
            uncond = cache(x, t, "uncond")
        x = x + (GRID[i + 1] - GRID[i]) * (uncond + 2.0 * (cond - uncond))
    computed, ref_x = joint_reference(ADAPTIVE)
    assert calls["cond"] == calls["uncond"] == np.flatnonzero(computed).tolist()
    np.testing.assert_allclose(x.numpy(), ref_x, rtol=0, atol=1e-10)
    assert 0 < cache.stats.contexts["cond"].predicted == cache.stats.contexts["uncond"].predicted < N
    # each branch alone decides otherwise: the decisions are joint (the test can fail)
    for branch in (smooth, rough):
        alone = abcore.sample(
            lambda x, t, branch=branch: branch(x, t, np), X0, GRID, lambda x, o, t, u: x + (u - t) * o, ADAPTIVE
        )
        assert (~alone.computed).sum() > (~computed).sum()


def test_joint_decision_when_the_second_context_has_its_own_time_without_grid():
    """No grid: a context whose time differs from the leader's decides again rather than reuse a decision
    taken at the leader's time (which would extrapolate its outputs to the wrong time)."""
    config = abcore.ABConfig(order=2, interval=5, warmup=2, cooldown=0, tolerance=0.3)

    def model(x, t, branch):
        return (rough if branch == "a" else smooth)(x, torch.tensor(t, dtype=torch.float64), torch)

    cache, solo = ABCache(model, config), ABCache(model, config)
    x = torch.tensor(X0)
    for i in range(N):
        t = float(GRID[i])
        with cache.context("a"):
            cache(x, t, "a")
        with cache.context("b"):
            b = cache(x, t + 1e-3, "b")
        torch.testing.assert_close(b, solo(x, t + 1e-3, "b"), rtol=0, atol=0)
    assert cache.stats.contexts["b"].predicted == solo.stats.predicted > cache.stats.contexts["a"].predicted


def test_joint_decision_is_taken_by_the_first_context_at_a_step_for_all():
    """With the ContextStates themselves: `predict_jointly` over both decides once, the second reuses it."""
    sched = abcore.schedule(ADAPTIVE, GRID[:-1])
    states = {"cond": ContextState(sched), "uncond": ContextState(sched)}
    x, computed = torch.tensor(X0), []
    for i in range(N):
        ready = [s for s in states.values() if len(s.history)]
        if ready:
            predict_jointly(ready, i, {})
        outs, before = {}, states["cond"].stats.computed
        for branch, state in states.items():
            leaves = state.predict(i)
            if leaves is None:
                outs[branch] = state.record(i, (smooth if branch == "cond" else rough)(x, torch.tensor(GRID[i]), torch))
            else:
                outs[branch] = state.skip(i, leaves)
        computed.append(states["cond"].stats.computed > before)
        x = x + (GRID[i + 1] - GRID[i]) * (outs["uncond"] + 2.0 * (outs["cond"] - outs["uncond"]))
    ref_computed, ref_x = joint_reference(ADAPTIVE)
    np.testing.assert_array_equal(computed, ref_computed)
    cond, uncond = states["cond"].stats, states["uncond"].stats
    assert (cond.computed, cond.predicted) == (uncond.computed, uncond.predicted)
    assert 0 < cond.computed == int(ref_computed.sum()) < N
    assert 0 < cond.max_error <= ADAPTIVE.tolerance and 0 < uncond.max_error <= ADAPTIVE.tolerance
    np.testing.assert_allclose(x.numpy(), ref_x, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- the correction
def polynomial(degree: int):
    coefficients = [0.7, -1.3, 0.9, 0.4, -0.6][: degree + 1]

    def model(x, t):
        value = sum(c * t**p for p, c in enumerate(coefficients))
        return torch.full_like(x, 1.0) * value + 0.0 * x

    return model


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("path", ["sample", "abcache"])
def test_correction_is_exact_for_polynomials_of_degree_order(order, path):
    """f of degree <= k in t: f~ (degree k through f_n and H) is exact, so the last computed step lands on the
    uncached result; without the correction the prediction (degree k - 1) is not (the test can fail)."""
    config = abcore.ABConfig(order=order, interval=3, warmup=order, cooldown=1)
    model = polynomial(order)
    steps = abcore.LinearSteps.euler(GRID)
    x = torch.tensor(X0)
    plain = sample(model, x, GRID, flow_euler_step, abcore.ABConfig(interval=1, cooldown=0)).x
    if path == "sample":
        corrected = sample(model, x, GRID, flow_euler_step, config, steps=steps)
        uncorrected = sample(model, x, GRID, flow_euler_step, config)
        assert corrected.computed[-1] and (~corrected.computed).sum() > 2
        xc, xu = corrected.x, uncorrected.x
    else:

        def run(cache):
            y = x
            for i in range(N):
                out = cache(y, float(GRID[i]))
                assert isinstance(out, dict) and set(out) == {"sample", "twice"}
                torch.testing.assert_close(out["twice"], 2.0 * out["sample"], rtol=1e-13, atol=1e-13)
                y = y + (GRID[i + 1] - GRID[i]) * out["sample"]
            return y

        def dict_model(y, t):
            v = model(y, t)
            return {"sample": v, "twice": 2.0 * v}

        xc = run(ABCache(dict_model, config, times=GRID[:-1], steps=steps))
        xu = run(ABCache(dict_model, config, times=GRID[:-1]))
    torch.testing.assert_close(xc, plain, rtol=0, atol=1e-12)
    assert float((xu - plain).abs().max()) > 1e-6


def test_history_keeps_the_raw_output_and_record_returns_the_corrected_one():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0, correct=True)
    steps = abcore.LinearSteps.euler(GRID)
    state = ContextState(abcore.schedule(config, GRID[:-1], steps))
    model = polynomial(3)
    x = torch.zeros(2)
    for i in range(3):  # computes 0, 1; predicts 2
        leaves = state.predict(i)
        if leaves is None:
            assert torch.equal(state.record(i, model(x, GRID[i])), model(x, GRID[i]))  # nothing to correct yet
        else:
            state.skip(i, leaves)
    assert (state.stats.computed, state.stats.predicted) == (2, 1)
    assert state.predict(3) is None  # step 3 computes
    raw = model(x, GRID[3])
    h0, h1 = (entry[0] for entry in state.history.entries)  # H before step 3: f_1, f_0
    corrected = state.record(3, raw)
    assert not torch.equal(corrected, raw)
    assert state.history.entries[0][0] is raw
    c = abcore.make_plan(config, GRID[:-1], steps).corrections[3]  # f_3 + c_0 f_3 + c_1 H_0 + c_2 H_1
    assert np.any(c != 0.0)
    expected = (1.0 + c[0]) * raw + c[1] * h0 + c[2] * h1
    torch.testing.assert_close(corrected, expected, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- no silent wrong answer
@pytest.mark.parametrize(
    ("config", "match"),
    [
        (abcore.ABConfig(cooldown=2), "cooldown=2 needs the number of steps: give the times, the steps or num_steps"),
        (abcore.ABConfig(compute_mask=(True, False, True), cooldown=0), "compute_mask needs the number of steps"),
    ],
)
def test_cooldown_or_mask_without_a_grid_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        ABCache(lambda x, t: x, config)
    with pytest.raises(ValueError, match=match):  # no ContextState without a schedule that fits the config
        abcore.schedule(config)
    cache = ABCache(lambda x, t: x, abcore.ABConfig(interval=5, cooldown=0))  # a cache may be told the grid later ...
    with pytest.raises(ValueError, match=match):  # ... but not switched to the config without it
        cache.set_grid(config=config)
    assert cache.config == abcore.ABConfig(interval=5, cooldown=0)  # the refused set_grid changed nothing
    cache.set_grid(num_steps=3, config=config)  # with the number of steps: fine
    assert cache.config == config and cache.schedule.num_steps == 3
    cache(torch.ones(1), 1.0)
    ABCache(lambda x, t: x, config, num_steps=3)


def test_correct_true_without_steps_is_refused():
    with pytest.raises(ValueError, match="steps"):
        ABCache(lambda x, t: x, abcore.ABConfig(correct=True), num_steps=12)


def test_max_predicted_without_tolerance_is_refused():
    with pytest.raises(ValueError, match="max_predicted"):
        abcore.ABConfig(max_predicted=3)


def test_numpy_bool_compute_mask_is_followed():
    mask = np.array([True, True, False, True, False, False, True, False])
    config = abcore.ABConfig(order=2, compute_mask=tuple(mask), cooldown=0)
    times = np.linspace(1.0, 0.3, mask.size)
    calls = []
    cache = ABCache(lambda x, t: calls.append(float(t)) or x * t, config, times=times)
    for t in times:
        cache(torch.ones(2), torch.tensor(t))
    assert calls == pytest.approx(times[mask].tolist())


def run_generation(cache, x, steps=N):
    for i in range(steps):
        x = x + (GRID[i + 1] - GRID[i]) * cache(x, torch.tensor(GRID[i], dtype=torch.float64))
    return x


@pytest.mark.parametrize("announce", ["times", "num_steps"])
def test_interrupted_generation_restarts_on_the_first_time(announce):
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1)
    kw = {"times": GRID[:-1]} if announce == "times" else {"num_steps": N}
    fresh = run_generation(ABCache(lambda x, t: parity_model(x, t, torch), config, **kw), torch.tensor(X0))
    cache = ABCache(lambda x, t: parity_model(x, t, torch), config, **kw)
    run_generation(cache, torch.tensor(X0) * 0.3, steps=5)  # interrupted after 5 of 12 steps
    again = run_generation(cache, torch.tensor(X0))
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_per_sample_different_times_are_refused_with_a_grid():
    cache = ABCache(lambda x, t: x, abcore.ABConfig(cooldown=1), times=GRID[:-1])
    with pytest.raises(ValueError, match="different times"):
        cache(torch.ones(2, 3), torch.tensor([GRID[0], GRID[1]]))


def test_timesteps_keyword_is_the_time_not_the_labels():
    seen = []

    def model(x, labels, timesteps=None):
        seen.append(float(timesteps))
        return x * timesteps + labels[:, None]

    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    cache = ABCache(model, config)
    labels = torch.tensor([3.0, 7.0], dtype=torch.float64)
    x = torch.ones(2, 2, dtype=torch.float64)
    outs = [cache(x, labels, timesteps=torch.tensor(t)) for t in (1.0, 0.9, 0.8, 0.7)]
    assert seen == pytest.approx([1.0, 0.9, 0.7])
    torch.testing.assert_close(outs[2], x * 0.8 + labels[:, None])  # linear in t: exact


def test_predicted_step_returns_the_structure_the_call_asks_for():
    def model(x, t, return_dict=True):
        return {"sample": x * t} if return_dict else (x * t,)

    config = abcore.ABConfig(order=1, interval=2, warmup=1, cooldown=0)
    cache = ABCache(model, config)
    x = torch.ones(2)
    for i, t in enumerate((1.0, 0.9, 0.8, 0.7, 0.6, 0.5)):
        return_dict = i >= 3  # the caller switches mid-generation
        out = cache(x, t, return_dict=return_dict)
        assert isinstance(out, dict if return_dict else tuple)  # the switch starts a fresh history
    assert cache.stats.predicted >= 2


def test_fixed_call_counts_with_two_contexts():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=2)
    plan = abcore.make_plan(config, GRID[:-1])
    calls = {"cond": 0, "uncond": 0}

    def model(x, t, branch):
        calls[branch] += 1
        return parity_model(x, t, torch)

    cache = ABCache(model, config, times=GRID[:-1])
    x = torch.tensor(X0)
    for _ in range(2):  # two generations: the counter wraps
        for i in range(N):
            for branch in ("cond", "uncond"):
                with cache.context(branch):
                    cache(x, float(GRID[i]), branch)
    assert calls == {"cond": 2 * plan.num_computed, "uncond": 2 * plan.num_computed}
    assert cache.stats.predicted == 4 * plan.num_predicted and math.isclose(
        cache.stats.speedup_bound, N / plan.num_computed
    )
