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

    out = tmp_path / "missing" / "folder" / "grid.png"  # issue 17: a missing folder failed after the whole run
    assert main(["demo", "--batch", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for method in (
        "full 50 steps",
        "AB-Cache default (budget 5 + n // 5",
        "AB-Cache fast",
        "reuse (order 1)",
        "JAX/Flax",
    ):
        assert method in text
    # per model, the Fashion-MNIST model first: full 50 calls per branch, the default budget 5 + 50 // 5 = 15, the
    # fast preset, reuse 15 (interval 5, warm-up 2, last 4 computed), and on `flow` the JAX run of the default
    fast = FAST_CONFIG.to_ab_config().num_computed(50)
    models = ("fashion", "flow", "flow_ema", "eps", "v")
    rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if line.split(" ")[0] in models]
    assert [r[0] for r in rows] == [m for m in models for _ in range(5 if m == "flow" else 4)]
    expected = [["50", "15", str(fast), "15"] + (["15"] if m == "flow" else []) for m in models]
    assert [r[2] for r in rows] == [n for e in expected for n in e]
    # the Frechet distance and the class accuracy are printed for every run of the class-conditional models
    for r in rows:
        assert float(r[7]) > 0
        assert (r[8] != "") == (r[0] in ("fashion", "flow", "flow_ema"))
    from PIL import Image

    with Image.open(out) as image:
        # a block per model, a row per method (21 rows), 3 images each, 28x28 and 16x16 both scaled to 112 px
        assert image.size[1] >= 21 * 112 and 3 * 112 < image.size[0] < 3 * 114 + 500


class SamplingStarted(Exception):
    """Raised in place of the demo's first sampling step: the arguments were accepted."""


@pytest.fixture
def no_sampling(monkeypatch):
    """The demo stops with `SamplingStarted` where it would start building models and sampling."""
    import abcache_examples.compare

    def stop(*args, **kwargs):
        raise SamplingStarted

    monkeypatch.setattr(abcache_examples.compare, "make_setup", stop)


def test_demo_help_prints_the_demo_options(capsys):
    # issue 17: `abcache demo --help` printed the top-level help
    from abcache_examples.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: abcache demo")
    for option in ("--batch", "--seed", "--out", "--no-jax"):
        assert option in text


def test_demo_refuses_a_batch_below_two_before_sampling(tmp_path, capsys, no_sampling):
    # issue 17: `--batch 1` passed the check, sampled every model, then crashed in the Frechet distance
    from abcache_examples.cli import main

    for batch in ("1", "0", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["demo", "--batch", batch, "--out", str(tmp_path / "grid.png")])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert "abcache demo: error: argument --batch" in error and ">= 2" in error
    with pytest.raises(SamplingStarted):
        main(["demo", "--batch", "2", "--out", str(tmp_path / "grid.png")])


def test_demo_creates_the_out_folder_before_sampling(tmp_path, capsys, no_sampling):
    # issue 17: `--out` into a missing folder failed with a traceback after the whole run
    from abcache_examples.cli import main

    out = tmp_path / "a" / "b" / "grid.png"
    with pytest.raises(SamplingStarted):
        main(["demo", "--out", str(out)])
    assert out.parent.is_dir()
    # a folder that cannot be made (a file is in the way) or a folder as the file: an error naming --out
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file" / "grid.png", tmp_path):
        with pytest.raises(SystemExit) as exit_:
            main(["demo", "--out", str(bad)])
        assert exit_.value.code == 2
        assert "abcache demo: error: --out" in capsys.readouterr().err


def test_grid_lines_up_blocks_of_different_image_sizes():
    from abcache_examples.compare import grid_image

    blocks = [
        ("fashion", [f"class {i}" for i in range(10)], [("full 50 steps", -np.ones((10, 1, 28, 28)))]),
        ("flow", [], [("full 50 steps", -np.ones((10, 1, 16, 16)))]),
    ]
    image = np.asarray(grid_image(blocks))
    tile = 112  # the smallest multiple of 28 and 16 of at least 64 px
    # the rows of black tiles: one per block, each tile 112 px square, at the same x in both blocks
    black = [y for y in range(image.shape[0]) if (image[y] == 0).sum() >= 10 * tile]
    assert len(black) == 2 * tile
    starts = []
    for y in (black[0], black[-1]):
        dark = np.flatnonzero(image[y] == 0)
        dark = dark[dark >= image.shape[1] - 10 * (tile + 2)]  # right of the label column
        starts.append(dark[np.r_[True, np.diff(dark) > 1]].tolist())
    assert len(starts[0]) == 10 and set(np.diff(starts[0])) == {tile + 2}
    assert starts[0] == starts[1]


def test_grid_labels_are_not_cut():
    # the demo cut its labels ("flow_ema: AB-Cache de"): the label column now fits the widest label
    from abcache_examples.compare import grid_image
    from PIL import Image, ImageDraw, ImageFont

    label = "flow_ema: AB-Cache default (budget 5 + n // 5, placed by the sampler's sensitivity)\n15 calls, 52.6 dB"
    image = np.asarray(grid_image([("", [], [(label, np.ones((3, 1, 16, 16)))])]))  # white tiles: the ink is the label
    alone = Image.new("L", (2000, 200), 255)
    ImageDraw.Draw(alone).multiline_text((4, 4), label, fill=0, font=ImageFont.load_default())
    ink = int((np.asarray(alone) < 128).sum())
    assert ink > 100
    assert int((image < 128).sum()) == ink


def test_bench_quick_writes_report_plots_and_strips(tmp_path):
    import json

    from abcache_examples.bench import DEFAULT_METHOD, FAST_METHOD, PREVIOUS_METHOD, main

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
        "the previous default, `ABCacheConfig(interval=5)`",
    ):
        assert needle in report
    assert "MISSED" in report or "met" in report
    for model in ("flow", "eps"):
        assert (tmp_path / "benchmarks" / f"pareto_{model}.png").stat().st_size > 1000
        assert (tmp_path / "benchmarks" / f"strip_{model}.png").stat().st_size > 100
        records = json.loads((tmp_path / "benchmarks" / "results" / f"{model}.json").read_text())["records"]
        calls = {r["method"]: r["nfe"] for r in records}
        assert calls["full 50 steps"] == 50 and calls[DEFAULT_METHOD] == 15
        assert calls[PREVIOUS_METHOD] == ABCacheConfig(interval=5).to_ab_config().num_computed(50) == 15
        assert calls[FAST_METHOD] == FAST_CONFIG.to_ab_config().num_computed(50) == 14
    # block caches only run on the DiT (the UNets have no transformer block stack)
    eps_records = json.loads((tmp_path / "benchmarks" / "results" / "eps.json").read_text())["records"]
    assert not any("TaylorSeer" in r["family"] for r in eps_records)


def test_fashion_is_in_the_zoo_with_its_own_labels_classifier_and_reference():
    from abcache_examples.bench import MODEL_TITLES, ZOO
    from abcache_examples.compare import make_setup
    from abcache_examples.metrics import load_reference_stats

    assert "fashion" in ZOO and "fashion" in MODEL_TITLES
    setup = make_setup("fashion", 12, seed=0)
    assert isinstance(setup, FlowSetup)
    assert setup.labels.tolist() == [*range(10), 0, 1]
    assert tuple(setup.latents.shape) == (12, 1, 28, 28)
    scorer = Scorer("fashion")
    assert scorer.classifier_name == "fashion_classifier"
    np.testing.assert_array_equal(scorer.reference.cov, load_reference_stats("fashion_classifier").cov)
    run = scorer.score(setup.run("full", "fashion", steps=4), setup.run("full", "fashion", steps=4), setup.labels)
    assert run.images.shape == (12, 1, 28, 28) and run.nfe == 4
    assert run.scores["psnr"] == np.inf and np.isfinite(run.scores["fd"]) and 0 <= run.scores["accuracy"] <= 1
    with pytest.raises(ValueError, match="model must be one of"):
        make_setup("classifier", 2)


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
