"""The README's sampler-author example runs as written and integrates the probability-flow ODE."""

import math
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "packages" / "abcore" / "README.md"


def test_readme_multistep_example_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "multistep_table" in b)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    # For Gaussian data the ODE's solution is x(sigma) = x(sigma_0) sqrt((1 + sigma^2) / (1 + sigma_0^2)).
    x0 = 14.6 * np.random.default_rng(0).standard_normal(4)
    np.testing.assert_allclose(
        namespace["x"], x0 / math.sqrt(1 + 14.6**2), rtol=1e-3
    )  # order 4: 3.9e-4; order 2 would give 4.5e-3
