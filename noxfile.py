"""One noxfile for the monorepo: each package is tested as installed (non-editable).

nox -s tests          every package's tests (abcache-diffusers on diffusers 0.40, 0.41 and the newest; abcache-jax
                      with keras-hub in a session of its own), then the examples'
nox -s lint           ruff check + format check
nox -s typecheck      mypy over all packages
nox -s demo           the main job: `abcache demo` on the shipped zoo
nox -s bench          regenerate BENCHMARKS.md: the zoo (Pareto plots, image strips) and the LMS coefficient cost
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]

TORCH = "torch==2.13.0"  # the CPU build on this disk; an unpinned torch pulls a CUDA build
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100"]
KERAS_HUB = ["keras-hub==0.32.0", "keras==3.15.1"]  # the versions abcache_jax.keras_hub is tested with

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
def tests(session: nox.Session, package: str) -> None:
    installs, folder = PACKAGES[package]
    session.install(*installs[:1])  # torch first, pinned, so nothing pulls another build
    session.install(*installs[1:], *TEST_TOOLS)
    if package in WITHOUT_DEPENDENCIES:
        session.install("--no-deps", *WITHOUT_DEPENDENCIES[package])
    session.run("pytest", folder, *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install_all(session, "mypy>=1.10")
    packages = ("abcore", "abcache_torch", "abcache_jax", "abcache_diffusers", "abcache_examples")
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
    )


@nox.session
def demo(session: nox.Session) -> None:
    _install_all(session)
    session.run("abcache", "demo", *session.posargs, env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    _install_all(session, "scipy")  # diffusers' LMS quadrature, timed against the exact coefficients
    session.run("python", "benchmarks/lms_coefficients.py", env=ENV)
    session.run("python", "-m", "abcache_examples.bench", *session.posargs, env=ENV)
