"""A Flax (linen) port of diffusers' `DiTTransformer2DModel` that loads the torch weights.

The forward pass follows diffusers 0.42 (`models/transformers/dit_transformer_2d.py`) in eval mode
(no label dropout, no attention dropout), for `norm_type="ada_norm_zero"`:

    h_0   = conv_pxp(x) + E_pos                                 # PatchEmbed, 2-D sin-cos table
    c_l   = MLP(sincos_256(t)) + Emb_l[y]                       # block l's own CombinedTimestepLabelEmbeddings
    (a, b, g, a', b', g') = Linear(silu(c_l))                   # AdaLayerNormZero, shift/scale/gate
    h    += g  * Attn(LN(h) (1 + b)  + a)                       # LN without affine, eps 1e-6
    h    += g' * FF(LN'(h) (1 + b') + a')                       # norm3 (eps norm_eps); FF: Linear(4d), gelu, Linear
    out   = unpatchify(Linear(LN(h) (1 + s) + m)), (m, s) = Linear(silu(c_0))   # final layer uses block 0's c

Layout: `FlaxDiT` takes and returns NCHW arrays, like the torch model, so the same `x` goes to both.
Numerics: float32 throughout; on CPU the port matches torch to about 1e-5 of the largest output (see
tests/abcache_examples/test_flax_port.py, which asserts 1e-4 of the output's largest magnitude). On GPUs
XLA's default matmul precision may use TF32; wrap calls in `jax.default_matmul_precision("highest")`
for torch-level parity there.

API:
    config = DiTConfig.from_dict(json.load(open("flow.json")))
    module, params = load_flax_dit("flow.safetensors", "flow.json")
    v = module.apply({"params": params}, x_nchw, timestep, class_labels)      # == torch model(...).sample
    model_fn = flow_model_fn(module, class_labels, guidance_scale=4.0)       # model_fn(params, x, sigma)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DiTConfig",
    "FlaxDiT",
    "convert_torch_state_dict",
    "flow_model_fn",
    "load_flax_dit",
    "sincos_pos_embed",
    "timestep_embedding",
]

_TIME_PROJ_DIM = 256  # CombinedTimestepLabelEmbeddings: Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
_ADA_NORM_EPS = 1e-6  # AdaLayerNormZero.norm and the final norm_out


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The `DiTTransformer2DModel` config (same names and defaults as diffusers).

    `dropout`, `norm_num_groups` and `upcast_attention` do not change the eval-mode float32 forward
    pass; they are kept so that a diffusers config dict round-trips.
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"out_channels must be None or a positive int, got {self.out_channels!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(
                f"patch_size must be a positive int dividing sample_size={self.sample_size}, got {self.patch_size!r}"
            )
        if self.norm_type != "ada_norm_zero":
            raise ValueError(f"norm_type must be 'ada_norm_zero' (the only DiT variant), got {self.norm_type!r}")
        if not isinstance(self.num_embeds_ada_norm, int) or self.num_embeds_ada_norm < 1:
            raise ValueError(
                f"num_embeds_ada_norm (number of classes) must be a positive int, got {self.num_embeds_ada_norm!r}"
            )
        if self.activation_fn not in ("gelu", "gelu-approximate"):
            raise ValueError(f"activation_fn must be 'gelu' or 'gelu-approximate', got {self.activation_fn!r}")
        if self.inner_dim % 4:
            raise ValueError(
                "num_attention_heads * attention_head_dim must be divisible by 4 (2-D sin-cos position table), "
                f"got {self.inner_dim}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def null_class(self) -> int:
        """The label-dropout (unconditional) class id: the extra row of the label table."""
        return int(self.num_embeds_ada_norm)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, config: DiTConfig | Mapping[str, Any]) -> DiTConfig:
        """Build from a diffusers config dict (`model.config`, config.json); `_`-prefixed keys are ignored."""
        if isinstance(config, DiTConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a DiTConfig or a mapping, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if not str(k).startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"config has keys that DiTTransformer2DModel does not take: {unknown}")
        return cls(**kwargs)


def timestep_embedding(timesteps: jax.Array, dim: int = _TIME_PROJ_DIM) -> jax.Array:
    """diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=1)`.

    f_k = exp(-ln(10000) k / (dim/2 - 1)), k < dim/2; returns [cos(t f), sin(t f)] (zero-padded if dim is odd).
    """
    half = dim // 2
    # Frequencies as torch computes them, in float32.
    freqs = np.exp(np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half - 1))
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs, dtype=jnp.float32)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    out = np.outer(pos.reshape(-1).astype(np.float64), 1.0 / 10000**omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=base_size)`, float32.

    Position p = index / (grid / base_size); the first half of the channels encodes the column
    (w) coordinate, the second half the row (h) coordinate, each as [sin(p w_k), cos(p w_k)] with
    w_k = 10000^(-k / (embed_dim/4)). Rows are tokens in row-major (h, w) order. Shape (grid_h*grid_w, embed_dim).
    """
    pos_h = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size)
    pos_w = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size)
    ww, hh = np.meshgrid(pos_w, pos_h, indexing="xy")  # (grid_h, grid_w) each
    emb = np.concatenate([_sincos_1d(embed_dim // 2, ww), _sincos_1d(embed_dim // 2, hh)], axis=1)
    return emb.astype(np.float32)


def _layer_norm(eps: float, affine: bool = False, name: str | None = None) -> nn.LayerNorm:
    # Exact two-pass variance, like torch's LayerNorm.
    return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False, name=name)


class _TimestepEmbedding(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, t_proj: jax.Array) -> jax.Array:
        h = nn.Dense(self.dim, name="linear_1")(t_proj)
        return nn.Dense(self.dim, name="linear_2")(nn.silu(h))


class _LabelEmbedding(nn.Module):
    num_classes: int
    dim: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        # num_classes + 1 rows: the last one is the null (CFG) class. Out-of-range ids give NaN.
        return nn.Embed(self.num_classes + 1, self.dim, name="embedding_table")(labels)


class _CombinedTimestepLabelEmbeddings(nn.Module):
    num_classes: int
    dim: int

    @nn.compact
    def __call__(self, timestep: jax.Array, labels: jax.Array) -> jax.Array:
        t_emb = _TimestepEmbedding(self.dim, name="timestep_embedder")(timestep_embedding(timestep))
        return t_emb + _LabelEmbedding(self.num_classes, self.dim, name="class_embedder")(labels)


class _AdaLayerNormZero(nn.Module):
    num_classes: int
    dim: int

    @nn.compact
    def __call__(
        self, x: jax.Array, timestep: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        cond = _CombinedTimestepLabelEmbeddings(self.num_classes, self.dim, name="emb")(timestep, labels)
        mod = nn.Dense(6 * self.dim, name="linear")(nn.silu(cond))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = _layer_norm(_ADA_NORM_EPS)(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, (gate_msa, shift_mlp, scale_mlp, gate_mlp), cond


class _Attention(nn.Module):
    heads: int
    head_dim: int
    dim: int
    bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        inner = self.heads * self.head_dim

        def split_heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, n, self.heads, self.head_dim)

        q = split_heads(nn.Dense(inner, use_bias=self.bias, name="to_q")(x))
        k = split_heads(nn.Dense(inner, use_bias=self.bias, name="to_k")(x))
        v = split_heads(nn.Dense(inner, use_bias=self.bias, name="to_v")(x))
        # softmax(q k^T / sqrt(d)) v, as F.scaled_dot_product_attention.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(math.sqrt(self.head_dim))
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, inner)
        return nn.Dense(self.dim, name="to_out_0")(out)


class _FeedForward(nn.Module):
    dim: int
    approximate: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(4 * self.dim, name="net_0_proj")(x)
        return nn.Dense(self.dim, name="net_2")(jax.nn.gelu(h, approximate=self.approximate))


class _DiTBlock(nn.Module):
    """BasicTransformerBlock(norm_type="ada_norm_zero"), self-attention only. Returns (h, block conditioning)."""

    config: DiTConfig

    @nn.compact
    def __call__(self, h: jax.Array, timestep: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim = cfg.inner_dim
        norm_h, (gate_msa, shift_mlp, scale_mlp, gate_mlp), cond = _AdaLayerNormZero(cfg.null_class, dim, name="norm1")(
            h, timestep, labels
        )
        attn = _Attention(cfg.num_attention_heads, cfg.attention_head_dim, dim, cfg.attention_bias, name="attn1")
        h = h + gate_msa[:, None] * attn(norm_h)
        norm_h = _layer_norm(cfg.norm_eps, cfg.norm_elementwise_affine, name="norm3")(h)
        norm_h = norm_h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = _FeedForward(dim, cfg.activation_fn == "gelu-approximate", name="ff")
        return h + gate_mlp[:, None] * ff(norm_h), cond


class _PatchEmbed(nn.Module):
    """PatchEmbed: stride-p conv on NCHW x, flattened to (B, gh*gw, dim) in row-major order, plus the sin-cos table."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, dim = self.config.patch_size, self.config.inner_dim
        batch, _, height, width = x.shape
        gh, gw = height // p, width // p
        conv = nn.Conv(dim, kernel_size=(p, p), strides=(p, p), padding="VALID", name="proj")
        h = conv(jnp.transpose(x, (0, 2, 3, 1))).reshape(batch, gh * gw, dim)
        return h + jnp.asarray(sincos_pos_embed(dim, gh, gw, base_size=self.config.sample_size // p))[None]


class FlaxDiT(nn.Module):
    """`DiTTransformer2DModel` forward pass in Flax linen; parameter tree mirrors the torch module names.

    __call__(x, timestep, class_labels) with x (B, C, H, W) (NCHW, as torch; H = W, divisible by
    patch_size), timestep a scalar or (B,) float (the torch model's `timestep`, e.g. sigma * 1000),
    class_labels (B,) ints in [0, num_embeds_ada_norm] (the last is the null class). Returns
    (B, out_channels, H, W).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array | float, class_labels: jax.Array) -> jax.Array:
        cfg = self.config
        p, dim = cfg.patch_size, cfg.inner_dim
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W) (NCHW), got {x.shape}")
        batch, _, height, width = x.shape
        if height != width or height % p:
            raise ValueError(f"x must be square with sides divisible by patch_size={p}, got {x.shape}")
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        class_labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (batch,))
        gh, gw = height // p, width // p

        h = _PatchEmbed(cfg, name="pos_embed")(x)

        conds = []
        for i in range(cfg.num_layers):
            h, cond = _DiTBlock(cfg, name=f"transformer_blocks_{i}")(h, timestep, class_labels)
            conds.append(cond)

        # The final adaLN reuses block 0's embedding (diffusers: transformer_blocks[0].norm1.emb).
        shift, scale = jnp.split(nn.Dense(2 * dim, name="proj_out_1")(nn.silu(conds[0])), 2, axis=-1)
        h = _layer_norm(_ADA_NORM_EPS)(h) * (1 + scale[:, None]) + shift[:, None]
        c = cfg.output_channels
        h = nn.Dense(p * p * c, name="proj_out_2")(h)
        # unpatchify: (B, gh, gw, p, p, c) -> (B, c, gh*p, gw*p)
        h = jnp.einsum("nhwpqc->nchpwq", h.reshape(batch, gh, gw, p, p, c))
        return h.reshape(batch, c, gh * p, gw * p)


def _torch_key_to_path(key: str) -> tuple[str, ...]:
    """'transformer_blocks.3.attn1.to_out.0.weight' -> ('transformer_blocks_3', 'attn1', 'to_out_0', 'weight')."""
    k = re.sub(r"transformer_blocks\.(\d+)\.", r"transformer_blocks_\1.", key)
    k = (
        k.replace("to_out.0.", "to_out_0.")
        .replace("ff.net.0.proj.", "ff.net_0_proj.")
        .replace("ff.net.2.", "ff.net_2.")
    )
    return tuple(k.split("."))


def _convert_leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    *module, leaf = path
    if leaf == "bias":
        return (*module, "bias"), value
    if leaf != "weight":
        raise ValueError(f"state_dict key {'.'.join(path)!r}: unexpected parameter name {leaf!r}")
    if module[-1] == "embedding_table":  # nn.Embedding (rows = classes)
        return (*module, "embedding"), value
    if value.ndim == 1:  # LayerNorm affine weight
        return (*module, "scale"), value
    if value.ndim == 2:  # nn.Linear (out, in) -> Dense (in, out)
        return (*module, "kernel"), value.T
    if value.ndim == 4:  # Conv2d (O, I, kH, kW) -> (kH, kW, I, O)
        return (*module, "kernel"), value.transpose(2, 3, 1, 0)
    raise ValueError(f"state_dict key {'.'.join(path)!r}: unexpected weight shape {value.shape}")


def _expected_shapes(config: DiTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    n = config.sample_size
    x = jax.ShapeDtypeStruct((1, config.in_channels, n, n), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    tree = jax.eval_shape(FlaxDiT(config).init, jax.random.PRNGKey(0), x, t, y)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_torch_state_dict(
    state_dict: Mapping[str, Any], config: DiTConfig | Mapping[str, Any], dtype: Any = np.float32
) -> dict[str, Any]:
    """Map a `DiTTransformer2DModel` state dict (numpy arrays) to `FlaxDiT` params (pure numpy).

    Linear weights are transposed to (in, out); the patch-embedding conv kernel goes from OIHW to
    HWIO; the label table and biases are kept; LayerNorm weights (only with norm_elementwise_affine)
    become `scale`. Every leaf is cast to `dtype`. Raises ValueError on missing, unexpected or
    mis-shaped entries (named by their torch keys). Returns the "params" collection (a nested dict).
    """
    config = DiTConfig.from_dict(config)
    expected = _expected_shapes(config)
    params: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    unexpected, mis_shaped = [], []
    for key, value in state_dict.items():
        path, leaf = _convert_leaf(_torch_key_to_path(key), np.asarray(value))
        if path not in expected:
            unexpected.append(key)
            continue
        if leaf.shape != expected[path]:
            mis_shaped.append(f"{key}: {tuple(np.asarray(value).shape)} does not fit {expected[path]} (Flax layout)")
            continue
        seen[path] = key
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(leaf, dtype=dtype)
    missing = sorted(".".join(p) for p in set(expected) - set(seen))
    if unexpected or mis_shaped or missing:
        raise ValueError(
            "state_dict does not match the DiT config: "
            f"unexpected keys {sorted(unexpected)}, mis-shaped {mis_shaped}, missing (Flax paths) {missing}"
        )
    return params


def load_flax_dit(
    safetensors_path: str | Path, config_json_path: str | Path, dtype: Any = np.float32
) -> tuple[FlaxDiT, dict[str, Any]]:
    """Read torch weights (safetensors, no torch needed) and their config JSON; return (module, params).

    The JSON is the diffusers config dict (`dict(model.config)` / config.json); a JSON object whose
    "config" entry holds that dict is accepted too.
    """
    from safetensors.numpy import load_file

    with open(config_json_path) as f:
        raw = json.load(f)
    if isinstance(raw, Mapping) and isinstance(raw.get("config"), Mapping):
        raw = raw["config"]
    config = DiTConfig.from_dict(raw)
    params = convert_torch_state_dict(load_file(str(safetensors_path)), config, dtype=dtype)
    return FlaxDiT(config), params


def flow_model_fn(
    module: FlaxDiT,
    class_labels: Any,
    guidance_scale: float | None = None,
    time_scale: float = 1000.0,
    null_class: int | None = None,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """Wrap `module` as `model_fn(params, x, t) -> velocity`, the abcache_jax.sample model contract.

    x is NCHW (B, C, H, W); t is the flow time sigma (scalar or (B,)), passed to the network as
    timestep = t * time_scale (the training convention: sigma * 1000). `params` is the "params"
    collection from `load_flax_dit` / `convert_torch_state_dict`. class_labels: (B,) ints or one int.
    guidance_scale None or 1.0: one conditional call. Otherwise (classifier-free guidance, as
    FlowMatchDiTPipeline's cfg_mode="batched"), cond and uncond run as ONE batched call on
    [x; x] with labels [y; null] (null_class defaults to config.num_embeds_ada_norm), and the result
    is v_uncond + g (v_cond - v_uncond). The labels are closed over (constants under jit).
    """
    if not isinstance(module, FlaxDiT):
        raise TypeError(f"module must be a FlaxDiT, got {type(module).__name__}")
    if guidance_scale is not None and not np.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be None or a finite float, got {guidance_scale!r}")
    null = module.config.null_class if null_class is None else int(null_class)
    if not 0 <= null <= module.config.null_class:
        raise ValueError(f"null_class must be in [0, {module.config.null_class}], got {null}")
    labels = np.asarray(class_labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim > 1:
        raise ValueError(f"class_labels must be an int or a 1-D int array, got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > module.config.null_class):
        raise ValueError(f"class_labels must lie in [0, {module.config.null_class}], got {labels}")

    def model_fn(params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * time_scale, (batch,))
        y = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (batch,))
        if guidance_scale is None or guidance_scale == 1.0:
            return cast(jax.Array, module.apply({"params": params}, x, timestep, y))
        out: jax.Array = module.apply(  # type: ignore[assignment]
            {"params": params},
            jnp.concatenate([x, x]),
            jnp.concatenate([timestep, timestep]),
            jnp.concatenate([y, jnp.full((batch,), null, jnp.int32)]),
        )
        cond, uncond = out[:batch], out[batch:]
        return uncond + guidance_scale * (cond - uncond)

    return model_fn
