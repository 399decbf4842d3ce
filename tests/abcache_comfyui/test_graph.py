"""The node through ComfyUI itself: loaded as a custom node, a KSampler prompt graph run by `validate_prompt` and
`PromptExecutor`; and side by side with ComfyUI's core EasyCache node at matched model calls.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import abcore
import comfy_env
import pytest
import torch

PACKAGE = comfy_env.ROOT / "packages" / "abcache-comfyui"
TINY_NODES = comfy_env.ROOT / "tests" / "abcache_comfyui" / "tiny_nodes"


class Server:
    """What `PromptExecutor` needs of ComfyUI's `PromptServer` to run a prompt headless."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


@pytest.fixture(scope="module")
def nodes(comfy: Any) -> Any:
    import nodes

    for path, parent in ((PACKAGE, "custom_nodes"), (TINY_NODES, "custom_nodes")):
        assert asyncio.run(nodes.load_custom_node(str(path), module_parent=parent)), path
    assert asyncio.run(
        nodes.load_custom_node(str(comfy / "comfy_extras" / "nodes_easycache.py"), module_parent="comfy_extras")
    )
    assert {"ABCache", "EasyCache", "KSampler", "TinyModel"} <= set(nodes.NODE_CLASS_MAPPINGS)
    return nodes


def prompt(cache: dict[str, Any] | None, sampler: str = "euler", steps: int = 20, family: str = "flux") -> dict:
    """A KSampler graph on a tiny model; `cache`: the AB-Cache node's inputs (None: no node)."""
    graph: dict[str, Any] = {
        "1": {"class_type": "TinyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "TinyConditioning", "inputs": {"family": family, "seed": 1}},
        "3": {"class_type": "TinyConditioning", "inputs": {"family": family, "seed": 2}},
        "4": {"class_type": "TinyLatent", "inputs": {"family": family, "size": 16, "batch": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["5", 0] if cache is not None else ["1", 0],
                "seed": 3,
                "steps": steps,
                "cfg": 4.0,
                "sampler_name": sampler,
                "scheduler": "simple",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "CaptureLatent", "inputs": {"samples": ["6", 0], "name": "out"}},
    }
    if cache is not None:
        graph["5"] = {"class_type": "ABCache", "inputs": {"model": ["1", 0], **cache}}
    return graph


NODE_DEFAULTS = {
    "order": 2,
    "interval": 0,
    "speedup": 0.0,
    "warmup": -1,
    "cooldown": -1,
    "tolerance": 0.0,
    "start_percent": 0.0,
    "end_percent": 1.0,
    "correct": True,
    "verbose": False,
}


def execute(graph: dict) -> torch.Tensor:
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("p", graph, None))
    assert valid, (error, node_errors)
    executor = execution.PromptExecutor(Server(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    comfy_env.CAPTURED.clear()
    executor.execute(graph, "p", {}, outputs)
    assert executor.success, executor.status_messages
    return comfy_env.CAPTURED["out"]


def test_node_defaults_are_abconfigs(nodes: Any) -> None:
    required = nodes.NODE_CLASS_MAPPINGS["ABCache"].INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in required.items() if name != "model"}
    assert defaults == NODE_DEFAULTS
    default = abcore.ABConfig()  # the node's 0 / -1 mean "not given": abcore's default call budget
    assert (default.order, default.interval, default.warmup, default.cooldown) == (2, None, None, None)
    assert default.budgeted and [default.budget(n) for n in (20, 28, 50)] == [9, 10, 15]
    assert all("tooltip" in spec[1] for spec in required.values())
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ABCache"] == "AB-Cache"


def run_graph(cache: dict[str, Any], name: str = "q") -> Any:
    """Run `prompt(cache)` without asserting its success: the executor."""
    import execution

    graph = prompt(cache)
    executor = execution.PromptExecutor(Server(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    _valid, _, outputs, _ = asyncio.run(execution.validate_prompt(name, graph, None))
    executor.execute(graph, name, {}, outputs)
    return executor


def test_prompt_graph_through_the_executor(nodes: Any, run_log: Any) -> None:
    ref = execute(prompt(None))
    same = execute(prompt(dict(NODE_DEFAULTS, interval=1)))
    assert torch.equal(same, ref)
    run_log.runs.clear()
    out = execute(prompt(NODE_DEFAULTS))
    (run,) = run_log.runs
    assert run.settings.config == abcore.ABConfig()
    assert run.stats.computed == abcore.ABConfig().num_computed(20) == 9
    assert run.schedule.sensitivity is not None  # euler: the budget is placed by the sampler's sensitivity
    enabled = "AB-Cache enabled - order 2, a budget of 9 calls (5 + steps // 5) placed by the sampler's sensitivity"
    assert any(m.startswith(enabled) for m in run_log.messages), run_log.messages
    assert any(m.startswith("AB-Cache - skipped 11/20 steps") for m in run_log.messages)
    assert 0 < comfy_env.relative_error(out, ref) < 1e-2
    # interval >= 1: the previous default, the fixed schedule 0, 1, 5, 10, 15-19
    run_log.runs.clear()
    execute(prompt(dict(NODE_DEFAULTS, interval=5)))
    (run,) = run_log.runs
    assert run.settings.config == abcore.ABConfig(interval=5)
    assert sorted(run.computed) == [0, 1, 5, 10, 15, 16, 17, 18, 19]
    # speedup: floor(20 / 4) = 5 calls
    run_log.runs.clear()
    execute(prompt(dict(NODE_DEFAULTS, speedup=4.0)))
    (run,) = run_log.runs
    assert run.settings.config == abcore.ABConfig(speedup=4.0)
    assert run.stats.computed == len(run.computed) == 5
    # a config the node cannot run is refused with an error, never ignored
    assert not run_graph(dict(NODE_DEFAULTS, order=1, tolerance=0.2)).success
    assert not run_graph(dict(NODE_DEFAULTS, interval=5, speedup=2.0), "r").success
    assert not run_graph(dict(NODE_DEFAULTS, speedup=0.5), "s").success


def counted_sample(model: Any, family: str, steps: int) -> tuple[torch.Tensor, int]:
    import comfy.sample

    latent = torch.zeros(1, comfy_env.latent_channels(family), 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    positive, negative = comfy_env.conditioning(family, 1), comfy_env.conditioning(family, 2)
    counter = model.model.call_counter
    counter.calls = 0
    out = comfy.sample.sample(
        model, noise, steps, 4.0, "euler", "simple", positive, negative, latent, seed=3, disable_pbar=True
    )
    return out, counter.calls


def matched_config(steps: int, calls: int) -> abcore.ABConfig | None:
    """The first fixed AB-Cache schedule (default warm-up / cool-down first) with exactly `calls` model calls."""
    for cooldown, warmup, interval in itertools.product((4, 3, 2, 1, 0), (2, 1, 3), range(2, steps + 1)):
        config = abcore.ABConfig(interval=interval, warmup=warmup, cooldown=cooldown)
        if config.num_computed(steps) == calls:
            return config
    return None


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_side_by_side_with_easycache(nodes: Any, run_log: Any, family: str) -> None:
    from abcache_comfyui import Settings, patch_model

    steps = 30
    model = comfy_env.counted(comfy_env.tiny_model(family, seed=0))
    ref, ref_calls = counted_sample(model, family, steps)
    easycache = nodes.NODE_CLASS_MAPPINGS["EasyCache"]
    header = [
        "model",
        "EasyCache threshold",
        "model calls",
        "EasyCache rel. error",
        "AB-Cache config",
        "AB-Cache rel. error",
    ]
    for threshold in (0.05, 0.1, 0.2):
        patched = easycache.execute(model, threshold, 0.15, 0.95, False)[0]
        ec_out, ec_calls = counted_sample(patched, family, steps)
        ec_error = comfy_env.relative_error(ec_out, ref)
        # the same calls as a budget (placed by the sampler's sensitivity), and as the first fixed schedule
        configs = [abcore.ABConfig(calls=ec_calls), matched_config(steps, ec_calls)]
        for config in configs:
            if config is None:
                comfy_env.report(
                    "EasyCache side by side (euler, simple, 30 steps, cfg 4)",
                    header,
                    [family, threshold, f"{ec_calls} / {ref_calls}", "", "no AB-Cache schedule with these calls", ""],
                )
                continue
            ab_out, ab_calls = counted_sample(patch_model(model, Settings(config)), family, steps)
            assert ab_calls == ec_calls
            ab_error = comfy_env.relative_error(ab_out, ref)
            if config.budgeted:
                shown = f"calls={config.calls} (budget)"
            else:
                shown = f"interval {config.interval}, warmup {config.warmup}, cooldown {config.cooldown}"
            comfy_env.report(
                "EasyCache side by side (euler, simple, 30 steps, cfg 4)",
                header,
                [family, threshold, f"{ec_calls} / {ref_calls}", f"{ec_error:.2e}", shown, f"{ab_error:.2e}"],
            )
            assert torch.isfinite(ab_out).all()
