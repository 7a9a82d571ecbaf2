"""The command line, run for real in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fxghost", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_runs_and_reports_equivalence() -> None:
    result = _run("demo", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20 layer(s) rewritten with ghost_batch_size=32" in out
    assert "layer1_0_bn1_ghost_view" in out and "fxghost.ops.ghost_norm" in out
    assert "equivalent to the chunked reference" in out
    assert "MISMATCH" not in out


def test_inspect_torchvision_and_callable() -> None:
    result = _run("inspect", "mobilenet_v3_small", "-g", "16", "--only", "features.1.*")
    assert result.returncode == 0, result.stderr
    assert "features.1.block.0.1" in result.stdout and "not selected" in result.stdout
    result = _run("inspect", "torch.nn:BatchNorm1d", "--code")
    assert result.returncode == 1 or result.returncode == 2  # BatchNorm1d() needs num_features
    assert "Traceback" not in result.stderr


def test_bad_arguments_give_one_line_and_exit_2() -> None:
    for args in (["inspect", "nosuch_model"], ["inspect", "resnet18", "-g", "zero"],
                 ["frobnicate"], ["inspect", "resnet18", "--only", "nope"]):
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_explains_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for word in ("demo", "inspect", "bench", "ghost batch"):
        assert word in result.stdout
