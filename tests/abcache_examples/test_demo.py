"""The main job end to end, small: `abcache demo`, the benchmark, and torch / JAX parity on the shipped flow model."""

from __future__ import annotations

import numpy as np
import pytest
from abcache_diffusers import ABCacheConfig
from abcache_examples.compare import FAST_CONFIG, EpsSetup, FlowSetup, Scorer


@pytest.fixture(scope="module")
def flow() -> FlowSetup:
    return FlowSetup(batch=4, seed=0)


def test_demo_prints_the_table_and_writes_the_grid(tmp_path, capsys):
    from abcache_examples.cli import main
    from abcache_examples.models import FLOW_MODELS, UNET_MODELS

    out = tmp_path / "grid.png"
    assert main(["demo", "--batch", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for method in ("full 50 steps", "AB-Cache default (interval 5", "AB-Cache fast", "reuse (order 1)", "JAX/Flax"):
        assert method in text
    # per model: full 50 calls per branch, the default 15 (tail of 4 computed), the fast preset, reuse 15
    fast = FAST_CONFIG.to_ab_config().num_computed(50)
    models = (*FLOW_MODELS, *UNET_MODELS)
    rows = [line.split("|") for line in text.splitlines() if line.split(" ")[0] in models]
    expected = [["50", "15", str(fast), "15"] + (["15"] if m == "flow" else []) for m in models]
    assert [r[2].strip() for r in rows] == [n for e in expected for n in e]
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] > 10 * 16 and image.size[1] >= 12 * 16


def test_bench_quick_writes_report_plots_and_strips(tmp_path):
    import json

    from abcache_examples.bench import DEFAULT_METHOD, FAST_METHOD, main

    argv = ["--quick", "--models", "flow", "eps", "--seeds", "0", "--batch", "2", "--timing-repeats", "1"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    for needle in (
        "## Targets",
        "TaylorSeer",
        "FirstBlockCache",
        "MagCache",
        "SeaCache",
        "DPM-Solver++(2M)",
        "UniPC",
        "binomial",
        "reuse",
        "AB-Cache adaptive",
        "the step index",
        "## Wall clock",
        "Step-to-step jitter",
    ):
        assert needle in report
    assert "MISSED" in report or "met" in report
    for model in ("flow", "eps"):
        assert (tmp_path / "benchmarks" / f"pareto_{model}.png").stat().st_size > 1000
        assert (tmp_path / "benchmarks" / f"strip_{model}.png").stat().st_size > 100
        records = json.loads((tmp_path / "benchmarks" / "results" / f"{model}.json").read_text())["records"]
        calls = {r["method"]: r["nfe"] for r in records}
        assert calls["full 50 steps"] == 50 and calls[DEFAULT_METHOD] == 15
        assert calls[FAST_METHOD] == FAST_CONFIG.to_ab_config().num_computed(50) == 14
    # block caches only run on the DiT (the UNets have no transformer block stack)
    eps_records = json.loads((tmp_path / "benchmarks" / "results" / "eps.json").read_text())["records"]
    assert not any("TaylorSeer" in r["family"] for r in eps_records)


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
    from abcache_examples.jax_flow import sample_flow_jax

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
