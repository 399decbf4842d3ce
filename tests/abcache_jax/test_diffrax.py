"""`abcache_jax.diffrax.AdamsBashforth` inside diffrax.diffeqsolve: order, cost, weights, jumps, vmap, grad.

The measured order is the slope of log(error at t = T) against log(number of steps) over four step
counts, the error taken against Tsit5 at rtol = atol = 1e-12, on equal steps (ConstantStepSize) and on
a smooth non-uniform grid (StepTo, steps varying by a factor 3): it must be k within 0.3 (0.4 for k = 5).
"""

import re
from pathlib import Path

import abcore
import abcore.theory
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abcache_jax.diffrax import AdamsBashforth

T = 2.0
STEPS = (32, 64, 128, 256)
A = np.array([[-0.2, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.0, -0.3, -0.5]])  # rotation plus decay
README = Path(__file__).resolve().parents[2] / "packages" / "abcache-jax" / "README.md"


def linear(t, y, args):
    return jnp.asarray(A) @ y


def lotka_volterra(t, y, args):  # forced, so a wrong time in f(t_{n-j}, y_{n-j}) shows too
    prey, pred = y[0], y[1]
    return jnp.stack([prey * (1.0 - 0.5 * pred) + 0.2 * jnp.sin(3.0 * t), pred * (0.5 * prey - 1.0)])


ODES = {"linear": (linear, (1.0, 0.0, 0.5)), "lotka_volterra": (lotka_volterra, (1.0, 0.5))}


def warped(n, t1=T):
    """n steps on [0, t1], t = t1 (s + sin(2 pi s) / (4 pi)): step sizes between 0.5 and 1.5 times t1 / n."""
    s = np.linspace(0.0, 1.0, n + 1)
    ts = t1 * (s + np.sin(2 * np.pi * s) / (4 * np.pi))
    ts[-1] = t1
    return jnp.asarray(ts)


def solve(field, y0, solver, t1=T, dt0=None, ts=None, **kwargs):
    controller = diffrax.ConstantStepSize() if ts is None else diffrax.StepTo(ts=ts)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field), solver, 0.0, t1, dt0, y0, stepsize_controller=controller, **kwargs
    )


@pytest.fixture(scope="module")
def reference():
    with jax.enable_x64(True):
        pid = diffrax.PIDController(rtol=1e-12, atol=1e-12)
        return {
            name: np.asarray(
                diffrax.diffeqsolve(
                    diffrax.ODETerm(f), diffrax.Tsit5(), 0.0, T, 0.01, jnp.asarray(y0), stepsize_controller=pid
                ).ys[-1]
            )
            for name, (f, y0) in ODES.items()
        }


def fitted_order(ode, k, grid, reference):
    field, y0 = ODES[ode]
    y0 = jnp.asarray(y0)
    solver = AdamsBashforth(k)
    if grid == "constant":
        run = jax.jit(lambda dt: solve(field, y0, solver, dt0=dt, max_steps=512).ys[-1])
        finals = [run(T / n) for n in STEPS]
    else:
        run = jax.jit(lambda ts: solve(field, y0, solver, ts=ts).ys[-1])
        finals = [run(warped(n)) for n in STEPS]
    errors = [float(np.max(np.abs(np.asarray(y) - reference[ode]))) for y in finals]
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("grid", ["constant", "stepto"])
@pytest.mark.parametrize("ode", list(ODES))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_global_order_is_k(x64, reference, ode, grid, k):
    # k = 5 on the forced Lotka-Volterra grid approaches 5 from above (local slopes 5.3, 5.5, 5.3, 5.1
    # from 32 to 512 steps, fitted 5.39 here), hence 0.4 there.
    order, errors = fitted_order(ode, k, grid, reference)
    assert abs(order - k) < (0.4 if k == 5 else 0.3), (order, errors)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_polynomial_field_is_integrated_exactly_on_a_nonuniform_grid(x64, k):
    # y' = p(t), deg p = min(k - 1, 3): exact for AB-k and for the RK4 start-up (Simpson's rule).
    coeffs = np.array([0.7, -1.3, 0.9, 0.4])[: min(k, 4)]
    sol = jax.jit(
        lambda ts: solve(lambda t, y, args: jnp.polyval(jnp.asarray(coeffs), t), 0.0, AdamsBashforth(k), ts=ts)
    )(warped(9))
    exact = np.polyval(np.polyint(coeffs), T)
    np.testing.assert_allclose(float(sol.ys[-1]), exact, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_one_evaluation_per_step_after_the_rk4_start_up(x64, k):
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return linear(t, y, args)

    n = 12
    sol = jax.jit(lambda y: solve(field, y, AdamsBashforth(k), dt0=T / n))(jnp.asarray(ODES["linear"][1]))
    jax.effects_barrier()
    assert int(sol.stats["num_steps"]) == n
    assert len(calls) == n + 3 * (k - 1)


def test_ab1_is_diffrax_euler(x64):
    y0, ts = jnp.asarray(ODES["lotka_volterra"][1]), warped(20)
    ab = solve(lotka_volterra, y0, AdamsBashforth(1), ts=ts).ys
    euler = solve(lotka_volterra, y0, diffrax.Euler(), ts=ts).ys
    np.testing.assert_array_equal(np.asarray(ab), np.asarray(euler))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_equal_steps_use_h_times_the_adams_bashforth_weights(x64, k):
    # History f_{n-j} = e_j (entry 0 is the new evaluation, the constant field e_0), so y_{n+1} - y_n = w.
    h, t0 = 0.1, 0.7
    eye = jnp.eye(k)
    state = (t0 - h * jnp.arange(1, k + 1), jnp.roll(eye, -1, axis=0), jnp.asarray(k - 1, jnp.int32))
    term = diffrax.ODETerm(lambda t, y, args: eye[0])
    y1, y_error, _, (ts, _, _), _ = AdamsBashforth(k).step(term, t0, t0 + h, jnp.zeros(k), None, state, False)
    expected = h * np.array([float(b) for b in abcore.theory.adams_bashforth_weights(k)])
    np.testing.assert_allclose(np.asarray(y1), expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(ts), t0 - h * np.arange(k), rtol=1e-15)
    assert y_error is None


def test_fresh_history_has_distinct_stand_in_times(x64):
    # The AB branch also runs (and is discarded) during the start-up under vmap: keep it finite.
    y0 = jnp.asarray(ODES["linear"][1])
    ts, fs, count = AdamsBashforth(4).init(diffrax.ODETerm(linear), 0.5, 0.6, y0, None)
    assert int(count) == 0 and fs.shape == (4, 3) and len(set(np.asarray(ts).tolist())) == 4
    assert np.all(np.isfinite(np.asarray(abcore.theory.multistep_weights(ts, 0.5, 0.6, xp=jnp))))


def test_made_jump_resets_the_history(x64):
    k, dt, y0 = 3, 0.1, jnp.asarray(ODES["lotka_volterra"][1])
    solver = AdamsBashforth(k)
    term = diffrax.ODETerm(lotka_volterra)
    first = diffrax.diffeqsolve(term, solver, 0.0, 1.0, dt, y0, saveat=diffrax.SaveAt(t1=True, solver_state=True))
    np.testing.assert_allclose(np.asarray(first.solver_state[0]), [0.9, 0.8, 0.7], rtol=1e-13)  # last starts

    def resume(made_jump):  # an array: diffrax 0.7.2 applies a Python bool made_jump=True to every step
        state, made_jump = first.solver_state, jnp.asarray(made_jump)
        return diffrax.diffeqsolve(term, solver, 1.0, 2.0, dt, first.ys[-1], solver_state=state, made_jump=made_jump)

    fresh = diffrax.diffeqsolve(term, solver, 1.0, 2.0, dt, first.ys[-1]).ys
    through = diffrax.diffeqsolve(term, solver, 0.0, 2.0, dt, y0).ys
    np.testing.assert_allclose(np.asarray(resume(True).ys), np.asarray(fresh), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(resume(False).ys), np.asarray(through), rtol=1e-12)
    assert np.max(np.abs(np.asarray(fresh) - np.asarray(through))) > 1e-8  # the start-up differs


def test_pytree_state_matches_the_array_state(x64):
    def split(t, y, args):
        a = jnp.asarray(A)
        return {"xy": a[:2, :2] @ y["xy"] + a[:2, 2] * y["z"], "z": a[2, :2] @ y["xy"] + a[2, 2] * y["z"]}

    y0 = jnp.asarray(ODES["linear"][1])
    ts = warped(15)
    tree = solve(split, {"xy": y0[:2], "z": y0[2]}, AdamsBashforth(4), ts=ts).ys
    flat = solve(linear, y0, AdamsBashforth(4), ts=ts).ys
    np.testing.assert_allclose(np.asarray(tree["xy"]), np.asarray(flat[:, :2]), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(tree["z"]), np.asarray(flat[:, 2]), rtol=1e-14)


def test_integrating_backwards_keeps_the_order(x64):
    y1 = jnp.asarray(ODES["linear"][1])
    exact = jax.scipy.linalg.expm(-T * jnp.asarray(A)) @ y1
    run = jax.jit(lambda dt: diffrax.diffeqsolve(diffrax.ODETerm(linear), AdamsBashforth(3), T, 0.0, dt, y1).ys[-1])
    errors = [float(jnp.max(jnp.abs(run(-T / n) - exact))) for n in STEPS[:3]]
    assert abs(-np.polyfit(np.log(STEPS[:3]), np.log(errors), 1)[0] - 3) < 0.3, errors


def test_vmap_and_grad_are_finite_and_match(x64):
    # Batched step sizes make the while loop (and the start-up cond) run both branches under vmap.
    def final(y0, dt):
        return solve(lotka_volterra, y0, AdamsBashforth(3), dt0=dt, max_steps=64).ys[-1]

    y0s = jnp.asarray([[1.0, 0.5], [0.5, 1.0], [1.5, 0.2]])
    dts = jnp.asarray([0.1, 0.05, 0.04])
    batched = jax.jit(jax.vmap(final))(y0s, dts)
    single = jax.jit(final)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(y0s[i], dts[i])), rtol=1e-13)

    def loss(y0, dt):
        return jnp.sum(final(y0, dt) ** 2)

    grads = np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(y0s, dts))
    assert np.all(np.isfinite(grads))
    loss_jit, eps = jax.jit(loss), 1e-6
    for i in range(3):
        fd = [(loss_jit(y0s[i] + eps * e, dts[i]) - loss_jit(y0s[i] - eps * e, dts[i])) / (2 * eps) for e in jnp.eye(2)]
        np.testing.assert_allclose(grads[i], np.asarray(fd), rtol=1e-6)


@pytest.mark.parametrize("k", [3, 4])
def test_backsolve_adjoint_gradient_matches_the_discrete_gradient(x64, k):
    # BacksolveAdjoint integrates the adjoint ODE backwards with this solver, on an AdjointTerm (not an
    # ODETerm): the solver must accept it. Its gradient is the continuous adjoint's, so it differs from the
    # discrete one (RecursiveCheckpointAdjoint) by O(h^k) only: ~1e-9 here at 400 steps.
    def loss(y0, a, adjoint):
        term = diffrax.ODETerm(lambda t, y, a: a @ y + 0.1 * jnp.sin(3.0 * t))
        sol = diffrax.diffeqsolve(term, AdamsBashforth(k), 0.0, T, T / 400, y0, args=a, adjoint=adjoint)
        return jnp.sum(sol.ys[-1] ** 2)

    def gradient(adjoint):
        return jax.jit(jax.grad(lambda y0, a: loss(y0, a, adjoint), argnums=(0, 1)))

    y0, a = jnp.asarray(ODES["linear"][1]), jnp.asarray(A)
    back = gradient(diffrax.BacksolveAdjoint())(y0, a)
    discrete = gradient(diffrax.RecursiveCheckpointAdjoint())(y0, a)
    for got, want in zip(back, discrete, strict=True):
        assert np.all(np.asarray(want) != 0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dense_output_has_the_solvers_order(x64, k):
    # sol.evaluate between step endpoints (and inside the RK4 start-up steps): the error against the
    # exact solution falls like N^-k; at the step endpoints it is the solution itself.
    exact = jax.jit(lambda t: jax.scipy.linalg.expm(jnp.asarray(A) * t) @ jnp.asarray(ODES["linear"][1]))
    points = T * np.array([0.003, 0.007, 0.013, 0.37, 0.61, 0.89])  # the first three inside start-up steps
    errors = []
    for n in STEPS:
        sol = solve(
            linear, jnp.asarray(ODES["linear"][1]), AdamsBashforth(k), dt0=T / n, saveat=diffrax.SaveAt(dense=True)
        )
        errors.append(max(float(jnp.max(jnp.abs(sol.evaluate(t) - exact(t)))) for t in points))
    slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert abs(slope - k) < 0.3, (slope, errors)
    ts = warped(12)
    sol = solve(
        linear, jnp.asarray(ODES["linear"][1]), AdamsBashforth(k), ts=ts, saveat=diffrax.SaveAt(ts=ts, dense=True)
    )
    ends = np.stack([np.asarray(sol.evaluate(t)) for t in ts[1:-1]])
    np.testing.assert_allclose(ends, np.asarray(sol.ys[1:-1]), rtol=1e-12, atol=1e-14)


def test_adaptive_controller_is_refused(x64):
    with pytest.raises(RuntimeError, match="error estimates"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(linear),
            AdamsBashforth(2),
            0.0,
            T,
            0.1,
            jnp.asarray(ODES["linear"][1]),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        )


@pytest.mark.parametrize("order", [0, 6, 2.0, True, None])
def test_bad_order_names_order(order):
    with pytest.raises(ValueError, match="order"):
        AdamsBashforth(order)


def test_readme_section_runs():
    text = README.read_text().split("## Exact multistep weights and a diffrax solver")[1].split("\n## ")[0]
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["W"].shape == (10, 3)
    assert np.all(np.isfinite(np.asarray(namespace["sol"].ys)))
