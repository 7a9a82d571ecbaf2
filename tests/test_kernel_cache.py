"""The compiled-kernel cache (fxghost.backends._build): private, verified before loading, rebuilt
when damaged, built once by processes starting together.

Each scenario builds a tiny library of its own (a function returning 42, and a constructor that
appends to a marker file, so that a planted library that gets loaded leaves a trace) in a
subprocess: a damaged library that gets loaded can crash the process (SIGBUS), which must show as
a failed test, and each process says its one-time lines afresh. The subprocess loads the module
from its file, without importing torch, so that a scenario takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

BUILD_MODULE = Path(__file__).resolve().parents[1] / "fxghost" / "backends" / "_build.py"
OTHER_UID = 65534  # nobody

LIBRARY = """\
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void loaded(void) {
    const char *marker = getenv("FXGHOST_TEST_MARKER");
    FILE *f = marker ? fopen(marker, "a") : NULL;
    if (f) {
        fputs("WHO\\n", f);
        fclose(f);
    }
}

int answer(void) { return ANSWER; }
"""

# Builds the library as fxghost's CPU backend builds its kernels (build, then verified right
# before loading) and prints its path and answer; TEST_CALLS builds that many times.
DRIVER = textwrap.dedent(
    """\
    import ctypes, importlib.util, os, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fxghost_build", sys.argv[1])
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for _ in range(int(os.environ.get("TEST_CALLS", "1"))):
        path = build.build(
            "answer",
            [Path(sys.argv[2])],
            ("CC", ("cc", "gcc", "clang")),
            [["-O0"]],
            what="the answer",
            fallback="nothing",
        )
    if path is not None and build.verified(path):
        print(path)
        print(ctypes.CDLL(str(path)).answer())
    """
)


def _compiler() -> str | None:
    return os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )


pytestmark = pytest.mark.skipif(_compiler() is None, reason="no C compiler here")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another user (chown) needs root"
)


def _source(tmp: Path, who: str = "genuine", answer: int = 42) -> Path:
    path = tmp / f"{who}.c"
    path.write_text(LIBRARY.replace("WHO", who).replace("ANSWER", str(answer)))
    return path


class Scenario:
    """A cache directory, a shared temporary directory (as /tmp: sticky, writable by all) and a
    marker file, for running the driver in fresh processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cache = tmp / "cache"
        self.shared_tmp = tmp / "tmp"
        self.shared_tmp.mkdir()
        os.chmod(self.shared_tmp, 0o1777)
        self.marker = tmp / "marker"
        self.source = _source(tmp)
        self.env = {
            **os.environ,
            "FXGHOST_CACHE_DIR": str(self.cache),
            "TMPDIR": str(self.shared_tmp),
            "FXGHOST_TEST_MARKER": str(self.marker),
        }

    def run(self, umask: int = 0o022, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", DRIVER, str(BUILD_MODULE), str(self.source)],
            env={**self.env, **env},
            umask=umask,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def built(self, **env: str) -> Path:
        """The library's path after a run that must load it."""
        done = self.run(**env)
        assert done.returncode == 0, done.stderr
        path, answer = done.stdout.split()
        assert answer == "42", done.stderr
        return Path(path)

    def plant(self, path: Path) -> None:
        """Put a library that answers 666 at ``path``, with a matching digest beside it: only
        its owner or its mode can tell it from the real one."""
        planted = _source(self.tmp, "planted", 666)
        compiled = self.tmp / "planted.so"
        cc = _compiler()
        assert cc is not None
        subprocess.run([cc, "-fPIC", "-shared", str(planted), "-o", str(compiled)], check=True)
        path.unlink(missing_ok=True)
        shutil.copyfile(compiled, path)
        os.chmod(path, 0o700)
        digest = path.with_suffix(".sha256")
        digest.unlink(missing_ok=True)
        digest.write_text(hashlib.sha256(compiled.read_bytes()).hexdigest() + "\n")

    def loaded(self) -> list[str]:
        """Which libraries ran their constructor, in order."""
        return self.marker.read_text().split() if self.marker.exists() else []


def _lines(stderr: str, containing: str = "") -> list[str]:
    return [
        line for line in stderr.splitlines() if line.startswith("fxghost:") and containing in line
    ]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _verifies(path: Path) -> bool:
    recorded = path.with_suffix(".sha256").read_text().strip()
    return recorded == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("umask", [0o002, 0o000, 0o077])
def test_cache_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    s = Scenario(tmp_path)
    path = s.built(umask=umask)
    assert path.parent == s.cache
    assert _mode(s.cache) == 0o700
    files = sorted(p.name for p in s.cache.iterdir())
    assert files == sorted([path.name, path.with_suffix(".sha256").name, f"{path.stem}.lock"])
    for name in files:
        assert _mode(s.cache / name) & 0o077 == 0, name
    assert _verifies(path)
    assert s.loaded() == ["genuine"]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("truncated", "contents differ"),
        ("altered", "contents differ"),
        ("empty", "empty"),
        ("digest missing", "digest file is missing"),
        ("digest altered", "contents differ"),
        ("library missing", "missing"),
    ],
)
def test_damaged_library_is_rebuilt(tmp_path: Path, damage: str, says: str) -> None:
    """A truncated library crashed every later process (SIGBUS); altered code could run."""
    s = Scenario(tmp_path)
    path = s.built()
    good = path.read_bytes()
    digest = path.with_suffix(".sha256")
    if damage == "truncated":
        os.truncate(path, len(good) // 2)
    elif damage == "altered":
        middle = len(good) // 2
        flipped = bytes(b ^ 0xFF for b in good[middle : middle + 64])
        path.write_bytes(good[:middle] + flipped + good[middle + 64 :])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "digest missing":
        digest.unlink()
    elif damage == "digest altered":
        digest.write_text("0" * 64 + "\n")
    else:
        path.unlink()
    done = s.run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(path), "42"]
    (line,) = _lines(done.stderr, "not loading")
    assert str(path) in line and says in line and "rebuilding" in line
    assert _lines(done.stderr, ": compiling the answer")
    assert _verifies(path) and path.read_bytes() == good
    again = s.run()
    assert again.stdout.split() == [str(path), "42"] and again.stderr == ""


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        pytest.param("other owner", f"owned by uid {OTHER_UID}", marks=needs_root),
        ("world-writable", "writable by others"),
        ("group-writable", "writable by group"),
    ],
)
def test_planted_library_is_not_loaded(tmp_path: Path, plant: str, says: str) -> None:
    s = Scenario(tmp_path)
    path = s.built()
    s.plant(path)
    if plant == "other owner":
        os.chown(path, OTHER_UID, OTHER_UID)
        os.chown(path.with_suffix(".sha256"), OTHER_UID, OTHER_UID)
    else:
        os.chmod(path, 0o702 if plant == "world-writable" else 0o720)
    done = s.run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(path), "42"]
    assert "planted" not in s.loaded()
    (line,) = _lines(done.stderr, "not loading")
    assert str(path) in line and says in line
    st = os.lstat(path)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700 and _verifies(path)


def test_group_writable_cache_directory_is_not_used(tmp_path: Path) -> None:
    """A library in a directory that others can write is not loaded, even a genuine-looking one
    of the user's: the build goes to $TMPDIR/fxghost-<uid>, private."""
    s = Scenario(tmp_path)
    path = s.built()
    s.plant(path)
    os.chmod(s.cache, 0o770)
    done = s.run()
    assert done.returncode == 0, done.stderr
    built, answer = done.stdout.split()
    private = s.shared_tmp / f"fxghost-{os.geteuid()}"
    assert answer == "42" and Path(built).parent == private
    assert "planted" not in s.loaded()
    assert _mode(private) == 0o700
    (line,) = _lines(done.stderr, "not using")
    assert str(s.cache) in line and "writable by group" in line and str(private) in line
    # The next process reuses that build, and says the same once.
    again = s.run()
    assert again.stdout.split() == [built, "42"]
    assert len(_lines(again.stderr, "not using")) == 1 and not _lines(again.stderr, ": compiling")


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_fallback_in_shared_tmp_is_private_per_user(tmp_path: Path, umask: int) -> None:
    s = Scenario(tmp_path)
    (tmp_path / "a file").write_text("")
    done = s.run(umask=umask, FXGHOST_CACHE_DIR=str(tmp_path / "a file" / "cache"))
    assert done.returncode == 0, done.stderr
    built, answer = done.stdout.split()
    private = s.shared_tmp / f"fxghost-{os.geteuid()}"
    assert answer == "42" and Path(built).parent == private
    assert _mode(private) == 0o700 and os.lstat(private).st_uid == os.geteuid()
    assert all(_mode(p) & 0o077 == 0 for p in private.iterdir())
    (line,) = _lines(done.stderr, "not using")
    assert "cannot create it" in line


def _someone_elses(private: Path) -> None:
    private.mkdir(mode=0o700)
    os.chown(private, OTHER_UID, OTHER_UID)


def _symlink_to_mine(private: Path) -> None:
    target = private.with_name("elsewhere")
    target.mkdir(mode=0o700)
    private.symlink_to(target)


def _too_open(private: Path) -> None:
    private.mkdir()
    os.chmod(private, 0o755)


@pytest.mark.parametrize(
    ("prepare", "says"),
    [
        pytest.param(_someone_elses, f"owned by uid {OTHER_UID}", marks=needs_root),
        (_symlink_to_mine, "not a directory"),
        (_too_open, "mode 755"),
    ],
)
def test_fallback_refuses_a_tmp_directory_it_did_not_make_private(
    tmp_path: Path, prepare: Callable[[Path], None], says: str
) -> None:
    """$TMPDIR/fxghost-<uid> is a name anyone can take first: a library planted there (at the
    right name, with a matching digest) is not loaded; a private new directory is used."""
    s = Scenario(tmp_path)
    name = s.built().name  # the name the library will have wherever it is built
    private = s.shared_tmp / f"fxghost-{os.geteuid()}"
    prepare(private)
    s.plant(private / name)
    if prepare is _someone_elses:
        for p in private.iterdir():
            os.chown(p, OTHER_UID, OTHER_UID)
    unusable = tmp_path / "a file"
    unusable.write_text("")
    done = s.run(FXGHOST_CACHE_DIR=str(unusable / "cache"))
    assert done.returncode == 0, done.stderr
    built, answer = done.stdout.split()
    assert answer == "42" and "planted" not in s.loaded()
    scratch = Path(built).parent
    assert scratch.parent == s.shared_tmp and scratch.name.startswith(f"fxghost-{os.geteuid()}-")
    assert _mode(scratch) == 0o700 and os.lstat(scratch).st_uid == os.geteuid()
    (line,) = _lines(done.stderr, "not using")
    assert str(private) in line and says in line and str(scratch) in line


def test_concurrent_first_use_compiles_once(tmp_path: Path) -> None:
    """Processes starting together on an empty cache (torchrun ranks): one compiles, the others
    wait for it and load its library."""
    s = Scenario(tmp_path)
    count = tmp_path / "compiler runs"
    wrapper = tmp_path / "cc"
    cc = _compiler()
    assert cc is not None
    # The sleep keeps the first compile running until every process has asked for it.
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" --version "*) ;; *) echo run >> "{count}"; sleep 1;; esac\n'
        f'exec {shutil.which(cc)} "$@"\n'
    )
    os.chmod(wrapper, 0o755)
    env = {**s.env, "CC": str(wrapper)}
    command = [sys.executable, "-c", DRIVER, str(BUILD_MODULE), str(s.source)]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), results
    assert len({out for out, _ in results}) == 1
    assert all(out.split()[1] == "42" for out, _ in results)
    assert count.read_text().split() == ["run"]
    compiling = [line for _, err in results for line in _lines(err, ": compiling the answer")]
    assert len(compiling) == 1


@pytest.mark.parametrize("compiler", ["missing", "not executable"])
def test_compiler_that_cannot_run_says_so_once(tmp_path: Path, compiler: str) -> None:
    s = Scenario(tmp_path)
    cc = tmp_path / "cc"
    if compiler == "not executable":
        cc.write_text("#!/bin/sh\n")
        os.chmod(cc, 0o644)
    done = s.run(CC=str(cc), TEST_CALLS="2")
    assert done.returncode == 0 and done.stdout == ""
    (line,) = _lines(done.stderr)
    assert f"cannot run the compiler CC={cc}" in line and "using nothing" in line
    assert not s.cache.exists() or not list(s.cache.iterdir())


def test_cpu_backend_verifies_right_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU backend loads neither its kernels (ctypes) nor its C++ op (torch.ops) from a file
    that fails the checks, whatever gave it that path."""
    from fxghost.backends import _build, cpu

    monkeypatch.setenv("FXGHOST_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "marker"
    monkeypatch.setenv("FXGHOST_TEST_MARKER", str(marker))
    compiler = ("CC", ("cc", "gcc", "clang"))
    path = _build.build("answer", [_source(tmp_path)], compiler, [["-O0"]], what="a", fallback="b")
    assert path is not None
    os.chmod(path, 0o702)
    monkeypatch.setattr(cpu, "library_path", lambda: path)
    monkeypatch.setattr(cpu, "op_library_path", lambda: path)
    cpu.c_kernels.cache_clear()
    cpu.cpp_ops.cache_clear()
    try:
        assert cpu.c_kernels() is None and cpu.cpp_ops() is None
    finally:
        cpu.c_kernels.cache_clear()
        cpu.cpp_ops.cache_clear()
    assert not marker.exists()


def test_cpu_kernels_truncated_in_the_cache_are_rebuilt(tmp_path: Path) -> None:
    """The real kernels, through the CPU backend: a truncated library crashed every later
    process with SIGBUS."""
    code = "from fxghost.backends import cpu; print(cpu.library_path(), cpu.available())"
    env = {**os.environ, "FXGHOST_CACHE_DIR": str(tmp_path)}

    def run() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", code]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    path, available = first.stdout.split()
    if available != "True":
        pytest.skip(f"the CPU kernels do not build here: {first.stderr}")
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [path, "True"]
    (line,) = _lines(second.stderr, "not loading")
    assert "the CPU kernels" in line and path in line and "rebuilding" in line
    assert os.path.getsize(path) == size and _verifies(Path(path))
