"""The command line, run for real in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
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


#: The console script pip installs, which a user runs (``python -m fxghost`` differs from it:
#: Python itself puts the current folder on sys.path there).
SCRIPT = Path(sys.executable).with_name("fxghost")

MYMODELS = """\
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


NET = build()  # an instance, not a factory


def no_batchnorm():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


SIZE = 3
"""


def _user(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fxghost ARGS`` run from ``cwd`` as a user runs it, with models stored in ``cwd``."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . installs it"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TORCH_HOME=str(cwd / "torch_home"))
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    return tmp_path


def test_script_finds_models_in_the_current_folder(user_folder: Path) -> None:
    result = _user(user_folder, "inspect", "mymodels:build", "-g", "4")
    assert result.returncode == 0, result.stderr
    assert "1 layer(s) rewritten with ghost_batch_size=4" in result.stdout


def test_a_module_instance_is_used_as_it_is(user_folder: Path) -> None:
    result = _user(user_folder, "inspect", "mymodels:NET", "-g", "4")
    assert result.returncode == 0, result.stderr
    assert "1 layer(s) rewritten with ghost_batch_size=4" in result.stdout
    result = _user(user_folder, "inspect", "mymodels:SIZE")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "fxghost: error: 'mymodels:SIZE' is a value of type int, not a model: name an "
        "nn.Module, or a class or function that returns one when called without arguments"
    ]


def test_bench_without_batchnorm_says_so_and_times_nothing(user_folder: Path) -> None:
    result = _user(user_folder, "bench", "mymodels:no_batchnorm", "--shape", "8,3,8,8", "-g", "4")
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""  # no ratio, no table
    assert result.stderr.splitlines() == [
        "fxghost bench: nothing to ghost in mymodels:no_batchnorm: no BatchNorm layer found; "
        "nothing timed"
    ]


def test_bench_help_gives_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 timed; 1 the model does not trace; 2 bad arguments; 3 nothing" in out


def test_named_models_are_built_without_downloading(user_folder: Path) -> None:
    """A detection model's builder loads ImageNet backbone weights unless weights_backbone=None
    (offline: a URLError traceback); random weights also leave its backbone's BatchNorm layers
    plain instead of frozen, so they are rewritten."""
    result = _user(user_folder, "inspect", "fasterrcnn_mobilenet_v3_large_fpn", "-g", "4")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["backbone.body.0.1"][1:2] + rows["backbone.body.0.1"][-1:] == [
        "BatchNorm2d",
        "rewritten",
    ]
    downloaded = list((user_folder / "torch_home").rglob("*.pth"))
    assert not downloaded


def _downloads(weights: object = None) -> nn.Module:
    torch.hub.load_state_dict_from_url("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    raise AssertionError("unreachable: the download is refused")


def _unreachable(weights: object = None) -> nn.Module:
    raise urllib.error.URLError("[Errno -2] Name or service not known")


@pytest.mark.parametrize(
    ("builder", "said"),
    [
        (_downloads, "tried to download https://download.pytorch.org/models/resnet18-f37072fd"),
        (_unreachable, "tried to read or download a file and failed (<urlopen error"),
    ],
)
def test_a_builder_that_still_downloads_fails_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    builder: object,
    said: str,
) -> None:
    """Should a builder reach for the network despite weights=None: refused before it
    downloads anything, or (another route, offline) one line instead of a traceback."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy of the file
    monkeypatch.setattr(torchvision.models, "get_model_builder", lambda name: builder)
    code, out, err = _main(capsys, "inspect", "torchvision:resnet18")
    assert code == 2, out
    assert len(err.strip().splitlines()) == 1, err
    assert said in err, err
    assert "never downloads: build it in a package.module:callable of your own" in err
    assert not list(tmp_path.rglob("*.pth"))
