"""The command line. Its logic runs in this process through ``main``; each way of starting it,
``python -m fxghost`` and the ``fxghost`` script that pip installs, runs once for real in a
subprocess (each pays for importing torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fxghost._cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``fxghost ARGS`` in this process: its exit status, stdout and stderr."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own exits: --help, and its one-line errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_fxghost_exits_with_the_status_of_main_and_one_line() -> None:
    """``python -m fxghost`` end to end: an error is one line on stderr, without a traceback,
    and the status main returns is the process's."""
    result = subprocess.run(
        [sys.executable, "-m", "fxghost", "inspect", "torch.nn:BatchNorm1d", "--code"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    # BatchNorm1d() needs num_features (the class named in the message varies with torch).
    assert lines[0].startswith("fxghost: error: ") and "num_features" in lines[0], lines
    assert result.stdout == ""


def test_demo_runs_and_reports_equivalence(capsys: pytest.CaptureFixture[str]) -> None:
    # The smallest batch with more than one ghost batch: the demo's check is exact algebra.
    code, out, err = _main(capsys, "demo", "-g", "2", "--batch-size", "4")
    assert code == 0, err
    assert "20 layer(s) rewritten with ghost_batch_size=2" in out
    assert "layer1_0_bn1_ghost_view" in out and "fxghost.ops.ghost_norm" in out
    assert "One training step, batch 4" in out
    assert "equivalent to the chunked reference" in out
    assert "MISMATCH" not in out and "NOT equivalent" not in out


def test_inspect_torchvision_and_callable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(
        capsys, "inspect", "mobilenet_v3_small", "-g", "16", "--only", "features.1.*"
    )
    assert code == 0, err
    assert "features.1.block.0.1" in out and "not selected" in out
    code, out, err = _main(capsys, "inspect", "torch.nn:BatchNorm1d", "--code")
    assert code == 2  # BatchNorm1d() needs num_features
    assert len(err.strip().splitlines()) == 1 and "num_features" in err, err
    assert out == ""


def test_bad_arguments_give_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["inspect", "nosuch_model"],
        ["inspect", "resnet18", "-g", "zero"],
        ["frobnicate"],
        ["inspect", "resnet18", "--only", "nope"],
    ):
        code, _, err = _main(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("fxghost"), err


def test_help_explains_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    for word in ("demo", "inspect", "bench", "ghost batch"):
        assert word in out


def small_net() -> nn.Module:
    """For ``inspect test_cli:small_net``: tests/ is on sys.path while pytest runs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_inspect_finds_timm_names(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    code, out, err = _main(capsys, "inspect", "resnet18d", "-g", "8")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "resnet18d: timm model"
    # timm's deep stem, which torchvision's resnets do not have.
    assert "conv1.1" in out and "rewritten with ghost_batch_size=8" in out


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


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    return tmp_path


def test_script_finds_models_in_the_current_folder(user_folder: Path) -> None:
    """The installed script end to end, run from a folder holding the user's models as a user
    runs it; its exit status is the one main returns."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . installs it"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TORCH_HOME=str(user_folder / "torch_home"))
    result = subprocess.run(
        [str(SCRIPT), "inspect", "mymodels:build", "-g", "4"],
        cwd=user_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "1 layer(s) rewritten with ghost_batch_size=4" in result.stdout


@pytest.fixture
def in_user_folder(user_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run from ``user_folder`` as the installed script does, with neither the current folder
    nor '' on sys.path (main puts the current folder there); sys.path and the imported
    ``mymodels`` are undone afterwards."""
    monkeypatch.chdir(user_folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user_folder))])
    yield user_folder
    sys.modules.pop("mymodels", None)


def test_a_module_instance_is_used_as_it_is(
    capsys: pytest.CaptureFixture[str], in_user_folder: Path
) -> None:
    code, out, err = _main(capsys, "inspect", "mymodels:NET", "-g", "4")
    assert code == 0, err
    assert "1 layer(s) rewritten with ghost_batch_size=4" in out
    code, out, err = _main(capsys, "inspect", "mymodels:SIZE")
    assert code == 2
    assert err.splitlines() == [
        "fxghost: error: 'mymodels:SIZE' is a value of type int, not a model: name an "
        "nn.Module, or a class or function that returns one when called without arguments"
    ]


def test_bench_without_batchnorm_says_so_and_times_nothing(
    capsys: pytest.CaptureFixture[str], in_user_folder: Path
) -> None:
    code, out, err = _main(
        capsys, "bench", "mymodels:no_batchnorm", "--shape", "8,3,8,8", "-g", "4"
    )
    assert code == 3, err
    assert out == ""  # no ratio, no table
    assert err.splitlines() == [
        "fxghost bench: nothing to ghost in mymodels:no_batchnorm: no BatchNorm layer found; "
        "nothing timed"
    ]


def test_bench_help_gives_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 timed; 1 the model does not trace; 2 bad arguments; 3 nothing" in out


def test_named_models_are_built_without_downloading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A detection model's builder loads ImageNet backbone weights unless weights_backbone=None
    (offline: a URLError traceback); random weights also leave its backbone's BatchNorm layers
    plain instead of frozen, so they are rewritten."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy of any weights
    code, out, err = _main(capsys, "inspect", "fasterrcnn_mobilenet_v3_large_fpn", "-g", "4")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line}
    assert rows["backbone.body.0.1"][1:2] + rows["backbone.body.0.1"][-1:] == [
        "BatchNorm2d",
        "rewritten",
    ]
    downloaded = list(tmp_path.rglob("*.pth"))
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
