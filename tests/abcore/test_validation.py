"""Bad input raises ValueError naming the parameter."""

from __future__ import annotations

import math
import warnings
from typing import Any

import abcore
import numpy as np
import pytest
from abcore import theory

TIMES = np.linspace(1.0, 0.1, 10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"order": 0}, "order"),
        ({"order": -1}, "order"),
        ({"order": 2.0}, "order"),
        ({"order": True}, "order"),
        ({"interval": 0}, "interval"),
        ({"interval": -3}, "interval"),
        ({"warmup": -1}, "warmup"),
        ({"cooldown": -2}, "cooldown"),
        ({"compute_mask": (False, True)}, "compute_mask"),
        ({"compute_mask": ()}, "compute_mask"),
        ({"compute_mask": (True, 1)}, "compute_mask"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": -1e-3}, "tolerance"),
        ({"tolerance": math.nan}, "tolerance"),
        ({"tolerance": math.inf}, "tolerance"),
        ({"tolerance": "1e-3"}, "tolerance"),
        ({"order": 1, "tolerance": 1e-3}, "order"),
        ({"max_predicted": -1}, "max_predicted"),
        ({"weighting": "exp"}, "weighting"),
        ({"correct": 1}, "correct"),  # issue 17 item 9: accepted before, and then not treated as True
        ({"correct": "yes"}, "correct"),
        ({"weighting": None}, "weighting"),
    ],
)
def test_abconfig_rejects_bad_fields(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        abcore.ABConfig(**kwargs)


def test_abconfig_is_frozen_and_hashable() -> None:
    config = abcore.ABConfig(compute_mask=[True, False])  # a list is stored as a tuple
    assert config.compute_mask == (True, False)
    assert hash(config) == hash(abcore.ABConfig(compute_mask=(True, False)))
    with pytest.raises(AttributeError):
        config.order = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "times",
    [[], [1.0, math.nan, 0.5], [1.0, 0.5, 0.7], [1.0, 1.0, 0.5], [0.1, math.inf], [[1.0, 0.5]]],
    ids=["empty", "nan", "non-monotonic", "repeated", "inf", "2-d"],
)
def test_make_plan_rejects_bad_times(times: list) -> None:
    with pytest.raises(ValueError, match="times"):
        abcore.make_plan(abcore.ABConfig(), times)


def test_compute_mask_must_match_the_grid() -> None:
    with pytest.raises(ValueError, match="compute_mask"):
        abcore.make_plan(abcore.ABConfig(compute_mask=(True, False, True)), TIMES)


def test_sample_rejects_bad_times() -> None:
    step = lambda x, out, t0, t1: x  # noqa: E731
    for times in ([1.0], [1.0, 0.5, 0.7], [1.0, math.nan], ["1.0", "0.5"]):
        with pytest.raises(ValueError, match="grid"):
            abcore.sample(lambda x, t: x, np.zeros(2), times, step, abcore.ABConfig())


def test_schedules_that_do_not_fit_the_run_are_refused() -> None:
    times = np.linspace(1.0, 0.1, 30)
    with pytest.raises(ValueError, match="warmup=40"):
        abcore.make_plan(abcore.ABConfig(warmup=40), times)
    with pytest.raises(ValueError, match="cooldown=31"):
        abcore.make_plan(abcore.ABConfig(cooldown=31), times)
    with pytest.raises(ValueError, match="compute_mask"):
        abcore.make_plan(abcore.ABConfig(compute_mask=(True, False)), times)
    with pytest.raises(ValueError, match="number of steps"):
        abcore.ABConfig(cooldown=2).forced_compute(3)


@pytest.mark.parametrize(("order", "interval"), [(10, 3), (2, 100), (5, 5)])
def test_plans_that_amplify_noise_into_garbage_warn(order: int, interval: int) -> None:
    config = abcore.ABConfig(order=order, interval=interval, warmup=2, cooldown=0)
    with pytest.warns(UserWarning, match=f"order={order}, interval={interval}"):
        abcore.make_plan(config, np.linspace(1.0, 0.1, 30))


def test_order_3_interval_6_with_the_tail_does_not_warn() -> None:
    """31x: measured at 48-52 dB on every zoo model (the examples' fast preset), so no warning."""
    config = abcore.ABConfig(order=3, interval=6, warmup=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = abcore.make_plan(config, np.linspace(1.0, 0.02, 50))
    assert 20 < plan.amplification < 50


def test_numpy_bool_mask_and_string_times() -> None:
    config = abcore.ABConfig(compute_mask=tuple(np.array([True, False, True])))
    assert config.compute_mask == (True, False, True) and all(type(m) is bool for m in config.compute_mask)
    with pytest.raises(ValueError, match="times must be real numbers"):
        abcore.make_plan(abcore.ABConfig(), ["a", "b"])


@pytest.mark.parametrize("nodes", [[], [1.0, 1.0], [0.0, math.nan], [[0.0, 1.0]]], ids=["empty", "dup", "nan", "2-d"])
def test_weight_functions_reject_bad_nodes(nodes: list) -> None:
    with pytest.raises(ValueError, match="nodes"):
        abcore.theory.extrapolation_weights(nodes, 2.0)
    with pytest.raises(ValueError, match="nodes"):
        theory.multistep_weights(nodes, 0.0, 1.0)


def test_weight_functions_reject_non_finite_targets() -> None:
    with pytest.raises(ValueError, match="target"):
        abcore.theory.extrapolation_weights([0.0, 1.0], math.nan)
    with pytest.raises(ValueError, match="t_from"):
        theory.multistep_weights([0.0, 1.0], math.inf, 1.0)


@pytest.mark.parametrize(
    "function", [theory.adams_bashforth_weights, theory.binomial_weights, theory.verify_proposition_2]
)
@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_order_functions_reject_bad_k(function, k) -> None:
    with pytest.raises(ValueError, match="k"):
        function(k)


def test_backward_difference_coefficient_rejects_negative() -> None:
    with pytest.raises(ValueError, match="k"):
        theory.backward_difference_coefficient(-1)


def test_num_computed_rejects_bad_num_steps() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        abcore.ABConfig().num_computed(0)


@pytest.mark.parametrize(
    ("grid", "order", "name"),
    [
        ([0.0, 1.0, 0.5], 2, "grid"),
        ([0.0], 2, "grid"),
        ([0.0, math.nan], 1, "grid"),
        ([[0.0, 1.0]], 1, "grid"),
        ([0.0, 1.0], 0, "order"),
        ([0.0, 1.0], 2.0, "order"),
        ([0.0, 1.0], True, "order"),
    ],
)
def test_multistep_table_refuses_bad_input(grid: Any, order: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        abcore.multistep_table(grid, order)


def test_linear_steps_ddim_names_the_non_finite_input() -> None:
    alphas = np.array([0.5, np.nan, 0.9])
    with pytest.raises(ValueError, match="alphas must be finite"):
        abcore.LinearSteps.ddim(alphas, np.sqrt(1 - np.array([0.5, 0.7, 0.9]) ** 2))
    with pytest.raises(ValueError, match="sigmas must be finite"):
        abcore.LinearSteps.ddim(np.array([0.5, 0.7, 0.9]), np.array([0.8, np.inf, 0.1]))


def test_schedule_refuses_what_it_cannot_run_and_fit_shrinks_a_short_run() -> None:
    config = abcore.ABConfig(interval=5)  # warm-up 2, cool-down 4
    with pytest.raises(ValueError, match="cooldown=4 is longer than the run of 2 steps"):
        abcore.schedule(config, TIMES[:2])
    sched = abcore.schedule(config, TIMES[:2], fit=True)  # issue 17 item 3: force=True on 1-3 steps
    assert (sched.config.warmup, sched.config.cooldown) == (2, 2) and sched.forced.tolist() == [True, True]
    with pytest.raises(ValueError, match="cooldown=4 needs the number of steps"):
        abcore.schedule(config)
    with pytest.raises(ValueError, match="disagrees"):
        abcore.schedule(config, TIMES, num_steps=4)
    with pytest.warns(UserWarning, match="default call budget needs the number of steps"):
        unknown = abcore.schedule(abcore.ABConfig())  # the interval rule without the tail
    assert (unknown.config.interval, unknown.config.warmup, unknown.config.cooldown) == (5, 2, 0)
    with pytest.raises(ValueError, match="calls=3 needs the number of steps"):
        abcore.schedule(abcore.ABConfig(calls=3))
    with pytest.raises(ValueError, match="fit must be a bool"):
        abcore.schedule(config, TIMES, fit=1)
    with pytest.raises(TypeError, match=r"config must be an abcore\.ABConfig"):
        abcore.schedule({"order": 2}, TIMES)
    with pytest.raises(ValueError, match="time is required"):
        abcore.decide(
            abcore.schedule(abcore.ABConfig(cooldown=0)), abcore.begin(abcore.schedule(abcore.ABConfig(cooldown=0))), 0
        )
