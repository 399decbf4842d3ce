"""Two JAX processes on one mesh: both compute the same steps, and the sharded run equals the one-process run."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 240


def load_worker():
    spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(outdir: Path) -> None:
    """Start both processes, wait for them (TIMEOUT_S), and kill each by its pid if either fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(outdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"exit codes {codes}:\n" + "\n----\n".join(logs)


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
    # the adaptive test sums over the whole batch: each process's rows alone would decide otherwise
    local = [g["adaptive_local"] for g in got]
    joint = got[0]["adaptive_computed"]
    assert 0 < joint.sum() < n
    assert not np.array_equal(local[0], local[1])
    assert not any(np.array_equal(joint, half) for half in local)
