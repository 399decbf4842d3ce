"""The main job end to end, small: `abcache demo`, the benchmark, and torch / JAX parity on the shipped flow model."""

from __future__ import annotations

import numpy as np
import pytest
from abcache_diffusers import ABCacheConfig
from abcache_diffusers.demo.compare import EpsSetup, FlowSetup, Scorer


@pytest.fixture(scope="module")
def flow() -> FlowSetup:
    return FlowSetup(batch=4, seed=0)


def test_demo_prints_the_table_and_writes_the_grid(tmp_path, capsys):
    from abcache_diffusers.cli import main

    out = tmp_path / "grid.png"
    assert main(["demo", "--batch", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for method in ("full 50 steps", "AB-Cache (order 2, interval 5)", "reuse (order 1)", "JAX/Flax"):
        assert method in text
    # full 50 calls per branch, default plan 15 (tail of 4 computed), for both models
    rows = [line.split("|") for line in text.splitlines() if line.startswith(("flow ", "eps "))]
    assert [r[2].strip() for r in rows] == ["50", "15", "15", "15", "50", "15", "15"]
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] > 10 * 16 and image.size[1] >= 6 * 16


def test_bench_quick_writes_report_and_plot(tmp_path):
    from abcache_diffusers.bench import main

    assert main(["--quick", "--batch", "2", "--out-dir", str(tmp_path), "--gpu-json", str(tmp_path / "none")]) == 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    for needle in ("## Targets", "TaylorSeer", "FirstBlockCache", "MagCache", "DPM-Solver++(2M)", "UniPC", "binomial"):
        assert needle in report
    assert (tmp_path / "benchmarks" / "pareto.png").stat().st_size > 1000


def test_nfe_counts_only_full_evaluations(flow):
    full = flow.run("full", "full")
    cached = flow.run("ab", "ab", cache=ABCacheConfig())
    assert full.nfe == 50
    assert cached.nfe == ABCacheConfig().to_ab_config().num_computed(50) == 15


def test_cached_sampler_stays_close_and_beats_reuse(flow):
    scorer = Scorer()
    ref = flow.run("full", "full")
    ours = scorer.score(flow.run("ab", "ab", cache=ABCacheConfig()), ref)
    reuse = scorer.score(flow.run("reuse", "reuse", cache=ABCacheConfig(order=1, correct=False)), ref)
    assert ours.scores["psnr"] > 35.0
    assert ours.scores["psnr"] > reuse.scores["psnr"] + 2.0


def test_torch_hook_and_jax_sampler_agree_on_the_shipped_flow_model(flow):
    """Both adapters execute abcore's rule, the correction included: same decisions, same images."""
    from abcache_diffusers.demo.jax_flow import sample_flow_jax

    config = ABCacheConfig()
    torch_run = flow.run("ab", "ab", cache=config)
    jax_run = sample_flow_jax(flow, config.to_ab_config())
    assert jax_run.nfe == torch_run.nfe == 15
    np.testing.assert_allclose(jax_run.images, torch_run.images, atol=2e-4)


def test_eps_default_beats_paper_exponential_weighting():
    eps = EpsSetup(batch=3, seed=0)
    scorer = Scorer()
    ref = eps.run("full", "full")
    plain = scorer.score(eps.run("plain", "ab", cache=ABCacheConfig()), ref)
    paper = scorer.score(eps.run("exp", "ab", cache=ABCacheConfig(weighting="exp-eps")), ref)
    assert plain.scores["psnr"] > paper.scores["psnr"] + 10.0
