"""Adaptive mode across two gloo ranks: every rank makes the same decisions as one process on the whole batch."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_gloo_worker.py")


def load_worker():
    spec = importlib.util.spec_from_file_location("_gloo_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_agree_and_match_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(free_port()), str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    worker = load_worker()
    x, freq = worker.batch()
    single_decisions, single_x = worker.run(x, freq)

    assert ranks[0]["decisions"] == ranks[1]["decisions"] == single_decisions
    assert 0 < sum(single_decisions) < len(single_decisions)  # some steps predicted, some computed
    # without the all-reduce the shards would disagree (with each other and the whole batch): the test can fail
    assert ranks[0]["local"] != ranks[1]["local"]
    assert single_decisions not in (ranks[0]["local"], ranks[1]["local"])
    torch.testing.assert_close(torch.cat([ranks[0]["x"], ranks[1]["x"]]), single_x, rtol=1e-12, atol=1e-12)
