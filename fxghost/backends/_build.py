"""Compiling and caching the CPU backend's shared objects, in a private, verified cache.

Loading a shared object runs its code (constructors first) in the loading process, so a cached
library is trusted only as far as its file: the cache directory and every file in it are created
private to the user whatever the umask, and a library is loaded only from a directory and file
owned by the user (or root) that no one else can write, whose contents match the SHA-256 digest
recorded beside it when it was built. Anything else is rebuilt (a damaged file: a truncated
library raised SIGBUS in every later process) or, for a directory that others can write, built
in a private one instead, with one line on stderr.

A build runs under a file lock in the cache directory: processes starting together on an empty
cache (torchrun ranks, a job array) wait for the first one's build instead of each compiling
their own copy.

This module uses only the standard library and imports nothing from fxghost, so that tests can
load it on its own.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["build", "cache_dir", "say", "say_once", "verified"]

_DIGEST_SUFFIX = ".sha256"


def say(message: str) -> None:
    """One line on stderr, prefixed ``fxghost:``."""
    # stderr, not logging: a first training step that compiles for half a minute must not look
    # like a hang, whatever the logging configuration.
    print(f"fxghost: {message}", file=sys.stderr, flush=True)


@functools.cache
def say_once(message: str) -> None:
    """:func:`say`, once per process for each message."""
    say(message)


def cache_dir() -> Path:
    """The configured cache directory: ``$FXGHOST_CACHE_DIR``, else ``fxghost`` in the user's
    cache directory. :func:`build` uses it only when it passes the checks."""
    explicit = os.environ.get("FXGHOST_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxghost"


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU (a shared home directory on a cluster).
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _untrusted(st: os.stat_result, *, private: bool = False) -> str | None:
    """Why a file or directory with this status cannot be trusted, or ``None``. Root's files are
    trusted too: root can replace anything anyway, and an administrator may prepare a cache."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}"
    if private and st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o}, not 700"
    if st.st_mode & 0o022:
        who = {0o020: "group", 0o002: "others"}.get(st.st_mode & 0o022, "group and others")
        return f"writable by {who}"
    return None


def _directory_problem(path: Path, *, private: bool = False) -> str | None:
    """Why ``path`` cannot hold the cache, creating it (mode 700) where missing, or ``None``.

    ``private`` is for a directory in a shared one such as ``/tmp``: it must be a directory
    itself (not a link that another user could have placed), of mode 700."""
    try:
        path.mkdir(mode=0o700, parents=not private)
        os.chmod(path, 0o700)  # the umask could have taken bits that the owner needs
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create it ({e.strerror or e})"
    try:
        st = os.lstat(path) if private else os.stat(path)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    return _untrusted(st, private=private)


def _file_digest(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _read_checked(path: Path) -> tuple[str | None, str]:
    """``(why the file cannot be trusted or None, its SHA-256)``; the status and the contents
    come from one open file, not from a name that could change in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return "missing", ""
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link", ""
        return f"unreadable ({e.strerror or e})", ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file", ""
        problem = _untrusted(st)
        if problem is not None:
            return problem, ""
        if st.st_size == 0:
            return "empty", ""
        return None, _file_digest(fd)
    finally:
        os.close(fd)


def _problem(path: Path) -> str | None:
    """Why the cached library ``path`` must not be loaded, or ``None``."""
    try:
        parent = _untrusted(os.stat(path.parent))
    except OSError as e:
        return f"its directory is unreadable ({e.strerror or e})"
    if parent is not None:
        return f"its directory is {parent}"
    problem, digest = _read_checked(path)
    if problem is not None:
        return problem
    record = path.with_suffix(_DIGEST_SUFFIX)
    problem, _ = _read_checked(record)
    if problem is not None:
        return f"its digest file is {problem}"
    try:
        recorded = record.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "its digest file is unreadable"
    if recorded != digest:
        return "its contents differ from the digest recorded when it was built"
    return None


def verified(path: Path) -> bool:
    """Whether the cached library ``path`` may be loaded now: owned by the user, writable by no
    one else, and as it was built. Call it right before loading; where it says no, a line on
    stderr says why."""
    problem = _problem(path)
    if problem is not None:
        say_once(f"not loading {path}: {problem}")
    return problem is None


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 600) atomically: a reader sees the old contents or the new ones."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _compile(cmd: list[str], out: Path) -> str | None:
    """Run ``cmd`` (a compile command ending in ``-o``) into ``out`` and record its digest;
    ``None`` on success, else the compiler's message."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        done = subprocess.run(
            [*cmd, str(tmp)], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        tmp.unlink(missing_ok=True)
        return str(e)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        return done.stderr or done.stdout
    os.chmod(tmp, 0o700)  # the compiler made it by the umask
    problem, digest = _read_checked(tmp)
    if problem is not None:  # a compiler that exits 0 without writing the object
        tmp.unlink(missing_ok=True)
        return f"the compiler's output is {problem}"
    os.replace(tmp, out)  # atomic: a process that does not wait for the lock sees old or new
    _write_private(out.with_suffix(_DIGEST_SUFFIX), f"{digest}\n".encode())
    return None


@contextmanager
def _locked(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created private); says ``waiting`` when
    another process holds it. Raises OSError when the lock file cannot be created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks (some network mounts): build without one
        yield
    finally:
        os.close(fd)  # releases the lock


@functools.cache
def _scratch_dir(base: str) -> Path:
    # New and private by construction (mkdtemp makes it mode 700 under a name no one can
    # predict); one per process, for every library it builds.
    return Path(tempfile.mkdtemp(prefix=f"fxghost-{os.geteuid()}-", dir=base))


def _directories() -> Iterator[Path]:
    """The private directories to try in turn: the configured cache, else
    ``$TMPDIR/fxghost-<uid>``, else a new private directory in ``$TMPDIR``. Each one passed
    over says why, once."""
    configured = cache_dir()
    problem = _directory_problem(configured)
    if problem is None:
        yield configured
        problem = "cannot build in it"
    tmp = tempfile.gettempdir()
    shared = Path(tmp) / f"fxghost-{os.geteuid()}"
    shared_problem = _directory_problem(shared, private=True)
    if shared_problem is None:
        say_once(f"not using the cache directory {configured} ({problem}); using {shared}")
        yield shared
        shared_problem = "cannot build in it"
    try:
        scratch = _scratch_dir(tmp)
    except OSError:
        return
    say_once(
        f"not using the cache directories {configured} ({problem}) and {shared} "
        f"({shared_problem}); building in {scratch}"
    )
    yield scratch


def _compiler(env: str, names: Sequence[str], what: str, fallback: str) -> tuple[str, str] | None:
    """``(compiler, its --version output)``, or ``None`` (said once) when there is none to run."""
    cc = os.environ.get(env)
    if not cc:
        cc = next((c for c in names if shutil.which(c)), None)
        if cc is None:
            say_once(f"no compiler for {what} ({' or '.join(names)}); using {fallback}")
            return None
    try:
        done = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        named = f"{env}={cc}" if os.environ.get(env) else cc
        say_once(f"cannot run the compiler {named} for {what} ({reason}); using {fallback}")
        return None
    return cc, done.stdout


def build(
    stem: str,
    sources: Sequence[Path],
    compiler: tuple[str, tuple[str, ...]],
    flag_sets: Sequence[Sequence[str]],
    link: Sequence[str] = (),
    key: Sequence[str] = (),
    *,
    what: str,
    fallback: str,
) -> Path | None:
    """A shared object compiled from ``sources[0]`` (which includes the others), cached under
    :func:`cache_dir` and verified just now (see :func:`verified`); ``None`` when it cannot be
    built.

    ``compiler`` is ``(environment variable, names to look for)``; each of ``flag_sets`` is tried
    in turn. The cache key covers the sources, the compiler, the flags, the machine and ``key``.
    A failed build leaves a ``.failed`` file with the compiler's messages, so that later processes
    do not try again (delete it to retry). A build says on stderr when it starts and ends; a
    failure says once (per cache) what runs instead (``fallback``).
    """
    env, names = compiler
    found = _compiler(env, names, what, fallback)
    if found is None:
        return None
    cc, version = found
    texts = [cc, version, platform.machine(), _cpu_signature(), *link, *key]
    texts += [" ".join(flags) for flags in flag_sets]
    parts = [p.read_bytes() for p in sources] + [t.encode() for t in texts]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    for directory in _directories():
        path = directory / f"{stem}_{digest}.so"
        failed = path.with_suffix(".failed")
        if _problem(path) is None:
            return path
        if failed.exists():
            return None
        waiting = f"waiting for another process compiling {what} into {directory} ..."
        try:
            with _locked(path.with_suffix(".lock"), waiting):
                # Checked again: the process that held the lock may have built it.
                problem = _problem(path)
                if problem is None:
                    return path
                if failed.exists():
                    return None
                if problem != "missing" or path.with_suffix(_DIGEST_SUFFIX).exists():
                    say(f"not loading {what} from {path}: {problem}; rebuilding it")
                return _build_locked(cc, path, sources[0], flag_sets, link, what, fallback)
        except OSError:
            continue  # cannot write here (a read-only cache): the next directory
    return None


def _build_locked(
    cc: str,
    path: Path,
    source: Path,
    flag_sets: Sequence[Sequence[str]],
    link: Sequence[str],
    what: str,
    fallback: str,
) -> Path | None:
    say(f"compiling {what} (once per machine and version) into {path.parent} ...")
    started = time.perf_counter()
    message = ""
    for flags in flag_sets:
        error = _compile([cc, *flags, "-fPIC", "-shared", str(source), *link, "-o"], path)
        if error is None:
            say(f"compiled {what} in {time.perf_counter() - started:.0f} s")
            return path
        message += f"$ {cc} {' '.join(flags)}\n{error}\n"
    failed = path.with_suffix(".failed")
    try:
        _write_private(failed, message.encode())
    except OSError:
        pass
    say(f"could not compile {what} (the compiler's messages: {failed}); using {fallback}")
    return None
