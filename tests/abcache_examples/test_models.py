"""The shipped demo models load, and their pipelines produce what they should (abcache_examples)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from abcache_examples.metrics import classifier_accuracy, classifier_for
from abcache_examples.models import (
    FASHION_CLASSIFIER_CONFIG,
    FASHION_CONFIG,
    FLOW_CONFIG,
    FLOW_MODELS,
    MODEL_NAMES,
    NULL_CLASS,
    UNET_MODELS,
    load_classifier,
    load_eps_model,
    load_flow_model,
    weights_dir,
)
from abcache_examples.pipelines import make_ddim_pipeline, make_flow_pipeline


@pytest.fixture(scope="module")
def flow_pipe() -> Any:  # Any: the pipeline's return type is a union over output types
    return make_flow_pipeline()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_weights_are_small_and_have_configs(name: str) -> None:
    folder = weights_dir()
    megabytes = 10 if name == "fashion" else 5  # the Fashion-MNIST DiT has 2.1M parameters (8.5 MB)
    assert (folder / f"{name}.safetensors").stat().st_size < megabytes * 2**20
    assert isinstance(json.loads((folder / f"{name}.json").read_text()), dict)


def test_shipped_fashion_models_have_their_configs() -> None:
    folder = weights_dir()
    assert json.loads((folder / "fashion.json").read_text()) == FASHION_CONFIG
    assert json.loads((folder / "fashion_classifier.json").read_text()) == FASHION_CLASSIFIER_CONFIG
    clf = load_classifier(name="fashion_classifier")
    assert not clf.training and all(torch.isfinite(p).all() for p in clf.parameters())
    assert clf(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="name must be one of"):
        load_classifier(name="fashion")


def test_shipped_models_load_in_eval_mode() -> None:
    flow: Any = load_flow_model()
    eps, clf = load_eps_model(), load_classifier()
    for model in (flow, eps, clf):
        assert not model.training
        assert all(torch.isfinite(p).all() for p in model.parameters())
    # the Flax port reads this config: it must match the shipped one
    assert dict(json.loads((weights_dir() / "flow.json").read_text())) == FLOW_CONFIG
    assert flow.config.num_embeds_ada_norm == NULL_CLASS
    # the null-class embedding (row 10) was trained: it differs from every real class row
    table = flow.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == NULL_CLASS + 1
    assert (table[:NULL_CLASS] - table[NULL_CLASS]).norm(dim=1).min() > 1e-3


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_flow_pipeline_generates_requested_classes(name: str) -> None:
    flow_pipe: Any = make_flow_pipeline(name=name)
    labels = torch.arange(20) % 10
    gen = torch.Generator().manual_seed(0)
    images = flow_pipe(labels, num_inference_steps=50, guidance_scale=3.0, generator=gen, output_type="latent").images
    size = {"fashion": 28}.get(name, 16)
    assert images.shape == (20, 1, size, size)
    classifier = load_classifier(name=classifier_for(name))  # Fashion-MNIST's classifier for `fashion`
    assert classifier_accuracy(images, labels, classifier) >= 0.7
    # the labels matter: the same samples are mostly wrong for shifted labels
    assert classifier_accuracy(images, (labels + 1) % 10, classifier) < 0.3


def test_flow_pipeline_cfg_modes_and_output_types_agree(flow_pipe: Any) -> None:
    labels = [3, 7]
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = {"num_inference_steps": 8, "guidance_scale": 2.5, "latents": noise}
    sep = flow_pipe(labels, cfg_mode="separate", output_type="latent", **kw).images
    bat = flow_pipe(labels, cfg_mode="batched", output_type="latent", **kw).images
    torch.testing.assert_close(sep, bat, atol=1e-4, rtol=1e-4)
    pt = flow_pipe(labels, output_type="pt", **kw).images
    np_out = flow_pipe(labels, output_type="np", **kw).images
    torch.testing.assert_close(pt, (sep / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)
    assert isinstance(np_out, np.ndarray) and np_out.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(np_out, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    # guidance changes the result; scale 1 is the plain conditional sampler
    plain = flow_pipe(labels, num_inference_steps=8, guidance_scale=1.0, latents=noise, output_type="latent").images
    assert (plain - sep).abs().max() > 1e-2


def test_flow_pipeline_separate_cfg_calls_model_twice_per_step(flow_pipe: Any) -> None:
    calls: list[torch.Tensor] = []
    handle = flow_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["class_labels"].clone()), with_kwargs=True
    )
    try:
        flow_pipe([4], num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == 10
    assert [int(c[0]) for c in calls[:2]] == [4, NULL_CLASS]


def test_flow_pipeline_scheduler_is_shifted_flux_grid(flow_pipe: Any) -> None:
    flow_pipe.scheduler.set_timesteps(50)
    sigmas = flow_pipe.scheduler.sigmas.numpy()
    # diffusers spaces the unshifted grid from 1 down to the smallest (shifted) training sigma, then shifts
    smallest = 3 * 0.001 / (1 + 2 * 0.001)
    base = np.linspace(1.0, smallest, 50)
    np.testing.assert_allclose(sigmas[:-1], 3 * base / (1 + 2 * base), rtol=1e-5)
    assert sigmas[-1] == 0.0
    np.testing.assert_allclose(flow_pipe.scheduler.timesteps.numpy(), 1000 * sigmas[:-1], rtol=1e-5)


def test_flow_pipeline_rejects_bad_arguments(flow_pipe: Any) -> None:
    with pytest.raises(ValueError, match="class_labels"):
        flow_pipe([10])
    with pytest.raises(ValueError, match="output_type"):
        flow_pipe([1], output_type="pil")
    with pytest.raises(ValueError, match="cfg_mode"):
        flow_pipe([1], cfg_mode="both")
    with pytest.raises(ValueError, match="latents"):
        flow_pipe([1, 2], latents=torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize("name", UNET_MODELS)
def test_ddim_pipeline_output_is_finite_and_in_range(name: str) -> None:
    pipe: Any = make_ddim_pipeline(name=name)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[name]
    assert not pipe.scheduler.config.clip_sample  # the step stays linear in the model output (the correction)
    out = pipe(batch_size=8, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (8, 16, 16, 1)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    # digits: a mostly dark background with bright strokes, not noise or a flat image
    assert 0.1 < images.mean() < 0.6 and images.std() > 0.2
