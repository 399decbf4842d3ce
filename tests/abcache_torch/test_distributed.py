"""Two gloo ranks (127.0.0.1, one process each): ranks that share a process group decide alike, and ranks that
do not (``process_group=None``, the default) make no collective call, so they never wait on each other."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_gloo_worker.py")
TIMEOUT = 180  # seconds for both ranks together; the worker's gloo timeout (60 s) fails a stuck collective first

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


processes = _load(Path(__file__).parents[1] / "processes.py")


def load_worker():
    return processes.load(WORKER)


def run_ranks(mode: str, outdir: Path) -> list[dict]:
    """Both ranks of `mode` side by side (`processes.run_two`); their results."""
    port = str(processes.free_port())
    args = [[mode, str(rank), port, str(outdir)] for rank in range(2)]
    processes.run_two(WORKER, args, outdir, dict(os.environ, OMP_NUM_THREADS="1"), TIMEOUT)
    return [torch.load(outdir / f"{mode}-rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def agree(tmp_path_factory) -> list[dict]:
    return run_ranks("agree", tmp_path_factory.mktemp("agree"))


@pytest.mark.parametrize("path", ["abcache", "sample"])
def test_ranks_in_one_group_agree_and_match_a_single_process(agree, path):
    """process_group=dist.group.WORLD, the batch split over the ranks, adaptive (ABCache with CFG contexts, and
    sample): both ranks compute the same steps, those of one process on the whole batch, and their halves join
    into its result."""
    ranks = [result[path] for result in agree]
    worker = load_worker()
    x, freq = worker.batch()
    single_decisions, single_x = {"abcache": worker.run_agree, "sample": worker.run_sample}[path](x, freq, None)

    assert ranks[0]["decisions"] == ranks[1]["decisions"] == single_decisions
    assert 0 < sum(single_decisions) < len(single_decisions)  # some steps predicted, some computed
    # without the all-reduce the shards would disagree (with each other and the whole batch): the test can fail
    assert ranks[0]["local"] != ranks[1]["local"]
    assert single_decisions not in (ranks[0]["local"], ranks[1]["local"])
    torch.testing.assert_close(torch.cat([ranks[0]["x"], ranks[1]["x"]]), single_x, rtol=1e-12, atol=1e-12)
    for rank in ranks:
        grouped, alone = rank["collectives"]
        assert grouped > 0 and alone == 0  # the group all-reduces; None makes no collective call


def test_independent_ranks_never_wait_on_each_other(tmp_path):
    """Issue 22: with the default process_group=None, ranks that run different numbers of generations of
    different lengths (default config, and tolerance=0.1) both finish, make no collective call, and each gets
    exactly its one-process result."""
    ranks = run_ranks("independent", tmp_path)
    worker = load_worker()
    for rank, result in enumerate(ranks):
        assert result["collectives"] == 0
        alone = worker.run_independent(rank)
        generations, n = worker.PLANS[rank]
        for label in ("default", "adaptive"):
            got, want = result["runs"][label], alone[label]
            assert len(got["finals"]) == generations
            for a, b in zip(got["finals"], want["finals"], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for (xa, computed_a), (xb, computed_b) in zip(got["sampled"], want["sampled"], strict=True):
                torch.testing.assert_close(xa, xb, rtol=0, atol=0)
                assert computed_a == computed_b and 0 < sum(computed_a) < n
            assert got["stats"] == want["stats"]
            assert got["stats"]["steps"] == generations * n and got["stats"]["predicted"] > 0
    assert worker.PLANS[0] != worker.PLANS[1]  # the ranks' work differs: a shared collective would not pair up
