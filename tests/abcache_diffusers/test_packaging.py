"""The diffusers integration installs only the hook: no JAX, no weights, no demo (those live in abcache-examples)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util


def test_declares_no_jax_and_ships_no_weights() -> None:
    requires = md.requires("abcache-diffusers") or []
    names = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requires}
    assert not names & {"jax", "jaxlib", "flax", "abcache-jax", "abcache-examples"}
    files = [str(f) for f in md.files("abcache-diffusers") or []]
    assert files and not [f for f in files if f.endswith((".safetensors", ".npz", ".png"))]
    assert importlib.util.find_spec("abcache_diffusers.demo") is None
    assert "abcache" not in {
        ep.name for ep in md.entry_points(group="console_scripts") if ep.value.startswith("abcache_diffusers")
    }
