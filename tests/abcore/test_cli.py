"""`python -m abcore`, and that `import abcore` stays free of torch and jax."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from fractions import Fraction

import pytest
from abcore import __main__ as cli
from abcore import theory


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "abcore", *args], capture_output=True, text=True, timeout=300)


def test_verify_4_passes_and_prints_exact_weights() -> None:
    result = run_module("verify", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "23/12, -4/3, 5/12" in result.stdout
    assert "55/24, -59/24, 37/24, -3/8" in result.stdout
    assert result.stdout.count("holds") == 4
    assert "all checks pass" in result.stdout


@pytest.mark.parametrize("bad", ["0", "-2", "x", "2.5", str(cli.MAX_K + 1)])
def test_verify_rejects_bad_k(bad: str) -> None:
    result = run_module("verify", bad)
    assert result.returncode == 2
    assert "K must be an integer" in result.stderr


def test_verify_exits_non_zero_when_proposition_2_fails(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def tampered(k: int) -> theory.Proposition2Report:
        report = theory.verify_proposition_2(k)
        return dataclasses.replace(
            report, differences=(report.differences[0] + Fraction(1, 7), *report.differences[1:])
        )

    monkeypatch.setattr(cli, "verify_proposition_2", tampered)
    assert cli.main(["verify", "1"]) == 1
    assert "FAILS" in capsys.readouterr().out


def test_verify_exits_non_zero_when_an_order_is_off(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cli, "_measured_order", lambda kind, k: k - 0.5)
    assert cli.main(["verify", "2"]) == 1
    assert "SOME CHECKS FAIL" in capsys.readouterr().out


def test_weights_command(capsys) -> None:
    assert cli.main(["weights", "3", "2", "1", "--target", "4"]) == 0
    assert capsys.readouterr().out.split()[-3:] == ["3", "-3", "1"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["weights", "1", "1", "--target", "2"])
    assert exc.value.code == 2


def test_import_abcore_loads_neither_torch_nor_jax() -> None:
    code = "import abcore, abcore.__main__, sys; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None or importlib.util.find_spec("jax") is not None,
    reason="torch or jax is installed here; the nox abcore session installs neither",
)
def test_abcore_installs_without_torch_or_jax() -> None:
    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("jax") is None
    assert theory.verify_proposition_2(3)
