"""Exact multistep weights in torch and `sample_lms` against k-diffusion's own (quadrature) sampler."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import multistep_table, sample_lms


@pytest.fixture(scope="module")
def k_sampling() -> Iterator[Any]:
    """k-diffusion's real `sampling` module (PyPI k-diffusion, installed without its dependencies).

    Its package `__init__` imports training code (kornia, wandb, clean-fid, torchvision); `sampling`
    needs only `utils`, which imports torchvision for two PIL helpers that sampling never calls. So the
    package is entered without running its `__init__`, and torchvision, if absent, is an empty module.
    """
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.submodule_search_locations, "k-diffusion is not installed"
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "k_diffusion", package)
        if importlib.util.find_spec("torchvision") is None:
            transforms = types.ModuleType("torchvision.transforms")
            transforms.functional = types.ModuleType("torchvision.transforms.functional")  # type: ignore[attr-defined]
            patch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
            patch.setitem(sys.modules, "torchvision.transforms", transforms)
            patch.setitem(sys.modules, "torchvision.transforms.functional", transforms.functional)
        for name in ("k_diffusion.utils", "k_diffusion.sampling"):
            patch.delitem(sys.modules, name, raising=False)
        yield importlib.import_module("k_diffusion.sampling")


def schedules(k: Any) -> dict[str, torch.Tensor]:
    return {
        "karras-10": k.get_sigmas_karras(10, 0.002, 80.0),
        "karras-50": k.get_sigmas_karras(50, 0.002, 80.0),
        "exponential-30": k.get_sigmas_exponential(30, 0.03, 14.6),
        "polyexponential-25": k.get_sigmas_polyexponential(25, 0.1, 10.0, rho=2.0),
    }


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_table_equals_k_diffusion_quadrature(k_sampling: Any, order: int) -> None:
    worst = 0.0
    for sigmas in schedules(k_sampling).values():
        grid = sigmas.double().numpy()
        table = abcore.multistep_table(grid, order)
        for i in range(len(grid) - 1):
            m = min(i + 1, order)
            theirs = np.array([k_sampling.linear_multistep_coeff(m, grid, i, j) for j in range(m)])
            worst = max(worst, float(np.max(np.abs(table[i, :m] - theirs)) / np.max(np.abs(theirs))))
    # QUADPACK's 21-point Gauss-Kronrod rule is exact on these polynomials: both are exact up to rounding.
    assert worst < 1e-12


class Denoiser(torch.nn.Module):
    """A small random MLP denoiser D(x, sigma) in k-diffusion's contract, with a conditioning argument."""

    def __init__(self, features: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, features)
        )
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        c_in = 1 / (sigma**2 + 1).sqrt()[:, None]
        out = self.net(torch.cat([x * c_in, sigma.log()[:, None] / 4], -1))
        return x / (sigma**2 + 1)[:, None] + out * (sigma / (sigma**2 + 1).sqrt())[:, None] + cond


@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["karras-10", "karras-50", "exponential-30"])
def test_sample_lms_equals_k_diffusion(k_sampling: Any, schedule: str, order: int) -> None:
    sigmas = schedules(k_sampling)[schedule]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    extra = {"cond": torch.full((8, 6), 0.1)}
    results, calls, seen = [], [], []
    for sampler in (k_sampling.sample_lms, sample_lms):
        model, events = Denoiser(), []
        out = sampler(model, x, sigmas, extra, lambda e, events=events: events.append(e), True, order)
        results.append(out)
        calls.append(model.calls)
        seen.append(events)
    theirs, ours = results
    assert calls == [len(sigmas) - 1] * 2
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * float(theirs.abs().max()))
    for a, b in zip(*seen, strict=True):
        assert a.keys() == b.keys() and a["i"] == b["i"] and a["sigma"] == b["sigma"]
        torch.testing.assert_close(a["x"], b["x"], rtol=2e-5, atol=2e-5 * float(theirs.abs().max()))
    # The tolerance tells the orders apart: one order lower moves the result far more.
    if order > 1:
        lower = sample_lms(Denoiser(), x, sigmas, extra, order=order - 1)
        assert float((lower - theirs).abs().max()) > 100 * 2e-5 * float(theirs.abs().max())


def test_table_is_abcores_on_any_dtype_and_differentiable() -> None:
    grid = torch.linspace(1, 0, 21, dtype=torch.float64) ** 2 * 14.0 + 0.03
    reference = abcore.multistep_table(grid.numpy(), 4)
    np.testing.assert_allclose(multistep_table(grid, 4).numpy(), reference, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(multistep_table(grid.float(), 4).numpy(), reference, rtol=2e-4, atol=1e-6)
    assert multistep_table(grid.float(), 4).dtype == torch.float32
    # d/dgrid of sum_j W[i, j] (the step t_{i+1} - t_i) is exact, and the full Jacobian passes gradcheck.
    leaf = grid.clone().requires_grad_(True)
    multistep_table(leaf, 3).sum().backward()
    expected = torch.zeros_like(grid)
    expected[0], expected[-1] = -1.0, 1.0
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda g: multistep_table(g, 3), (grid[:8].clone().requires_grad_(True),))


@pytest.mark.parametrize(
    ("grid", "order", "name"),
    [
        (torch.tensor([1, 0]), 2, "grid"),
        (torch.zeros(2, 3), 2, "grid"),
        (torch.tensor([1.0]), 2, "grid"),
        ([1.0, 0.0], 2, "grid"),
        (torch.tensor([1.0, 0.0]), 0, "order"),
    ],
)
def test_table_refuses_bad_input(grid: Any, order: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        multistep_table(grid, order)


@pytest.mark.parametrize(("sigmas", "order", "name"), [([1.0, 2.0, 0.5], 2, "sigmas"), ([1.0, 0.0], 0, "order")])
def test_sample_lms_refuses_bad_input(sigmas: list[float], order: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_lms(lambda x, s: x, torch.zeros(1, 2), torch.tensor(sigmas), order=order)


@pytest.mark.parametrize(
    "sigmas",
    [[0.0, 0.25, 0.5, 1.0], [0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]],
    ids=["increasing-from-0", "through-0", "negative"],
)
def test_sample_lms_refuses_a_model_call_at_sigma_zero_or_below(sigmas: list[float]) -> None:
    """Issue 17 item 9: increasing sigmas from 0 returned NaN (d = (x - D) / sigma at sigma = 0); now an error
    naming `sigmas`, before any model call. Only the last sigma, where the model is never called, may be 0."""
    calls = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(sigma)
        return 0.5 * x

    with pytest.raises(ValueError, match=r"sigmas: .* every sigma but the last must be > 0"):
        sample_lms(model, torch.ones(1, 2), torch.tensor(sigmas))
    assert calls == []
    out = sample_lms(model, torch.ones(1, 2), torch.tensor([1.0, 0.5, 0.0]), order=2)  # ends at 0: fine
    assert len(calls) == 2 and bool(torch.isfinite(out).all())
    increasing = sample_lms(model, torch.ones(1, 2), torch.tensor([0.25, 0.5, 1.0]), order=2)  # > 0: fine
    assert bool(torch.isfinite(increasing).all())
