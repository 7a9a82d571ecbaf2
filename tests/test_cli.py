"""The command line, run for real in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from fxghost._cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


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
    for args in (
        ["inspect", "nosuch_model"],
        ["inspect", "resnet18", "-g", "zero"],
        ["frobnicate"],
        ["inspect", "resnet18", "--only", "nope"],
    ):
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_explains_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for word in ("demo", "inspect", "bench", "ghost batch"):
        assert word in result.stdout


def small_net() -> nn.Module:
    """For ``inspect test_cli:small_net``: tests/ is on sys.path while pytest runs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_finds_timm_names() -> None:
    pytest.importorskip("timm")
    result = _run("inspect", "resnet18d", "-g", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "resnet18d: timm model"
    # timm's deep stem, which torchvision's resnets do not have.
    assert "conv1.1" in result.stdout and "rewritten with ghost_batch_size=8" in result.stdout


def test_name_in_both_sources_says_which_and_a_prefix_picks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("timm")
    code, out, err = _main(capsys, "inspect", "resnet18", "--code")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first == "resnet18: torchvision model (timm has one too: pass timm:resnet18)"
    assert "self.avgpool" in out and "global_pool" not in out
    code, out, err = _main(capsys, "inspect", "timm:resnet18", "--code")
    assert code == 0, err
    assert out.splitlines()[0] == "resnet18: timm model"
    assert "global_pool" in out and "self.avgpool" not in out
    code, out, err = _main(capsys, "inspect", "torchvision:resnet18")
    assert code == 0, err
    assert out.splitlines()[0] == "resnet18: torchvision model"


def test_inspect_module_attr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, "inspect", "test_cli:small_net", "-g", "4")
    assert code == 0, err
    # No source line: the callable is the source.
    assert out.splitlines()[0].split()[:2] == ["layer", "kind"], out
    assert "1 layer(s) rewritten with ghost_batch_size=4" in out


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        (
            "resnet18x",
            [
                "package.module:callable",
                "torchvision model names",
                "timm model names",
                "close matches: resnet18",
            ],
        ),
        ("timm:resnet18x", ["tried timm model names;", "close matches: resnet18"]),
        ("torchvision:resnet18d", ["tried torchvision model names;", "close matches: resnet18"]),
        ("zzqqxx", ["torchvision model names and timm model names"]),
    ],
)
def test_unknown_names_say_what_was_tried(
    capsys: pytest.CaptureFixture[str], spec: str, said: list[str]
) -> None:
    pytest.importorskip("timm")
    code, out, err = _main(capsys, "inspect", spec)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fxghost: error: unknown model {spec.partition(':')[2] or spec!r}")
    for text in said:
        assert text in err, err
    if spec == "zzqqxx":
        assert "close matches" not in err


def test_without_timm_the_error_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    code, _, err = _main(capsys, "inspect", "resnet18d")
    assert code == 2
    assert "tried package.module:callable (no ':' in it) and torchvision model names" in err
    assert "timm not installed (pip install timm)" in err
    code, _, err = _main(capsys, "inspect", "timm:resnet18d")
    assert code == 2
    assert "timm is not installed: pip install timm" in err


def test_build_reports_what_is_ready(capsys: pytest.CaptureFixture[str]) -> None:
    """``fxghost build`` prints where the compiled objects are and exits 0 when both are ready
    (the messages of a fresh build are checked in test_fast_paths: the cache tests)."""
    from fxghost.backends import cpu

    if not cpu.op_available():
        pytest.skip("no C/C++ compiler here")
    assert main(["build"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["CPU kernels", "C++ autograd op"]
    assert all(line.endswith(".so") for line in out)
