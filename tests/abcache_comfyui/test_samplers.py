"""Every ComfyUI sampler with three schedulers on a tiny random-init Flux, through `comfy.sample.sample`.

For each (sampler, scheduler): the unpatched run is the reference; the node with ``interval=1`` must be
bitwise equal to it; the default node must be finite, and its diffusion-model forwards (counted inside every
wrapper) must be the reference's minus the calls the run says it saved, and exactly the schedule's planned
steps where the sampler calls the model once per step at the run's sigmas. A sampler that fails without the
node is skipped with the reason.
"""

from __future__ import annotations

from typing import Any

import abcore
import comfy_env
import numpy as np
import pytest
import torch

STEPS = 12
SCHEDULERS = ("simple", "karras", "normal")
TABLE = "sampler x scheduler (tiny Flux, 12 steps, cfg 4, default AB-Cache)"
HEADER = ["sampler", "scheduler", "result", "model calls (node / unpatched)", "steps skipped", "rel. error", "note"]


def sampler_names() -> list[str]:
    path = comfy_env.comfyui_dir()
    if path is None:
        return ["euler"]
    comfy_env.import_comfy(path)
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


@pytest.fixture(scope="module")
def flux(comfy: Any) -> Any:
    return comfy_env.counted(comfy_env.tiny_model("flux", seed=0))


def sample(model: Any, sampler: str, scheduler: str, steps: int = STEPS, size: int = 16, batch: int = 1) -> Any:
    import comfy.sample

    latent = torch.zeros(batch, 16, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    positive, negative = comfy_env.conditioning("flux", 1), comfy_env.conditioning("flux", 2)
    counter = model.model.call_counter
    counter.calls = 0
    out = comfy.sample.sample(
        model, noise, steps, 4.0, sampler, scheduler, positive, negative, latent, seed=3, disable_pbar=True
    )
    return out, counter.calls


def patched(model: Any, **config: Any) -> Any:
    from abcache_comfyui import Settings, patch_model

    return patch_model(model, Settings(abcore.ABConfig(**config)))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("sampler", sampler_names())
def test_sampler(flux: Any, run_log: Any, sampler: str, scheduler: str) -> None:
    try:
        ref, ref_calls = sample(flux, sampler, scheduler)
    except Exception as error:  # the sampler itself fails on this model and schedule: not the node's doing
        reason = f"fails without the node: {type(error).__name__}: {str(error)[:80]}"
        comfy_env.report(TABLE, HEADER, [sampler, scheduler, "skipped", "", "", "", reason])
        pytest.skip(reason)
    if not torch.isfinite(ref).all():
        reason = "the unpatched run is not finite"
        comfy_env.report(TABLE, HEADER, [sampler, scheduler, "skipped", "", "", "", reason])
        pytest.skip(reason)

    same, same_calls = sample(patched(flux, interval=1), sampler, scheduler)
    assert torch.equal(same, ref), "interval=1 must be bitwise equal to the unpatched model"
    assert same_calls == ref_calls

    run_log.runs.clear()
    out, calls = sample(patched(flux), sampler, scheduler)
    assert torch.isfinite(out).all()
    (run,) = run_log.runs
    saved = run.stats.predicted + run.reused
    assert calls == ref_calls - saved
    assert calls == run.stats.computed + run.repeats + run.uncached
    planned = int(run.schedule.forced.sum())
    assert planned == abcore.ABConfig().budget(STEPS)  # the default budget, 5 + 12 // 5 = 7 calls
    if run.uncached == 0 and run.repeats == 0 and ref_calls == STEPS and len(run.contexts) == 1:
        assert calls == planned, "one call per step: the node computes exactly the planned steps"
        computed = sorted(run.computed)
        assert computed == np.flatnonzero(run.schedule.forced).tolist()
    error = comfy_env.relative_error(out, ref)
    note = run.correction if run.correction.startswith("on") else "no correction"
    if run.uncached:
        note += f"; {run.uncached} calls off the step sigmas uncached"
    if run.repeats or run.reused:
        note += f"; 2nd calls per step: {run.repeats} computed, {run.reused} predicted"
    skipped = len(run.seen - run.computed)
    comfy_env.report(
        TABLE, HEADER, [sampler, scheduler, "ran", f"{calls} / {ref_calls}", skipped, f"{error:.2e}", note]
    )


def test_euler_correction_is_on_and_helps(flux: Any, run_log: Any) -> None:
    """euler / ddim: the correction is on, and on this model it lowers the error at the same calls."""
    ref, _ = sample(flux, "euler", "simple", steps=30)
    errors = {}
    for correct in (None, False):
        run_log.runs.clear()
        out, calls = sample(patched(flux, correct=correct), "euler", "simple", steps=30)
        (run,) = run_log.runs
        assert run.correction.startswith("on" if correct is None else "off")
        assert calls == abcore.ABConfig().num_computed(30)
        errors[correct] = comfy_env.relative_error(out, ref)
    assert errors[None] < errors[False]


def test_new_run_resets_and_shape_changes_restart(flux: Any, run_log: Any) -> None:
    """Each run starts fresh (same inputs, same result); another batch or resolution runs on a fresh state."""
    model = patched(flux)
    first, _ = sample(model, "euler", "simple")
    again, _ = sample(model, "euler", "simple")
    assert torch.equal(first, again)
    for size, batch in ((24, 1), (16, 2)):
        out, calls = sample(model, "euler", "simple", size=size, batch=batch)
        fresh, fresh_calls = sample(patched(flux), "euler", "simple", size=size, batch=batch)
        assert torch.equal(out, fresh)
        assert calls == fresh_calls == abcore.ABConfig().num_computed(STEPS)


def test_start_end_percent_compute_outside(flux: Any, run_log: Any) -> None:
    from abcache_comfyui import Settings, patch_model

    settings = Settings(abcore.ABConfig(cooldown=0, warmup=1, interval=100), start_percent=0.3, end_percent=0.7)
    run_log.runs.clear()
    _, calls = sample(patch_model(flux, settings), "euler", "simple")
    (run,) = run_log.runs
    sigma = run.schedule.times
    model_sampling = flux.model.model_sampling
    inside = (sigma <= model_sampling.percent_to_sigma(0.3)) & (sigma > model_sampling.percent_to_sigma(0.7))
    assert 0 < inside.sum() < STEPS
    expected = ~inside
    expected[0] = True
    assert run.schedule.forced.tolist() == expected.tolist()
    assert calls == int(expected.sum())


def test_adaptive_mode_runs(flux: Any, run_log: Any) -> None:
    """euler: the state test (the estimated change of the result); another sampler: the output's relative change."""
    for sampler, tolerance, test in (("euler", 0.01, "state"), ("dpmpp_2m", 0.2, "output")):
        ref, ref_calls = sample(flux, sampler, "simple", steps=30)
        run_log.runs.clear()
        out, calls = sample(patched(flux, tolerance=tolerance), sampler, "simple", steps=30)
        (run,) = run_log.runs
        assert run.schedule.error == test
        assert calls < ref_calls
        assert comfy_env.relative_error(out, ref) < 0.05
