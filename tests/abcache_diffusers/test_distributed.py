"""Issue 22: AB-Cache on two gloo ranks (127.0.0.1, one process each) the ways diffusers pipelines are scaled out.

Ranks that generate independently make no collective call and never wait on each other; ranks that run one model
together (diffusers' context or tensor parallelism) take the same decisions over the group ``process_group="auto"``
finds on the denoiser; a batch split over the ranks decides per rank, or over the group it is given. Every rank is
compared with the same work done in one process without torch.distributed (`_parallel_worker.reference`).

Both ranks run every scenario in one launch (importing diffusers dominates the cost); the tests read its results.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

WORKER = Path(__file__).with_name("_parallel_worker.py")
TIMEOUT = 400  # seconds for both ranks together; the worker's gloo timeout (60 s) fails a stuck collective first

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


processes = _load(Path(__file__).parents[1] / "processes.py")
worker = processes.load(WORKER)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks side by side (`processes.run_two`); their results."""
    outdir = tmp_path_factory.mktemp("parallel")
    port = str(processes.free_port())
    args = [[str(rank), port, str(outdir)] for rank in range(2)]
    processes.run_two(WORKER, args, outdir, dict(os.environ, OMP_NUM_THREADS="1"), TIMEOUT)
    return [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def alone() -> dict[str, Any]:
    """The same work in this process, without torch.distributed."""
    return worker.reference()


def test_independent_ranks_finish_alone_and_match_one_process(ranks, alone):
    """Uneven generations (2 and 3) of uneven lengths (12 and 16 steps), `enable_ab_cache(pipe)` and tolerance=0.1:
    both ranks finish, no collective is called, and each rank's outputs and calls are bitwise its one-process run."""
    assert worker.PLANS[0] != worker.PLANS[1]  # the ranks' work differs: a shared collective would not pair up
    for rank, result in enumerate(ranks):
        generations, steps = worker.PLANS[rank]
        for label in ("default", "adaptive"):
            got, want = result["independent"][label], alone["independent"][rank][label]
            assert got["count"] == 0
            assert got["output"].shape[0] == generations
            torch.testing.assert_close(got["output"], want["output"], rtol=0, atol=0)
            assert got["calls"] == want["calls"] and got["stats"] == want["stats"]
            assert all(len(calls) < 2 * steps for calls in got["calls"])  # cond and uncond: some steps predicted


def counts(stats: dict | None) -> dict | None:
    """The counters of each context (the error estimates differ from one process in the last bits)."""
    if stats is None:
        return None
    keys = ("computed", "predicted", "fallbacks")
    return {name: [context[k] for k in keys] for name, context in stats["contexts"].items()}


def assert_model_parallel(ranks: list[dict], alone: dict, mode: str, key: str) -> None:
    got = [result[mode][key] for result in ranks]
    want = alone[mode][key]
    uncached = alone[mode][key.split("/")[0] + "/none/-"]
    # both ranks call the model at the same steps, those of one process, and hold the same output
    assert got[0]["calls"] == got[1]["calls"] == want["calls"]
    torch.testing.assert_close(got[0]["output"], got[1]["output"], rtol=0, atol=0)
    torch.testing.assert_close(got[0]["output"], want["output"], rtol=0, atol=1e-5)
    assert got[0]["stats"] == got[1]["stats"]  # the error estimates too: all-reduced over the group
    assert counts(got[0]["stats"]) == counts(want["stats"])
    if "/none/" in key:
        assert got[0]["count"] == got[1]["count"] == 0
        return
    assert len(want["calls"]) < len(uncached["calls"])  # some steps predicted
    # "auto" found the model-parallel group: the decisions are all-reduced over it
    assert got[0]["count"] == got[1]["count"] > 0
    for rank, result in enumerate(ranks):  # disable_ab_cache restores the uncached parallel model
        torch.testing.assert_close(got[rank]["disabled"], result[mode][key.split("/")[0] + "/none/-"]["output"])


@pytest.mark.parametrize("key", ["/".join(case) for case in worker.model_parallel_cases(("flux", "wan"))])
def test_ulysses_ranks_decide_alike_and_match_one_process(ranks, alone, key):
    """`enable_parallelism(ContextParallelConfig(ulysses_degree=2))` on tiny Flux and Wan, uncached, and the fixed
    and adaptive cache enabled before and after it: same steps on both ranks as in one process, output to 1e-5."""
    assert_model_parallel(ranks, alone, "ulysses", key)


@pytest.mark.parametrize("key", ["/".join(case) for case in worker.model_parallel_cases(("flux",))])
def test_tensor_parallel_ranks_decide_alike_and_match_one_process(ranks, alone, key):
    """`enable_parallelism(TensorParallelConfig(tp_degree=2))` on tiny Flux (diffusers' CPU refusal patched in the
    worker), as the Ulysses test."""
    assert_model_parallel(ranks, alone, "tensor", key)


@pytest.mark.parametrize("cache", ["none", "fixed", "adaptive"])
def test_data_parallel_split_batch(ranks, alone, cache):
    """A batch of two prompts, one per rank. process_group=None: each rank is bitwise its row run alone and calls no
    collective (adaptive: the rows decide differently). process_group=WORLD: both ranks take the decisions of
    the whole batch in one process, and their rows join into its output (to 1e-5)."""
    data, reference = [result["data"] for result in ranks], alone["data"]
    groups = ("-",) if cache == "none" else ("none", "world")
    for group in groups:
        got = [d[f"rank/{cache}/{group}"] for d in data]
        batch = reference[f"batch/{cache}/{'-' if cache == 'none' else 'none'}"]
        rows = [reference[f"row{rank}/{cache}/{'-' if cache == 'none' else 'none'}"] for rank in range(2)]
        if group == "world":
            assert got[0]["calls"] == got[1]["calls"] == batch["calls"]
            torch.testing.assert_close(torch.cat([g["output"] for g in got]), batch["output"], rtol=0, atol=1e-5)
            assert got[0]["count"] == got[1]["count"] > 0
            continue
        for rank in range(2):
            torch.testing.assert_close(got[rank]["output"], rows[rank]["output"], rtol=0, atol=0)
            assert got[rank]["calls"] == rows[rank]["calls"] and got[rank]["count"] == 0
        if cache != "adaptive":  # the same calls as the whole batch: its output
            torch.testing.assert_close(torch.cat([g["output"] for g in got]), batch["output"], rtol=0, atol=1e-5)
    if cache == "adaptive":  # the test can fail: alone the rows decide differently, and the whole batch as neither
        alone_calls = [data[rank]["rank/adaptive/none"]["calls"] for rank in range(2)]
        assert alone_calls[0] != alone_calls[1]
        assert reference["batch/adaptive/none"]["calls"] not in alone_calls
