"""AB-Cache for keras-hub's Stable Diffusion 3 (extra ``keras-hub``: ``pip install "abcache-jax[keras-hub]"``).

keras-hub's `StableDiffusion3TextToImage.generate_step` runs ``backbone.denoise_step`` in an
``ops.fori_loop``: one MMDiT call on the CFG-doubled batch, the guidance combination
v = v_neg + s (v_pos - v_neg), and the flow-matching Euler step x' = x + (sigma' - sigma) v of its
`FlowMatchEulerDiscreteScheduler`, all inside one ``jax.jit`` that `TextToImage.make_generate_function`
builds. The loop carries only the latents, so wrapping the denoiser cannot cache it: `enable_ab_cache`
gives the task a generate function that owns the loop instead. It encodes the prompts and decodes the
latents with the backbone's own steps, and runs the denoising loop with `abcache_jax.sample`:

    v_i = cfg(diffuser([x_i, x_i], 1000 sigma_i))   at computed steps (one MMDiT call)
    v_i = sum_j w_j V_j                             at predicted steps (Eq. 3.5, error O(h^k))
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i     (`flow_euler_step`, `LinearSteps.euler(sigmas)`)

V holds the last k computed guided velocities. Both CFG halves come from one batched call, so they
share one history and every decision. With ``LinearSteps.euler`` the predicted steps are corrected
once the next velocity is computed (``config.correct``, as in `abcache_jax.sample`).

The sigma table is read from the scheduler at each call, and the compiled programs are keyed by it
and by the config. keras-hub's own generate function keeps the table of its first call: a second
`generate` with more steps indexes past it (an all-NaN image). Only the generate function is replaced;
preprocessing, the seed, the latents and the output conversion remain keras-hub's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import abcore
import jax
import keras
import keras_hub
import numpy as np

from abcache_jax._sample import sample
from abcache_jax._steps import flow_euler_step

__all__ = ["ABCacheGenerate", "computed_steps", "disable_ab_cache", "enable_ab_cache"]

# What the backbone must provide: the loop of `StableDiffusion3TextToImage.generate_step` is built from these.
_BACKBONE_PARTS = (
    "encode_text_step",
    "configure_scheduler",
    "scheduler",
    "timestep_broadcast_to",
    "diffuser",
    "cfg",
    "decode_step",
)
_MAX_PROGRAMS = 16


class ABCacheGenerate:
    """The generate function `enable_ab_cache` installs: the task's ``make_generate_function``.

    Called with no argument it returns ``generate(latents, token_ids, num_steps, guidance_scale)``,
    the function `TextToImage.generate` calls. Each call sets the scheduler's sigmas for
    ``num_steps``, then runs a ``jax.jit`` program compiled once per (sigma table, config), with the
    task's variables passed as traced state (new weights do not recompile).

    Attributes:
        config: the `abcore.ABConfig` in use.
        computed: (n,) bool, which steps of the last call ran the denoiser (None before the first).
    """

    def __init__(self, task: Any, config: abcore.ABConfig, programs: dict | None = None) -> None:
        self.task = task
        self.config = config
        self.computed: np.ndarray | None = None
        # (sigma table, config) -> program; shared with the generate function this one replaces
        self._programs: dict[tuple[bytes, abcore.ABConfig], Callable[..., Any]] = {} if programs is None else programs

    def __call__(self) -> Callable[..., Any]:
        return self.generate

    def generate(self, latents: Any, token_ids: Any, num_steps: Any, guidance_scale: Any = None) -> Any:
        """The images for `latents`: keras-hub's encode, the cached denoising loop, keras-hub's decode."""
        task = self.task
        task.backbone.configure_scheduler(int(num_steps))
        sigmas = np.asarray(keras.ops.convert_to_numpy(task.backbone.scheduler.sigmas), np.float64)
        program = self._program(sigmas)
        state = (
            [v.value for v in task.trainable_variables],  # `.value` keeps a distribution's sharding
            [v.value for v in task.non_trainable_variables],
        )
        images, computed = program(state, latents, token_ids, guidance_scale)
        self.computed = np.asarray(computed)
        return images

    def _program(self, sigmas: np.ndarray) -> Callable[..., Any]:
        key = (sigmas.tobytes(), self.config)
        if key not in self._programs:
            if len(self._programs) >= _MAX_PROGRAMS:
                self._programs.pop(next(iter(self._programs)))
            task, config = self.task, self.config

            def run(state: Any, latents: Any, token_ids: Any, guidance_scale: Any) -> tuple[Any, Any]:
                mapping = itertools.chain(
                    zip(task.trainable_variables, state[0], strict=True),
                    zip(task.non_trainable_variables, state[1], strict=True),
                )
                with keras.StatelessScope(state_mapping=mapping):
                    return _generate_step(task.backbone, config, sigmas, latents, token_ids, guidance_scale)

            self._programs[key] = run if task.run_eagerly else jax.jit(run)
        return self._programs[key]


def _generate_step(
    backbone: Any, config: abcore.ABConfig, sigmas: np.ndarray, latents: Any, token_ids: Any, guidance_scale: Any
) -> tuple[Any, jax.Array]:
    """`StableDiffusion3TextToImage.generate_step` with its fori_loop replaced by `abcache_jax.sample`."""
    ops = keras.ops
    token_ids, negative_token_ids = token_ids
    embeddings = backbone.encode_text_step(token_ids, negative_token_ids)
    num_train_timesteps = backbone.scheduler.num_train_timesteps

    def velocity(params: Any, latents: Any, sigma: jax.Array) -> Any:
        """The guided velocity at sigma: `denoise_step` without its Euler step (timestep = 1000 sigma)."""
        (positive, negative, positive_pooled, negative_pooled), guidance_scale = params
        timestep = ops.multiply(ops.reshape(sigma, (1,)), num_train_timesteps)
        timestep = backbone.timestep_broadcast_to(latents, timestep)
        if guidance_scale is not None:
            timestep = ops.concatenate([timestep, timestep], axis=0)
            latents = ops.concatenate([latents, latents], axis=0)
            context = ops.concatenate([positive, negative], axis=0)
            pooled = ops.concatenate([positive_pooled, negative_pooled], axis=0)
        else:
            context, pooled = positive, positive_pooled
        noise = backbone.diffuser(
            {"latent": latents, "context": context, "pooled_projection": pooled, "timestep": timestep},
            training=False,
        )
        return noise if guidance_scale is None else backbone.cfg(noise, guidance_scale)

    steps = abcore.LinearSteps.euler(sigmas)
    out = sample(velocity, (embeddings, guidance_scale), latents, sigmas, flow_euler_step, config, steps=steps)
    return backbone.decode_step(out.x), out.computed


def enable_ab_cache(task: Any, config: abcore.ABConfig | None = None) -> None:
    """Make ``task.generate`` run with AB-Cache (paper, Sections 3.3-3.4); `disable_ab_cache` undoes it.

    The denoiser runs at the steps the config computes; the others are predicted by Lagrange
    extrapolation of the guided velocity through the last ``config.order`` computed ones at their
    real sigmas (Eq. 3.5, error O(h^k)) and corrected on the scheduler's Euler step. The default
    `abcore.ABConfig()` is a budget of 5 + n // 5 calls placed by the Euler step's sensitivity: on SD3's
    shifted grid 28 steps make 10 denoiser calls (steps 0, 2, 7, 10, 15, 19, 23, 25, 26, 27: one warm-up
    step, the last 3, the rest evenly); ``ABConfig(interval=5)`` is the previous fixed schedule (steps 0, 1, 5, 10, 15, 20,
    24-27) and ``ABConfig(interval=1)`` computes every step and gives keras-hub's images bit for bit.
    Calling it again replaces the config (the programs compiled for other configs are kept).
    Needs ``KERAS_BACKEND=jax``.

        task = keras_hub.models.StableDiffusion3TextToImage.from_preset("stable_diffusion_3_medium")
        enable_ab_cache(task)
        images = task.generate("Astronaut in a jungle", num_steps=28)

    Args:
        task: a keras-hub `TextToImage` task whose backbone has Stable Diffusion 3's loop
            (``encode_text_step``, a flow-matching ``scheduler``, ``diffuser``, ``cfg``, ``decode_step``).
        config: an `abcore.ABConfig` (a call budget, the fixed schedule, or adaptive with ``tolerance``); None
            for the default.

    Raises:
        RuntimeError: when Keras does not run on the JAX backend.
        TypeError: naming the parameter, for a task without that loop or a config of the wrong type.
    """
    if keras.config.backend() != "jax":
        raise RuntimeError(f"enable_ab_cache needs KERAS_BACKEND=jax, Keras runs on {keras.config.backend()!r}")
    if not isinstance(task, keras_hub.models.TextToImage):
        raise TypeError(f"task must be a keras_hub.models.TextToImage, got {type(task).__name__}")
    missing = [name for name in _BACKBONE_PARTS if not hasattr(task.backbone, name)]
    if missing or not hasattr(task.backbone.scheduler, "num_train_timesteps"):
        raise TypeError(
            f"task: {type(task).__name__}'s backbone lacks {missing or ['scheduler.num_train_timesteps']} "
            "of Stable Diffusion 3's denoising loop"
        )
    if config is None:
        config = abcore.ABConfig()
    if not isinstance(config, abcore.ABConfig):
        raise TypeError(f"config must be an abcore.ABConfig or None, got {type(config).__name__}")
    previous = task.__dict__.get("make_generate_function")
    programs = previous._programs if isinstance(previous, ABCacheGenerate) else None
    task.make_generate_function = ABCacheGenerate(task, config, programs)
    task.generate_function = None


def disable_ab_cache(task: Any) -> None:
    """Restore keras-hub's own generate function (compiled afresh at the next call)."""
    if isinstance(task.__dict__.get("make_generate_function"), ABCacheGenerate):
        del task.make_generate_function
    task.generate_function = None


def computed_steps(task: Any) -> np.ndarray | None:
    """(n,) bool: which steps of the last ``task.generate`` ran the denoiser (None if none or not enabled)."""
    installed = task.__dict__.get("make_generate_function")
    return installed.computed if isinstance(installed, ABCacheGenerate) else None
