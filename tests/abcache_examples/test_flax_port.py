"""The Flax DiT port (abcache_examples.flax_dit) against diffusers' torch DiTTransformer2DModel.

Tolerance: both sides run in float32; the port must agree to REL_TOL = 1e-4 of the largest output
magnitude (measured on CPU: about 1e-5 with the perturbed random weights below).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from abcache_examples.flax_dit import (
    DiTConfig,
    FlaxDiT,
    convert_torch_state_dict,
    flow_model_fn,
    load_flax_dit,
)
from abcache_examples.models import FLOW_CONFIG, weights_dir  # the shipped flow model's config
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

REL_TOL = 1e-4
# Exercises the other config paths: several in/out channels (conv and unpatchify channel order),
# patch 4, affine norm3, exact gelu, attention without bias.
ODD_CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 2,
    "out_channels": 3,
    "num_layers": 2,
    "sample_size": 16,
    "patch_size": 4,
    "num_embeds_ada_norm": 5,
    "activation_fn": "gelu",
    "attention_bias": False,
    "norm_elementwise_affine": True,
}
SHIPPED = weights_dir()  # the installed package's weights


def _torch_model(config: dict, seed: int = 0) -> Any:
    """Random init, then every parameter perturbed so no zero-initialised (adaLN-Zero style) path hides an error."""
    torch.manual_seed(seed)
    model: Any = DiTTransformer2DModel(**config)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_out(model: torch.nn.Module, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y))
    return out.sample.numpy()


def _jit_apply(module: FlaxDiT):
    return jax.jit(lambda params, x, t, y: module.apply({"params": params}, x, t, y))


def _assert_close(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference relative to max |ref|; asserts it is within REL_TOL."""
    assert out.shape == ref.shape
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert rel <= REL_TOL, f"Flax port differs from torch by {rel:.2e} relative (tolerance {REL_TOL:.0e})"
    return rel


@pytest.fixture(scope="module")
def flow():
    model = _torch_model(FLOW_CONFIG)
    params = convert_torch_state_dict(_state_dict(model), FLOW_CONFIG)
    module = FlaxDiT(DiTConfig.from_dict(FLOW_CONFIG))
    return model, module, params, _jit_apply(module)


def _inputs(config: dict, batch: int, seed: int = 1, size: int | None = None):
    rng = np.random.default_rng(seed)
    n = size or config["sample_size"]
    x = rng.standard_normal((batch, config["in_channels"], n, n)).astype(np.float32)
    # timesteps = sigma * 1000 over the whole range, including both ends and non-integers
    t = np.resize(np.array([0.0, 1.5, 37.25, 250.7, 500.0, 731.9, 999.9, 1000.0], np.float32), batch)
    labels = np.resize(np.arange(config["num_embeds_ada_norm"] + 1), batch)  # every class and the null class
    return x, t, labels


def test_random_init_matches_torch_over_timesteps_and_classes(flow):
    model, _, params, apply = flow
    x, t, y = _inputs(FLOW_CONFIG, batch=11)
    assert y[-1] == 10  # the null class is in the batch
    ref = _torch_out(model, x, t, y)
    _assert_close(np.asarray(apply(params, x, t, y)), ref)


def test_port_is_sensitive_to_time_and_label(flow):
    # The parity above would be vacuous if the time or label path did not reach the output.
    _, _, params, apply = flow
    x, _, _ = _inputs(FLOW_CONFIG, batch=1)
    base = np.asarray(apply(params, x, np.array([500.0], np.float32), np.array([3])))
    other_t = np.asarray(apply(params, x, np.array([510.0], np.float32), np.array([3])))
    other_y = np.asarray(apply(params, x, np.array([500.0], np.float32), np.array([10])))
    scale = np.abs(base).max()
    assert np.abs(other_t - base).max() > 100 * REL_TOL * scale
    assert np.abs(other_y - base).max() > 100 * REL_TOL * scale


def test_scalar_timestep_and_label_broadcast(flow):
    model, module, params, _ = flow
    x, _, _ = _inputs(FLOW_CONFIG, batch=3)
    ref = _torch_out(model, x, np.full(3, 321.5, np.float32), np.full(3, 4))
    _assert_close(np.asarray(_jit_apply(module)(params, x, 321.5, 4)), ref)


@pytest.mark.parametrize("size", [16, 8])
def test_other_config_matches_torch(size):
    # size 8 != sample_size: both sides rebuild the position table with base_size = sample_size // patch.
    model = _torch_model(ODD_CONFIG, seed=3)
    params = convert_torch_state_dict(_state_dict(model), ODD_CONFIG)
    x, t, y = _inputs(ODD_CONFIG, batch=6, seed=4, size=size)
    out = _jit_apply(FlaxDiT(DiTConfig.from_dict(ODD_CONFIG)))(params, x, t, y)
    assert out.shape == (6, 3, size, size)
    _assert_close(np.asarray(out), _torch_out(model, x, t, y))


@pytest.mark.parametrize("guidance_scale", [None, 4.0])
def test_flow_model_fn_matches_torch_cfg(flow, guidance_scale):
    model, module, params, _ = flow
    x, _, _ = _inputs(FLOW_CONFIG, batch=4, seed=5)
    labels = np.array([1, 5, 9, 0])
    sigma = np.float32(0.62)
    model_fn = jax.jit(flow_model_fn(module, labels, guidance_scale=guidance_scale))
    out = np.asarray(model_fn(params, jnp.asarray(x), sigma))
    t = np.full(4, sigma * 1000, np.float32)
    cond = _torch_out(model, x, t, labels)
    if guidance_scale is None:
        ref = cond
    else:
        uncond = _torch_out(model, x, t, np.full(4, 10))
        ref = uncond + guidance_scale * (cond - uncond)
    _assert_close(out, ref)


def test_load_flax_dit_reads_safetensors_and_config(tmp_path, flow):
    model, _, params, _ = flow
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "flow.safetensors"))
    # a diffusers config.json style dict, with its private keys
    (tmp_path / "flow.json").write_text(json.dumps({**dict(model.config), "_class_name": "DiTTransformer2DModel"}))
    module, loaded = load_flax_dit(tmp_path / "flow.safetensors", tmp_path / "flow.json")
    assert module.config == DiTConfig.from_dict(FLOW_CONFIG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_convert_rejects_mismatched_state_dict(flow):
    model, _, _, _ = flow
    sd = _state_dict(model)
    missing = {k: v for k, v in sd.items() if k != "proj_out_2.bias"}
    with pytest.raises(ValueError, match="proj_out_2"):
        convert_torch_state_dict(missing, FLOW_CONFIG)
    with pytest.raises(ValueError, match=r"extra\.weight"):
        convert_torch_state_dict({**sd, "extra.weight": np.zeros((2, 2), np.float32)}, FLOW_CONFIG)
    with pytest.raises(ValueError, match=r"unexpected keys \[.transformer_blocks\.3\."):
        convert_torch_state_dict(sd, {**FLOW_CONFIG, "num_layers": 3})
    with pytest.raises(ValueError, match="mis-shaped"):
        convert_torch_state_dict(sd, {**FLOW_CONFIG, "num_embeds_ada_norm": 9})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"norm_type": "ada_norm"}, "norm_type"),
        ({"activation_fn": "geglu"}, "activation_fn"),
        ({"patch_size": 3}, "patch_size"),
        ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
        ({"heads": 2}, "heads"),
    ],
)
def test_config_validation(override, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig.from_dict({**FLOW_CONFIG, **override})


def test_flow_model_fn_rejects_bad_labels(flow):
    _, module, _, _ = flow
    with pytest.raises(ValueError, match="class_labels"):
        flow_model_fn(module, np.array([0, 11]))
    with pytest.raises(ValueError, match="class_labels"):
        flow_model_fn(module, np.array([0.5]))


def test_shipped_flow_weights_match_torch():
    from safetensors.torch import load_file

    config = json.loads((SHIPPED / "flow.json").read_text())
    model: Any = DiTTransformer2DModel(**config)
    model.eval()
    model.load_state_dict(load_file(str(SHIPPED / "flow.safetensors")))
    module, params = load_flax_dit(SHIPPED / "flow.safetensors", SHIPPED / "flow.json")
    x, t, y = _inputs(config, batch=8, seed=7)
    _assert_close(np.asarray(_jit_apply(module)(params, x, t, y)), _torch_out(model, x, t, y))
    # classifier-free guidance through the sampler-facing wrapper (sigma * 1000 timesteps)
    labels = np.arange(8) % config["num_embeds_ada_norm"]
    out = np.asarray(jax.jit(flow_model_fn(module, labels, guidance_scale=3.0))(params, x, np.float32(0.4)))
    ts = np.full(8, 400.0, np.float32)
    cond = _torch_out(model, x, ts, labels)
    uncond = _torch_out(model, x, ts, np.full(8, config["num_embeds_ada_norm"]))
    _assert_close(out, uncond + 3.0 * (cond - uncond))
