"""The README's Flax example runs as written and makes the model calls it promises."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "packages" / "abcache-jax" / "README.md"


def test_readme_flax_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.x.shape == (8, 16)
    assert int(out.computed.sum()) == 15 == namespace["config"].num_computed(50)
