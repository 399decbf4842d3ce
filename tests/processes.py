"""Two local processes for the multi-process tests of every package: 127.0.0.1, a free port, a timeout, and the
processes this test started ended by their pid on failure. Loaded by path (`load`), not imported as a package."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# torch.distributed's collectives that a cache could call (the models' own all-to-alls are functional collectives)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "barrier", "all_to_all")


def load(path: Path) -> ModuleType:
    """The Python file `path` as a module (a test's worker, or this file)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(worker: Path, args: list[list[str]], logs: Path, env: dict[str, str], timeout: float) -> None:
    """Run `python worker *args[i]` for i = 0, 1 side by side (the same port is in `args`), each logging to
    ``logs / f"rank{i}.log"``; fail when either does not finish within `timeout` seconds or exits non-zero."""
    procs, files = [], []
    try:
        for i, rank_args in enumerate(args):
            log = open(logs / f"rank{i}.log", "wb")  # noqa: SIM115 (closed below)
            files.append(log)
            command = [sys.executable, str(worker), *rank_args]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish within {timeout} s (a collective one never joined?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # by pid: only the processes this test started
                proc.wait()
        for log in files:
            log.close()
    for i, proc in enumerate(procs):
        output = (logs / f"rank{i}.log").read_text(errors="replace")[-3000:]
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{output}"


class Collectives:
    """Counts the calls of torch.distributed's collectives while active (the cache looks them up at call time)."""

    def __init__(self) -> None:
        self.count = 0
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> Collectives:
        import torch.distributed as dist

        for name in COLLECTIVES:
            original = self.saved[name] = getattr(dist, name)

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for name, original in self.saved.items():
            setattr(dist, name, original)
