"""CacheEngine / ABCache numerics: call counts, parity with abcore's reference, memory, pytrees, dtypes."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import OrderedDict, namedtuple

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import ABCache, CacheEngine, extrapolate, flow_euler_step, sample


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
    state = cache.engine
    out = run_loop(cache, t, xt)
    np.testing.assert_allclose(out.numpy(), ref.x, rtol=1e-10, atol=1e-12)
    assert model.times == t[:-1][ref.computed].tolist()
    assert state.stats.computed == int(ref.computed.sum())
    assert 0 < state.stats.predicted < n
    if config.adaptive:
        assert state.stats.max_error is not None and state.stats.max_error > 0


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


def test_history_holds_at_most_order_outputs():
    order = 3
    t = grid("equal", 15)
    alive: list[weakref.ref] = []

    def model(x, t):
        out = x * float(t) + 1.0
        alive.append(weakref.ref(out))
        return out

    state = CacheEngine(abcore.ABConfig(order=order, interval=2, warmup=3, cooldown=0))
    x = torch.ones(4, 4)
    results = []
    for i in range(15):
        for ctx in ("cond", "uncond"):
            results.append(state.step(float(t[i]), lambda: model(x, t[i]), context=ctx))  # noqa: B023
            assert state.history_length(ctx) <= order
        results.clear()  # the caller keeps nothing (no cycles: refcounting frees the rest)
        held = sum(r() is not None for r in alive)
        assert held <= 2 * order  # two contexts, each at most `order` stored outputs
    assert state.history_length("cond") == order
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
    ],
    ids=["tensor", "tuple", "list-dict", "dict", "namedtuple", "dataclass", "model-output", "model-output-2"],
)
def test_pytree_outputs_extrapolate_every_leaf(make):
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    t = [1.0, 0.8, 0.5, 0.3]
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)

    def leaves_at(tv):
        return x * tv**2 + 1.0, torch.full((3,), 2.0 * tv, dtype=torch.float64)

    state = CacheEngine(config)
    outs = [state.step(tv, lambda tv=tv: make(*leaves_at(tv))) for tv in t]
    assert state.stats.computed == 3  # steps 0, 1, 3
    pred = outs[2]
    assert type(pred) is type(make(*leaves_at(0.5)))
    # linear extrapolation through t = 1.0, 0.8 at 0.5: weights (w0 for 0.8, w1 for 1.0)
    w = abcore.extrapolation_weights([0.8, 1.0], 0.5)
    expected = make(*(w[0] * p + w[1] * q for p, q in zip(leaves_at(0.8), leaves_at(1.0))))
    from abcache_torch import flatten

    got_leaves, got_def = flatten(pred)
    exp_leaves, exp_def = flatten(expected)
    assert got_def.spec == exp_def.spec
    assert len(got_leaves) == len(exp_leaves) >= 1
    for g, e in zip(got_leaves, exp_leaves):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    if isinstance(pred, Transformer2DModelOutput):
        assert pred["sample"] is pred.sample  # rebuilt through __init__: the dict view is in sync


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_outputs_accumulate_in_float32(dtype):
    state = CacheEngine(abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=0))
    base = torch.linspace(0.1, 3.0, 64)
    times = [1.0, 0.9, 0.75, 0.6]
    hist = []
    outs = []
    for tv in times:
        value = (base * (1 + tv) + tv**2).to(dtype)
        hist.insert(0, value)
        outs.append(state.step(tv, lambda value=value: value))
    pred = outs[-1]
    assert pred.dtype == dtype
    w = abcore.extrapolation_weights(times[2::-1], times[3])
    exact32 = sum(float(wj) * h.float() for wj, h in zip(w, hist[1:]))
    assert torch.equal(pred, exact32.to(dtype))


def test_float64_accumulates_in_float64():
    state = CacheEngine(abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0))
    a = torch.tensor([1.0 + 1e-12], dtype=torch.float64)
    outs = [state.step(tv, lambda tv=tv: a * tv) for tv in (1.0, 0.5, 0.25)]
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


def test_extrapolate_matches_weights_and_rejects_empty_history():
    h = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 5.0])]]
    out = extrapolate(h, torch.tensor([2.0, -1.0]))
    assert torch.equal(out[0], torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match="history"):
        extrapolate([], [1.0])


@pytest.mark.parametrize("announce", [False, True])
def test_predict_and_store_split_a_step_exactly(announce):
    """predict()/store() (the model run by the caller) gives the outputs and counts of step()."""
    times = grid("shifted", 20)[:-1]
    config = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0)
    whole = CacheEngine(config, times if announce else None)
    split = CacheEngine(config, times if announce else None)
    calls = 0
    for t in times:
        out = torch.full((2, 3), math.sin(3 * t), dtype=torch.float64)
        a = whole.step(t, lambda out=out: out)
        predicted, b = split.predict(t)
        if not predicted:
            calls += 1
            assert b is None
            b = split.store(out)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls == whole.stats.computed == split.stats.computed == config.num_computed(len(times))
    assert split.stats.predicted == whole.stats.predicted


def test_store_without_a_pending_compute_step_is_an_error():
    state = CacheEngine(abcore.ABConfig(cooldown=0))
    with pytest.raises(ValueError, match="pending"):
        state.store(torch.zeros(2))
    assert state.predict(1.0) == (False, None)
    state.store(torch.zeros(2))
    with pytest.raises(ValueError, match="pending"):
        state.store(torch.zeros(2))
