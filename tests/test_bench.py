"""The benchmark suite (benchmarks/), run for real in --quick mode on CPU (no timing assertions),
and the user-facing ``fxghost bench``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxghost
from fxghost import _cli

ROOT = Path(__file__).resolve().parent.parent
# The suite is not part of the package: imported from the folder it lives in.
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402
import suite  # noqa: E402

# The suite's quick cases and `fxghost bench` here run small tensors in this process.
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path: Path) -> dict:
    assert path.is_file(), f"no JSON written at {path}"
    return json.loads(path.read_text())


def _by_key(results: list[dict]) -> dict[tuple[str, str, str, int], set[str]]:
    """Implementations present (without error) per (section, mode, case, g)."""
    groups: dict[tuple[str, str, str, int], set[str]] = {}
    for r in results:
        key = (r["section"], r["mode"], r["case"], r["ghost_batch_size"])
        groups.setdefault(key, set())
        if r["error"] is None:
            groups[key].add(r["impl"])
    return groups


def test_quick_eager_suite_writes_tables_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every quick case, eager only: in this process, as nothing is compiled (one timed step
    each, the fewest the suite takes)."""
    out = tmp_path / "quick.json"
    argv = "--quick --no-compile --device cpu --repeats 1 --warmup 0 --out".split()
    # An allocator setting, which moves CPU results a lot, is recorded with them.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "33554432")
    code = suite.main([*argv, str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    data = _load(out)
    assert data["meta"]["allocator_env"]["MALLOC_TRIM_THRESHOLD_"] == "33554432"

    groups = _by_key(data["results"])
    assert {k[0] for k in groups} == {"layer", "model"}
    assert {k[1] for k in groups} == {"eager"}
    for key, impls in groups.items():
        assert impls == {"plain", "chunked", "fxghost"}, key
    for r in data["results"]:
        assert r["median_ms"] is not None and r["median_ms"] > 0
        assert len(r["times_ms"]) >= 1
        # Page faults counted over the same timed steps (Linux CI has getrusage).
        assert len(r["page_faults"]) == len(r["times_ms"])
        assert all(isinstance(f, int) and f >= 0 for f in r["page_faults"])
        if r["impl"] == "plain":
            assert r["speed_vs_plain"] == pytest.approx(1.0)
        assert r["speed_vs_plain"] is not None and r["speed_vs_chunked"] is not None
        if r["section"] == "model":
            assert r["items_per_s"] is not None and r["items_per_s"] > 0
    assert data["meta"]["device"] == "cpu" and data["meta"]["compile"] is False
    assert data["meta"]["source_sha256"] == suite.source_digest()

    # One table per section on stdout, progress on stderr.
    assert stdout.count("median ms") == 2
    for name in ("plain", "chunked", "fxghost", "vs plain", "samples/s", "faults/step"):
        assert name in stdout
    assert "[1/" in stderr and "layer eager" in stderr


@pytest.mark.slow
def test_quick_compiled_layer_case(tmp_path: Path) -> None:
    """The quick compiled case, in a subprocess: the suite resets torch._dynamo and Inductor's
    caches, which must not leak into the other tests of this process. Compiled mode only (the
    eager test runs the eager cases), one timed step, and two ghost batches, whose chunked
    graph compiles faster than the case's own eight."""
    out = tmp_path / "compiled.json"
    args = "--quick --sections layer --modes compiled --repeats 1 --warmup 0 --ghost-sizes 128"
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", *args.split(), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [r for r in _load(out)["results"] if r["mode"] == "compiled"]
    assert {r["impl"] for r in compiled} == {"plain", "chunked", "fxghost"}
    for r in compiled:
        assert r["error"] is None
        assert r["first_call_s"] > 0 and r["graphs"] >= 1 and r["graph_breaks"] is not None
    assert "compiled" in result.stdout


def test_options_parse_and_reject() -> None:
    parser = suite.build_parser()
    argv = (
        "--sections model,layer --impls fxghost,plain --ghost-sizes 16,32 --repeats 3 --warmup 0 "
        "--block 2"
    )
    args = parser.parse_args(argv.split())
    assert args.sections == ["layer", "model"] and args.impls == ["plain", "fxghost"]
    assert args.ghost_sizes == [16, 32] and args.repeats == 3 and args.warmup == 0
    assert args.block == 2
    args = parser.parse_args("--modes compiled,eager --cases (16384,512) resnet50".split())
    assert args.modes == ["eager", "compiled"] and args.cases == ["(16384,512)", "resnet50"]
    assert args.backend == "auto" and parser.parse_args(["--backend", "torch"]).backend == "torch"
    bad_args = ("--sections layers", "--ghost-sizes 0", "--ghost-sizes a", "--repeats 0")
    for bad in (*bad_args, "--block 0", "--modes fast", "--cases", "--backend fast"):
        with pytest.raises(SystemExit):
            parser.parse_args(bad.split())


def test_modes_and_cases_select_jobs() -> None:
    timing = harness.Timing(0, 1)

    def jobs(modes: list[str], cases: list[str] | None) -> list[tuple[str, str, str, int]]:
        found = suite.jobs(["layer", "model"], modes, "cuda", False, None, timing, timing, cases)
        return [(j.section, j.mode, j.case, j.g) for j in found]

    every = jobs(["eager", "compiled"], None)
    assert {m for _, m, _, _ in every} == {"eager", "compiled"}
    assert {m for _, m, _, _ in jobs(["compiled"], None)} == {"compiled"}
    picked = jobs(["compiled"], ["(16384,512)", "resnet50"])
    assert picked == [
        ("layer", "compiled", "(16384,512) fp32", 128),
        ("layer", "compiled", "(16384,512) fp32", 256),
        ("model", "compiled", "resnet50 224px bf16 cl batch 256", 32),
    ]
    assert jobs(["eager"], ["no such case"]) == []


def test_a_cases_filter_that_matches_nothing_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--device", "cpu", "--cases", "(1,2,3)"])
    assert exit_.value.code == 2
    assert "no case matches --cases (1,2,3)" in capsys.readouterr().err


def test_rounds_run_blocks_of_steps_and_time_all_but_the_first_of_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    clock = [0.0]
    # A fake clock that each step advances: by 1 s when it follows a step of another
    # implementation (the steps that must stay untimed), by 1 ms otherwise.
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def make() -> tuple[object, dict]:
        def build(impl: str, compiled: bool):  # noqa: ANN202
            def step() -> None:
                clock[0] += 1e-3 if calls and calls[-1] == impl else 1.0
                calls.append(impl)

            return step

        return build, {}

    timing = harness.Timing(warmup=1, repeats=5, block=3)
    job = harness.Job("layer", "eager", "fake", 4, make, timing)
    results = harness.run_job(job, ["a", "b"], torch.device("cpu"), False, harness.CpuPeakMemory())
    for r in results:
        assert r.times_ms == pytest.approx([1.0] * 5)
        assert len(r.page_faults) == 5  # the timed steps' only
    # The first calls, then rounds of 3 steps of one implementation each.
    expected = ["a", "b"]
    for _ in range(1 + 3):  # warm-up, then ceil(5 / 2) timed rounds
        expected += ["a"] * 3 + ["b"] * 3
    assert calls[: len(expected)] == expected


def test_saved_activations_count_each_storage_once() -> None:
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)

    def step() -> None:
        # The first mul saves a and b, relu its output; the second mul saves views of that
        # output and of a, whose storages are already counted.
        (torch.relu(a * b)[:500] * a[:500]).sum().backward()

    assert harness.saved_activation_mib(step) * 2**20 == (1000 + 1000 + 1000) * 4
    assert a.grad is not None  # the step really ran its backward


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_each_implementation_follows_each_other_equally_often(n: int) -> None:
    """Over a cycle of rounds, each implementation's blocks come right after each other
    implementation's equally often (what one leaves behind slows the next one's steps); every
    round runs each implementation once."""
    impls = [f"impl{i}" for i in range(n)]
    orders = harness.round_orders(impls)
    assert all(sorted(order) == impls for order in orders)
    sequence = [impl for order in orders for impl in order]
    after: dict[str, list[str]] = {impl: [] for impl in impls}
    for prev, cur in zip(sequence[-1:] + sequence[:-1], sequence, strict=True):  # cyclic
        if prev != cur:
            after[cur].append(prev)
    for impl, previous in after.items():
        counts = {other: previous.count(other) for other in impls if other != impl}
        assert len(set(counts.values())) <= 1, (impl, counts)


def test_ratios_are_speeds_within_a_case() -> None:
    results = [
        harness.Result("layer", "eager", impl, "c", 32, median_ms=ms)
        for impl, ms in (("plain", 2.0), ("chunked", 4.0), ("fxghost", 1.0))
    ]
    results.append(harness.Result("layer", "eager", "fxghost", "other", 32, median_ms=1.0))
    harness.set_ratios(results)
    plain, chunked, fx, other = results
    assert fx.speed_vs_plain == 2.0 and fx.speed_vs_chunked == 4.0
    assert chunked.speed_vs_plain == 0.5 and plain.speed_vs_chunked == 2.0
    assert other.speed_vs_plain is None  # no plain in its case


def test_ghost_size_override_runs_each_case_once_per_size() -> None:
    """The CPU suite lists (128,64,16,16) once per ghost size; an override must not repeat it."""
    timing = harness.Timing(0, 1)
    jobs = suite.jobs(["layer"], ["eager"], "cpu", False, [16, 32], timing, timing)
    keys = [(j.mode, j.case, j.g) for j in jobs]
    assert len(keys) == len(set(keys))
    assert sorted(g for _, c, g in keys if c == "(128,64,16,16) fp32") == [16, 32]


@pytest.mark.skipif(harness.resource is None, reason="no getrusage on this platform")
def test_page_faults_count_memory_touched_for_the_first_time() -> None:
    size = 32 << 20  # far above glibc's mmap threshold: fresh pages from the OS
    before = harness.page_faults()
    buf = bytearray(size)
    buf[::4096] = b"\1" * (size // 4096)  # one write per page
    after = harness.page_faults()
    assert before is not None and after is not None
    # One fault per 4 KB page, or per 2 MB where transparent huge pages serve it.
    assert after - before >= size // (2 << 20)
    del buf


def test_gpu_check_runs_the_stages_asked_for(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh, with `echo` for Python: each stage runs its own commands, in the
    order given, and an unknown stage stops the script with status 2."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": "echo"}

    def stages(*names: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script), str(tmp_path), *names],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    proc = stages("compiled-model", "compiled-kernels", "compiled")
    assert proc.returncode == 0, proc.stderr
    ran = [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("== ")]
    assert ran == [
        "== bench-compiled-model",
        "== bench-compiled-model-kernels",
        "== bench-compiled-model",
        "== bench-compiled-model-kernels",
        "== bench-compiled-layer",
    ]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "benchmarks/run.py --device cuda --modes compiled" in log
    assert "--impls fxghost --backend triton" in log
    assert "--impls plain,fxghost --out" in log and "--sections layer" in log
    assert stages("probe", "no-such-stage").returncode == 2


def test_source_digest_names_the_code_that_ran(tmp_path: Path) -> None:
    """The JSON's source digest changes with any source file's content or name, and with
    nothing else."""
    package = Path(fxghost.__file__).resolve().parent
    assert suite.source_digest() == suite.source_digest(package)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "k.c").write_text("int f(void);\n")
    first = suite.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not source")
    assert suite.source_digest(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    changed = suite.source_digest(tmp_path)
    assert changed != first
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    assert suite.source_digest(tmp_path) not in (first, changed)


# --------------------------------------------------------------------------------------------
# The user-facing `fxghost bench MODEL`


def tiny_net() -> nn.Module:
    """For ``fxghost bench test_bench:tiny_net``: tests/ is on sys.path while pytest runs."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
        nn.BatchNorm1d(3),
    )


def test_user_bench_times_plain_fxghost_and_chunked(capsys: pytest.CaptureFixture[str]) -> None:
    argv = "bench test_bench:tiny_net --shape 12,3,8,8 -g 4 --repeats 1 --warmup 0 --chunked"
    code = _cli.main(argv.split())
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "input (12, 3, 8, 8), ghost batch size 4 (3 ghost batches), eager" in out
    assert "2 layer(s) rewritten with ghost_batch_size=4" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["plain"], ["fxghost"], ["chunked"])
    }
    assert set(rows) == {"plain", "fxghost", "chunked"}
    assert rows["plain"][3] == "1.00x" and rows["chunked"][4] == "1.00x"  # vs plain, vs chunked
    for row in rows.values():
        assert float(row[1]) > 0 and float(row[-1]) > 0  # median ms, first step s


def test_user_bench_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, said in (
        ("bench test_bench:tiny_net --shape 2,3,8,8 -g 4", "smaller than the ghost batch size"),
        ("bench test_bench:tiny_net --shape 8,12 -g 4 --channels-last", "needs a 4-D shape"),
        ("bench nosuch_model_name --shape 8,3,8,8 -g 4", "unknown model"),
        ("bench test_bench:tiny_net --shape 8", "expected a batch shape"),
    ):
        try:
            code = _cli.main(argv.split())
        except SystemExit as exc:  # argparse's own errors
            code = exc.code  # type: ignore[assignment]
        assert code == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, (argv, err)
