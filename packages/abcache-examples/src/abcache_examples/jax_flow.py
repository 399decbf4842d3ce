"""The shipped flow model in JAX: the Flax port, sampled with `abcache_jax.sample` on the pipeline's grid."""

from __future__ import annotations

import time

import numpy as np
from abcore import ABConfig, LinearSteps

from .compare import FlowSetup, Run
from .models import weights_dir


def sample_flow_jax(setup: FlowSetup, config: ABConfig, steps: int = 50) -> Run:
    """AB-Cache sampling of `setup`'s labels and noise with the Flax port (batched CFG, jit-compiled once).

    Guidance is linear in the two branch outputs and the cache applies the same weights to both, so
    extrapolating the guided velocity equals the torch pipeline's per-branch extrapolation. The wall time
    is that of a second, compiled call.
    """
    import jax
    import jax.numpy as jnp
    from abcache_jax import flow_euler_step, sample

    from .flax_dit import flow_model_fn, load_flax_dit

    folder = weights_dir()
    module, params = load_flax_dit(folder / "flow.safetensors", folder / "flow.json")
    model_fn = flow_model_fn(module, np.asarray(setup.labels), guidance_scale=setup.guidance_scale)
    scheduler = setup.default_scheduler
    scheduler.set_timesteps(steps)
    grid = np.asarray(scheduler.sigmas, dtype=np.float64)  # n + 1 entries, ending at 0
    linear = LinearSteps.euler(grid)  # the scheduler's Euler step: corrected like the torch hook (correct=None)
    x = jnp.asarray(setup.latents.numpy())

    def run() -> tuple[np.ndarray, int]:
        traj = sample(model_fn, params, x, grid, flow_euler_step, config, steps=linear)
        return np.asarray(jax.block_until_ready(traj.x)), int(np.asarray(traj.computed).sum())

    run()  # compile
    start = time.perf_counter()
    images, nfe = run()
    seconds = time.perf_counter() - start
    return Run("AB-Cache, JAX/Flax port", setup.name, float(nfe), seconds, np.clip(images, -1, 1))
