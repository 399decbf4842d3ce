"""HostStepper: abcore's step rule driven from a Python loop, one step index at a time.

- Parity, in float64, over abcore.testing.config_sweep() with the parity model on Euler (with the
  correction's LinearSteps): the same computed steps as abcore.sample and abcache_jax.sample, outputs
  and final x to 1e-10; and without steps (no correction) against abcore.sample.
- A Wan-style loop: two experts switching at a boundary, a UniPC-like multistep scheduler with x0
  thresholding (not linear in the output, so no correction) whose own state runs across the boundary.
  Oracle: abcore.sample on grid[:b + 1] with the first expert, then on grid[b:] with the second, with
  one scheduler object carried through both (the boundary restarts the history and the schedule).
- No device-to-host read in fixed mode: the loop traces under jax.jit (any read of a device value
  would raise), and adaptive mode, which reads one boolean per candidate step, does raise there.
- Errors naming the parameter; the README's example.
"""

import re
from pathlib import Path

import abcache_jax as aj
import abcore
import abcore.testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest

GRID = abcore.testing.make_grid("shifted", 12)
X0 = np.linspace(-1.5, 1.5, 12).reshape(3, 4)
CONFIGS = abcore.testing.config_sweep()


def _jax_model(x, t):
    return abcore.testing.parity_model(x, t, jnp)


_jitted_model = jax.jit(_jax_model)


def _host_loop(stepper, model, step_fn, x, grid):
    """The loop a host pipeline runs: predict, else compute and record, then its own step."""
    outputs = []
    for i in range(stepper.num_steps):
        out = stepper.predict(i)
        if out is None:
            out = stepper.record(i, model(x, grid[i]))
        outputs.append(out)
        x = step_fn(x, out, grid[i], grid[i + 1])
    return x, outputs


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("config", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_config_sweep_matches_both_samplers(config):
    steps = abcore.LinearSteps.euler(GRID)
    ref = abcore.sample(abcore.testing.parity_model, X0, GRID, None, config, steps=steps)
    scan_model = lambda params, x, t: _jax_model(x, t)  # noqa: E731
    scan = aj.sample(
        scan_model, None, jnp.asarray(X0), GRID, aj.flow_euler_step, config, steps=steps, keep_outputs=True
    )
    stepper = aj.HostStepper(config, GRID, steps=steps)
    x, outputs = _host_loop(stepper, _jitted_model, jax.jit(aj.flow_euler_step), jnp.asarray(X0), GRID)
    assert x.dtype == jnp.float64 and stepper.next_step == GRID.size - 1
    np.testing.assert_array_equal(stepper.computed, ref.computed)
    np.testing.assert_array_equal(stepper.computed, np.asarray(scan.computed))
    np.testing.assert_allclose(np.stack(outputs), np.stack(ref.outputs), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.stack(outputs), np.asarray(scan.outputs), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), ref.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), np.asarray(scan.x), rtol=0, atol=1e-10)


NO_STEPS = [c for c in CONFIGS if c.correct is not True][::4]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("config", NO_STEPS, ids=[f"c{i}" for i in range(len(NO_STEPS))])
def test_without_steps_matches_reference(config):
    """No LinearSteps: no correction, any step function (here Euler given as a plain function)."""
    ref = abcore.sample(abcore.testing.parity_model, X0, GRID, aj.flow_euler_step, config)
    stepper = aj.HostStepper(config, GRID)
    x, outputs = _host_loop(stepper, _jitted_model, aj.flow_euler_step, jnp.asarray(X0), GRID)
    np.testing.assert_array_equal(stepper.computed, ref.computed)
    np.testing.assert_allclose(np.stack(outputs), np.stack(ref.outputs), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), ref.x, rtol=0, atol=1e-10)


# A Wan 2.2-style run: a high-noise expert for steps [0, B), a low-noise one for [B, N), on sigma.
N, B = 16, 7
WAN_GRID = abcore.testing.make_grid("shifted", N)


def _expert(which, xp):
    def model(x, t):  # velocity; two different smooth functions of (x, sigma)
        base = abcore.testing.parity_model(x, t, xp)
        return base if which == "high" else 0.8 * base + 0.1 * xp.sin(3.0 * x) * t

    return model


class UniPCLike:
    """A multistep flow scheduler shaped like UniPC: x0 = clip(x - sigma v) (thresholding, not linear in v),
    a second-order extrapolation of x0 through the previous step's x0 (its own state, across experts),
    then x' = (sigma'/sigma) x + (1 - sigma'/sigma) D."""

    def __init__(self, xp, clip=1.3):
        self.xp, self.clip, self.previous = xp, clip, None

    def step(self, x, v, sigma, sigma_next):
        x0 = self.xp.clip(x - sigma * v, -self.clip, self.clip)
        d = x0
        if self.previous is not None:
            x0_prev, sigma_prev = self.previous
            d = x0 + 0.5 * (x0 - x0_prev) * (sigma_next - sigma) / (sigma - sigma_prev)
        self.previous = (x0, sigma)
        ratio = sigma_next / sigma
        return ratio * x + (1.0 - ratio) * d


def _wan_reference(config, x):
    """abcore.sample on each expert's part of the grid as a run of its own, one scheduler through both."""
    scheduler = UniPCLike(np)
    high = abcore.sample(_expert("high", np), x, WAN_GRID[: B + 1], scheduler.step, config)
    low = abcore.sample(_expert("low", np), high.x, WAN_GRID[B:], scheduler.step, config)
    return low.x, np.concatenate([high.computed, low.computed]), [*high.outputs, *low.outputs]


def _wan_loop(config, x, boundaries=(B,)):
    """The pipeline's own loop: the expert is chosen per step, the stepper restarts at the boundary."""
    stepper = aj.HostStepper(config, WAN_GRID, boundaries=boundaries)
    experts = {name: jax.jit(_expert(name, jnp)) for name in ("high", "low")}
    scheduler = UniPCLike(jnp)
    outputs = []
    for i in range(N):
        out = stepper.predict(i)
        if out is None:
            out = stepper.record(i, experts["high" if i < B else "low"](x, WAN_GRID[i]))
        outputs.append(out)
        x = scheduler.step(x, out, WAN_GRID[i], WAN_GRID[i + 1])
    return x, stepper.computed, outputs


WAN_CONFIGS = {
    # warm-up shorter than the order: without the restart, the first predictions after the boundary
    # would extrapolate through the first expert's outputs
    "fixed": abcore.ABConfig(order=2, interval=3, warmup=1, cooldown=1),
    "fixed-order3": abcore.ABConfig(order=3, interval=4, warmup=2, cooldown=1),
    "adaptive": abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=1, tolerance=0.2),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_wan_two_experts_restart_at_the_boundary(name):
    config = WAN_CONFIGS[name]
    x0 = np.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)
    ref_x, ref_computed, ref_outputs = _wan_reference(config, x0)
    x, computed, outputs = _wan_loop(config, jnp.asarray(x0))
    np.testing.assert_array_equal(computed, ref_computed)
    np.testing.assert_allclose(np.stack(outputs), np.stack(ref_outputs), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), ref_x, rtol=0, atol=1e-10)
    # the second part is scheduled from the boundary: its warm-up computes, and steps are predicted
    assert computed[B : B + config.warmup].all() and not computed[B:].all() and not computed[:B].all()
    if not config.adaptive:  # fixed mode: each part's plan, step b + j being step j of the second
        expected = [abcore.make_plan(config, WAN_GRID[a:b]).compute for a, b in ((0, B), (B, N))]
        np.testing.assert_array_equal(computed, np.concatenate(expected))
    # without the boundary the history spans both experts, and the run differs
    x_joined, computed_joined, _ = _wan_loop(config, jnp.asarray(x0), boundaries=())
    differs = not np.array_equal(computed_joined, computed) or np.abs(np.asarray(x_joined) - ref_x).max() > 1e-6
    assert differs


@pytest.mark.usefixtures("x64")
def test_boundary_slices_mask_and_steps():
    """A compute_mask and LinearSteps over the whole run are sliced at the boundary like the grid."""
    grid = abcore.testing.make_grid("shifted", 8)
    mask = (True, False, True, False, True, False, True, True)  # step 5: predicted from step 4 alone
    config = abcore.ABConfig(order=2, compute_mask=mask, cooldown=0, correct=True)
    steps = abcore.LinearSteps.euler(grid)
    stepper = aj.HostStepper(config, grid, steps=steps, boundaries=4)
    x, outputs = _host_loop(stepper, _jitted_model, jax.jit(aj.flow_euler_step), jnp.asarray(X0), grid)
    np.testing.assert_array_equal(stepper.computed, mask)
    ref_x, ref_outputs = X0, []
    for a, b in ((0, 4), (4, 8)):  # each part as a run of its own: sample on grid[a : b + 1]
        part = abcore.ABConfig(order=2, compute_mask=mask[a:b], cooldown=0, correct=True)
        steps_part = abcore.LinearSteps.euler(grid[a : b + 1])
        ref = abcore.sample(abcore.testing.parity_model, ref_x, grid[a : b + 1], None, part, steps=steps_part)
        ref_x, ref_outputs = ref.x, [*ref_outputs, *ref.outputs]
    np.testing.assert_allclose(np.stack(outputs), np.stack(ref_outputs), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(x), ref_x, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="boundaries"):  # the part from step 3 would start with a predicted step
        aj.HostStepper(config, grid, steps=steps, boundaries=3)


def _traced_loop(config, check_finite=False):
    """The whole host loop under jax.jit: every output is a tracer, so any device-to-host read raises."""
    stepper = aj.HostStepper(config, GRID, check_finite=check_finite)

    def run(x):
        return _host_loop(stepper, _jax_model, aj.flow_euler_step, x, GRID)[0]

    return jax.jit(run)(jnp.asarray(X0, jnp.float32)), stepper.computed


def test_fixed_mode_decides_without_reading_the_device():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=2)
    x, computed = _traced_loop(config)
    eager = aj.HostStepper(config, GRID)
    x_eager, _ = _host_loop(eager, _jitted_model, aj.flow_euler_step, jnp.asarray(X0, jnp.float32), GRID)
    np.testing.assert_array_equal(computed, abcore.make_plan(config, GRID[:-1]).compute)
    np.testing.assert_array_equal(eager.computed, computed)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_eager), rtol=1e-6, atol=1e-6)
    # the same check with the adaptive test, which reads one boolean per candidate step, fails
    with pytest.raises(jax.errors.ConcretizationTypeError):
        _traced_loop(abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=1, tolerance=0.1))
    with pytest.raises(jax.errors.ConcretizationTypeError):  # and so does check_finite (one read per prediction)
        _traced_loop(config, check_finite=True)


def test_fixed_mode_under_the_transfer_guard():
    """jax's guard against implicit device-to-host transfers (it checks on GPU/TPU; CPU arrays live on the host)."""
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=2)
    stepper = aj.HostStepper(config, GRID)
    model, step_fn = _jitted_model, jax.jit(aj.flow_euler_step)
    with jax.transfer_guard_device_to_host("disallow"):
        _host_loop(stepper, model, step_fn, jnp.asarray(X0, jnp.float32), GRID)
    assert stepper.computed.sum() == abcore.make_plan(config, GRID[:-1]).num_computed


def test_pytree_and_bfloat16_outputs_keep_their_dtypes():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1)
    stepper = aj.HostStepper(config, GRID)
    x = jnp.asarray(X0, jnp.bfloat16)
    for i in range(GRID.size - 1):
        out = stepper.predict(i)
        if out is None:
            f = _jitted_model(x.astype(jnp.float32), GRID[i])
            out = stepper.record(i, (f.astype(jnp.bfloat16), f))
        assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
        x = (x + (GRID[i + 1] - GRID[i]) * out[0]).astype(jnp.bfloat16)
    assert 0 < stepper.computed.sum() < GRID.size - 1


def test_errors_name_the_parameter():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1)
    with pytest.raises(TypeError, match="config"):
        aj.HostStepper({"order": 2}, GRID)
    with pytest.raises(ValueError, match="grid"):
        aj.HostStepper(config, [1.0])
    with pytest.raises(ValueError, match="grid"):
        aj.HostStepper(config, [1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="grid"):
        aj.HostStepper(config, np.ones((2, 3)))
    with pytest.raises(ValueError, match="steps"):
        aj.HostStepper(config, GRID, steps=abcore.LinearSteps.euler(GRID[:-1]))
    with pytest.raises(ValueError, match="correct=True"):
        aj.HostStepper(abcore.ABConfig(correct=True), GRID)
    with pytest.raises(ValueError, match="cooldown"):
        aj.HostStepper(abcore.ABConfig(cooldown=20), GRID)
    for bad in (0, 12, (5, 3), (4, 4), 2.5, True):
        with pytest.raises(ValueError, match="boundaries"):
            aj.HostStepper(config, GRID, boundaries=bad)
    with pytest.raises(ValueError, match="boundaries"):  # a last part of 1 step cannot hold warm-up 2
        aj.HostStepper(config, GRID, boundaries=11)
    with pytest.raises(ValueError, match="check_finite"):
        aj.HostStepper(config, GRID, check_finite=1)

    stepper = aj.HostStepper(config, GRID)
    x = jnp.asarray(X0, jnp.float32)
    for bad in (-1, 12, 1.0, True, "0"):
        with pytest.raises(ValueError, match=r"^i must be a step index"):
            stepper.predict(bad)
    with pytest.raises(ValueError, match=r"^i must be the next step, 0"):
        stepper.predict(1)
    with pytest.raises(ValueError, match=r"^i: record"):
        stepper.record(0, x)
    assert stepper.predict(0) is None
    with pytest.raises(ValueError, match=r"^i: step 0 must compute: call record\(0"):
        stepper.predict(1)
    with pytest.raises(ValueError, match=r"^output must be a pytree of floating-point"):
        stepper.record(0, jnp.ones(3, jnp.int32))
    stepper.record(0, _jitted_model(x, GRID[0]))
    assert stepper.predict(1) is None
    with pytest.raises(ValueError, match=r"^output must have the structure, shapes and dtypes"):
        stepper.record(1, jnp.ones((4, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"^i: record"):
        stepper.record(2, x)
    stepper.record(1, _jitted_model(x, GRID[1]))
    with pytest.raises(ValueError, match=r"^i must be the next step, 2"):
        stepper.predict(1)
    assert stepper.predict(2) is not None  # interval 3: step 2 is predicted from steps 0 and 1
    np.testing.assert_array_equal(stepper.computed[:3], [True, True, False])


def test_readme_host_loop_example_runs():
    """The README's Wan-style example runs as written and makes the model calls it promises."""
    readme = Path(__file__).resolve().parents[2] / "packages" / "abcache-jax" / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    (code,) = [block for block in blocks if "HostStepper(" in block]
    namespace: dict = {}
    exec(compile(code, str(readme), "exec"), namespace)
    stepper, boundary, sigmas = namespace["stepper"], namespace["boundary"], namespace["sigmas"]
    parts = [abcore.make_plan(namespace["config"], sigmas[a:b]).compute for a, b in ((0, boundary), (boundary, 40))]
    assert (boundary, stepper.computed.sum()) == (17, 17)
    np.testing.assert_array_equal(stepper.computed, np.concatenate(parts))
