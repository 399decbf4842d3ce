"""ContextState / ABCache numerics: call counts, parity with abcore's reference, memory, pytrees, dtypes."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import OrderedDict, namedtuple

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import ABCache, ContextState, flow_euler_step, sample, weighted_sum
from abcache_torch._tree import flatten


def flux_sigmas(n: int, shift: float = 3.0) -> np.ndarray:
    s = np.linspace(1.0, 0.0, n + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


def grid(kind: str, n: int) -> np.ndarray:
    """n + 1 sampler times; the model is called at the first n."""
    if kind == "equal":
        return np.linspace(1.0, 0.0, n + 1)
    if kind == "shifted":
        return flux_sigmas(n)
    if kind == "increasing":
        return np.linspace(-3.0, 2.0, n + 1)
    steps = np.random.default_rng(7).uniform(0.5, 1.5, n)
    return 1.0 - np.concatenate([[0.0], np.cumsum(steps)]) / steps.sum()


class Counting:
    """A model recording the times it was called at."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.times: list[float] = []
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        tf = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        self.times.append(tf)
        return (torch.sin(3.0 * x) * tf + math.cos(2.0 * tf)).to(self.dtype)


def run_loop(cache, model_times, x0):
    x = x0
    for i in range(len(model_times) - 1):
        v = cache(x, torch.full((x.shape[0],), model_times[i], dtype=torch.float64))
        x = x + (model_times[i + 1] - model_times[i]) * v
    return x


CONFIGS = [
    abcore.ABConfig(order=1, interval=2, warmup=1, cooldown=0),
    abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0),
    abcore.ABConfig(order=2, interval=4, warmup=0, cooldown=0),
    abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=2),
    abcore.ABConfig(order=4, interval=2, warmup=5, cooldown=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"k{c.order}i{c.interval}w{c.warmup}c{c.cooldown}")
@pytest.mark.parametrize("kind", ["equal", "shifted", "random", "increasing"])
@pytest.mark.parametrize("announce", ["times", "num_steps", "none"])
def test_model_runs_exactly_at_plan_compute_steps(config, kind, announce):
    n = 17
    t = grid(kind, n)
    plan = abcore.make_plan(config, t[:-1])
    model = Counting()
    kwargs = {"times": t[:-1]} if announce == "times" else {"num_steps": n} if announce == "num_steps" else {}
    if announce == "none" and config.cooldown:
        with pytest.raises(ValueError, match="cooldown"):  # cool-down needs the length: refused, not ignored
            ABCache(model, config)
        return
    cache = ABCache(model, config, **kwargs)
    run_loop(cache, t, torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(2, 2))
    expected = t[:-1][plan.compute].tolist()
    assert model.times == expected
    assert cache.stats.computed == plan.num_computed
    assert cache.stats.predicted == n - plan.num_computed
    assert plan.num_predicted > 0


def test_compute_mask_is_followed():
    mask = (True, True, False, True, False, False, True, False)
    t = grid("equal", len(mask))
    model = Counting()
    cache = ABCache(model, abcore.ABConfig(order=2, compute_mask=mask, cooldown=0), times=t[:-1])
    run_loop(cache, t, torch.ones(1, 3, dtype=torch.float64))
    assert model.times == t[:-1][np.array(mask)].tolist()


def reference_model_np(x: np.ndarray, t: float) -> np.ndarray:
    return np.sin(3.0 * x) * t + np.cos(2.0 * t)


def euler_np(x, out, t0, t1):
    return x + (t1 - t0) * out


@pytest.mark.parametrize(
    "config",
    [
        abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0),
        abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=1),
        abcore.ABConfig(order=3, interval=3, warmup=1, tolerance=2e-2),
    ],
    ids=["k2", "k3-cooldown", "adaptive"],
)
@pytest.mark.parametrize("path", ["wrapper-stepwise", "wrapper-times", "sampler"])
def test_parity_with_abcore_reference_float64(config, path):
    n = 24
    t = grid("shifted", n)
    x0 = np.linspace(-1.5, 1.5, 6).reshape(2, 3)
    ref = abcore.sample(reference_model_np, x0, t, euler_np, config)
    model = Counting()
    xt = torch.tensor(x0)
    if path == "sampler":
        traj = sample(model, xt, t, flow_euler_step, config)
        out, computed = traj.x, traj.computed
        np.testing.assert_array_equal(computed, ref.computed)
        assert model.times == t[:-1][ref.computed].tolist()
        return
    grid_kw = {"times": t[:-1]} if path == "wrapper-times" else {"num_steps": n}  # num_steps: cool-down
    cache = ABCache(model, config, check_finite=True, **grid_kw)
    out = run_loop(cache, t, xt)
    np.testing.assert_allclose(out.numpy(), ref.x, rtol=1e-10, atol=1e-12)
    assert model.times == t[:-1][ref.computed].tolist()
    assert cache.stats.computed == int(ref.computed.sum())
    assert 0 < cache.stats.predicted < n
    if config.adaptive:
        assert cache.stats.max_error is not None and cache.stats.max_error > 0


def test_interval_one_is_identical_to_unwrapped():
    t = grid("random", 12)
    model = Counting(torch.float32)
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float32).reshape(2, 4)
    plain = run_loop(model, t, x0)
    for order in (1, 2, 3):
        cached = run_loop(
            ABCache(Counting(torch.float32), abcore.ABConfig(order=order, interval=1), num_steps=12), t, x0
        )
        assert torch.equal(cached, plain)


def run_step(state: ContextState, i: int, time, compute):
    """One step of a context: the prediction, or `compute()` recorded (what `ABCache` and `sample` do)."""
    leaves = state.predict(i, time)
    if leaves is None:
        return state.record(i, compute(), time)
    return state.skip(i, leaves, time)


def run_steps(config, times, outputs, announce=False):
    """A fresh context stepped over `times` (given at each step, or announced in its schedule)."""
    schedule = abcore.schedule(config, times if announce else None)
    state = ContextState(schedule)
    outs = [
        run_step(state, i, None if announce else float(t), lambda f=f: f() if callable(f) else f)
        for i, (t, f) in enumerate(zip(times, outputs))
    ]
    return state, outs


def test_history_holds_at_most_order_outputs():
    order = 3
    t = grid("equal", 15)
    alive: list[weakref.ref] = []

    def model(x, t):
        out = x * float(t) + 1.0
        alive.append(weakref.ref(out))
        return out

    schedule = abcore.schedule(abcore.ABConfig(order=order, interval=2, warmup=3, cooldown=0))
    states = {ctx: ContextState(schedule) for ctx in ("cond", "uncond")}
    x = torch.ones(4, 4)
    results = []
    for i in range(15):
        for state in states.values():
            results.append(run_step(state, i, float(t[i]), lambda: model(x, t[i])))  # noqa: B023
            assert len(state.history) <= order
        results.clear()  # the caller keeps nothing (no cycles: refcounting frees the rest)
        held = sum(r() is not None for r in alive)
        assert held <= 2 * order  # two contexts, each at most `order` stored outputs
    assert len(states["cond"].history) == order
    assert sum(r() is not None for r in alive) == 2 * order


Pair = namedtuple("Pair", ["a", "b"])


@dataclasses.dataclass
class Output:
    sample: torch.Tensor
    extra: tuple
    note: str = "x"


class FakeModelOutput(OrderedDict):
    """Like diffusers' BaseOutput: an OrderedDict subclass dataclass."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value


@dataclasses.dataclass
class Transformer2DModelOutput(FakeModelOutput):
    sample: torch.Tensor = None
    aux: torch.Tensor | None = None


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: a,
        lambda a, b: (a, b),
        lambda a, b: [a, {"b": b, "none": None}],
        lambda a, b: {"x": a, "y": (b, 3)},
        lambda a, b: Pair(a, b),
        lambda a, b: Output(a, (b,), "hello"),
        lambda a, b: Transformer2DModelOutput(sample=a),
        lambda a, b: Transformer2DModelOutput(sample=a, aux=b),
        lambda a, b: {"x": a, "labels": torch.tensor([3, 7]), "mask": torch.tensor([True, False]), "y": b},
    ],
    ids=["tensor", "tuple", "list-dict", "dict", "namedtuple", "dataclass", "model-output", "model-output-2", "int"],
)
def test_pytree_outputs_extrapolate_every_leaf(make):
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    t = [1.0, 0.8, 0.5, 0.3]
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)

    def leaves_at(tv):
        return x * tv**2 + 1.0, torch.full((3,), 2.0 * tv, dtype=torch.float64)

    state, outs = run_steps(config, t, [lambda tv=tv: make(*leaves_at(tv)) for tv in t])
    assert state.stats.computed == 3  # steps 0, 1, 3
    pred = outs[2]
    assert type(pred) is type(make(*leaves_at(0.5)))
    # linear extrapolation through t = 1.0, 0.8 at 0.5: weights (w0 for 0.8, w1 for 1.0)
    w = abcore.theory.extrapolation_weights([0.8, 1.0], 0.5)
    expected = make(*(w[0] * p + w[1] * q for p, q in zip(leaves_at(0.8), leaves_at(1.0))))
    got_leaves, got_def = flatten(pred)
    exp_leaves, exp_def = flatten(expected)
    assert got_def.spec == exp_def.spec
    assert len(got_leaves) == len(exp_leaves) >= 1
    for g, e in zip(got_leaves, exp_leaves):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    if isinstance(pred, Transformer2DModelOutput):
        assert pred["sample"] is pred.sample  # rebuilt through __init__: the dict view is in sync
    if isinstance(pred, dict) and "labels" in pred:  # integer and bool tensors pass through unchanged
        assert pred["labels"].dtype == torch.int64 and pred["labels"].tolist() == [3, 7]
        assert pred["mask"].dtype == torch.bool and pred["mask"].tolist() == [True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_outputs_accumulate_in_float32(dtype):
    base = torch.linspace(0.1, 3.0, 64)
    times = [1.0, 0.9, 0.75, 0.6]
    hist = [(base * (1 + tv) + tv**2).to(dtype) for tv in reversed(times)]
    state, outs = run_steps(abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=0), times, hist[::-1])
    assert state.stats.predicted == 1
    pred = outs[-1]
    assert pred.dtype == dtype
    w = abcore.theory.extrapolation_weights(times[2::-1], times[3])
    exact32 = sum(float(wj) * h.float() for wj, h in zip(w, hist[1:]))
    assert torch.equal(pred, exact32.to(dtype))


def test_float64_accumulates_in_float64():
    a = torch.tensor([1.0 + 1e-12], dtype=torch.float64)
    times = (1.0, 0.5, 0.25)
    state, outs = run_steps(abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0), times, [a * tv for tv in times])
    assert state.stats.predicted == 1
    assert outs[-1].dtype == torch.float64
    torch.testing.assert_close(outs[-1], a * 0.25, rtol=1e-15, atol=0)


@pytest.mark.parametrize("correct", [False, True])
def test_device_preserved_and_no_host_read_in_sample(correct):
    """On the meta device any read of tensor data raises: `sample` on a fixed plan never reads one."""
    n = 12
    t = grid("shifted", n)
    calls = []

    def model(x, sigma):
        calls.append(1)
        return x * sigma + 1.0

    config = abcore.ABConfig(order=3, interval=3, warmup=3, correct=correct)
    x = torch.empty(2, 5, device="meta")
    steps = abcore.LinearSteps.euler(t)
    traj = sample(model, x, t, flow_euler_step, config, steps=steps, check_finite=False)
    assert all(v.device.type == "meta" and v.shape == x.shape and v.dtype == x.dtype for v in traj.outputs)
    assert len(calls) == int(traj.computed.sum()) < n
    # ABCache reads every call's time (documented): on the meta device it must touch the data
    sig = torch.tensor(t, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        ABCache(model, config, times=t[:-1], steps=steps)(x, sig[0] * torch.ones(2, device="meta"))


def test_weighted_sum_matches_weights_and_rejects_empty_history():
    h = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 5.0])]]
    out = weighted_sum(h, torch.tensor([2.0, -1.0]))
    assert torch.equal(out[0], torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match="history"):
        weighted_sum([], [1.0])


@pytest.mark.parametrize("announce", [False, True])
def test_context_state_split_is_abcache_exactly(announce):
    """predict / record / skip driven by the caller (the model run outside) gives the outputs and counts of ABCache."""
    times = grid("shifted", 20)[:-1]
    config = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0)
    schedule = abcore.schedule(config, times if announce else None)
    whole = ABCache(lambda x, t: x * math.sin(3 * float(t)), config, times=times if announce else None)
    split = ContextState(schedule)
    x = torch.ones(2, 3, dtype=torch.float64)
    calls = 0
    for i, t in enumerate(times):
        a = whole(x, float(t))
        time = None if announce else float(t)
        leaves = split.predict(i, time)
        if leaves is None:
            calls += 1
            b = split.record(i, x * math.sin(3 * float(t)), time)
        else:
            b = split.skip(i, leaves, time)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert split.step == i + 1
    assert calls == whole.stats.computed == split.stats.computed == config.num_computed(len(times))
    assert split.stats.predicted == whole.stats.predicted > 0


def test_record_or_skip_off_the_next_step_is_an_error():
    """The rule state describes the context's next step: record / skip anywhere else is refused, not misapplied."""
    state = ContextState(abcore.schedule(abcore.ABConfig(order=1, interval=2, warmup=1, cooldown=0)))
    with pytest.raises(ValueError, match=r"record\(1\) but this context's next step is 0; call predict\(1\)"):
        state.record(1, torch.zeros(2), 0.9)
    assert state.predict(0, 1.0) is None
    state.record(0, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="next step is 1"):
        state.record(0, torch.zeros(2), 1.0)
    leaves = state.predict(1, 0.9)
    assert leaves is not None
    with pytest.raises(ValueError, match=r"skip\(2\)"):
        state.skip(2, leaves, 0.8)
    state.skip(1, leaves, 0.9)
    assert (state.step, state.stats.computed, state.stats.predicted) == (2, 1, 1)
    # a jump is announced by predict, which restarts the context there (no stale history or pending step)
    assert state.predict(7, 0.3) is None and state.step == 7 and len(state.history) == 0
    state.record(7, torch.ones(2), 0.3)
    assert state.step == 8 and len(state.history) == 1


def test_int64_beside_the_float_output_passes_through():
    """Issue 17 item 9: a non-float leaf raised a TypeError; it is carried through (README: non-float leaves)."""
    labels = torch.tensor([[3], [7]])
    seen = []

    def model(x, t):
        seen.append(t)
        return x * t, labels + round(10 * t)  # the int leaf of the last computed call is the one carried

    cache = ABCache(model, abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0))
    x = torch.ones(2, 3, dtype=torch.float64)
    outs = [cache(x, t) for t in (1.0, 0.9, 0.8, 0.7)]
    assert seen == [1.0, 0.9, 0.7] and cache.stats.predicted == 1
    out, ints = outs[2]
    torch.testing.assert_close(out, x * 0.8, rtol=1e-14, atol=1e-14)  # linear in t: exact
    assert ints.dtype == torch.int64 and torch.equal(ints, labels + 9)
    assert outs[3][1].dtype == torch.int64 and torch.equal(outs[3][1], labels + 7)
