"""Two JAX processes on one mesh: both compute the same steps, and the sharded run equals the one-process run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import abcore
import numpy as np

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 240


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


processes = _load(Path(__file__).parents[1] / "processes.py")


def load_worker():
    return processes.load(WORKER)


def launch(outdir: Path) -> None:
    """Both processes side by side, 2 CPU devices each (`processes.run_two`)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    port = str(processes.free_port())
    processes.run_two(WORKER, [[port, str(i), str(outdir)] for i in range(2)], outdir, env, TIMEOUT_S)


def test_two_processes_compute_the_same_steps_as_one(tmp_path):
    launch(tmp_path)
    got = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(2)]
    worker = load_worker()
    x, freq = worker.batch()
    n = worker.N_STEPS
    for name, config in worker.CONFIGS.items():
        single = worker.run(freq, x, config)
        computed = np.asarray(single.computed)
        np.testing.assert_array_equal(got[0][f"{name}_computed"], computed)
        np.testing.assert_array_equal(got[1][f"{name}_computed"], computed)
        for g in got:
            np.testing.assert_allclose(g[f"{name}_x"], np.asarray(single.x), rtol=1e-5, atol=1e-6)
        if name == "fixed":
            np.testing.assert_array_equal(computed, config.forced_mask(n))
    # the adaptive test (the state test: the sampler's steps are known) sums over the whole batch: each
    # process's rows alone would decide otherwise
    assert abcore.schedule(worker.CONFIGS["adaptive"], worker.GRID[:-1], worker.STEPS).error == "state"
    local = [g["adaptive_local"] for g in got]
    joint = got[0]["adaptive_computed"]
    assert 0 < joint.sum() < n
    assert not np.array_equal(local[0], local[1])
    assert not any(np.array_equal(joint, half) for half in local)
