"""Writing results safely: checked before any work, written under a temporary name, renamed into place.

Every command that writes follows the same rules (the reliability contract of the README):

- :func:`check_output_dir` / :func:`check_output_file` run before any slow step and refuse an output
  that cannot be written, that is or contains an input, or that is the current directory;
- :func:`atomic_output_dir` / :func:`atomic_write_text` write under a recognisable temporary name
  (``.NAME.depthprune-tmp-PID-XXXX``) beside the target and rename it into place only when complete;
  ``--force`` replaces an old result only then. Temporaries left by a killed run are removed by the next
  run that writes the same target (:func:`remove_stale_temporaries`);
- :func:`output_lock` holds an exclusive lock per output, so a second run into the same folder is
  refused with a clear message instead of interleaving with the first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DepthpruneError

TEMP_MARK = ".depthprune-tmp-"
LOCK_SUFFIX = ".depthprune-lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_MARK}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove temporaries of ``target`` left by processes that no longer run (a kill); returns them.

    Temporaries of a live process (another run writing the same target right now) are left alone.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    prefix = f".{target.name}{TEMP_MARK}"
    removed = []
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].partition("-")[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_location(path: Path, what: str) -> None:
    """``path`` (not necessarily existing) can be created: its nearest existing ancestor is a writable directory."""
    ancestor = _first_existing(path.parent)
    if not ancestor.is_dir():
        raise DepthpruneError(f"{what} '{path}' lies inside '{ancestor}', which is a file: choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DepthpruneError(f"{what} '{path}' cannot be written: '{ancestor}' is not writable; choose another path")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], what: str = "output") -> None:
    """Refuse an output that is an input, lies inside one, or contains one (a rerun would destroy it)."""
    target = _resolved(out)
    for given in inputs:
        if given is None or not isinstance(given, (str, Path)):
            continue
        source = Path(given).expanduser()
        if not source.exists():
            continue  # a hub id or alias: nothing on disk to protect
        source = source.resolve()
        if _is_within(target, source) or _is_within(source, target):
            raise DepthpruneError(f"{what} '{out}' overlaps the input '{given}': write the result somewhere else")


def check_output_dir(out: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check that ``out`` can receive a result directory; call before any slow work. Writes nothing.

    Refuses: a file in the way, an unwritable location, an output overlapping an input, the current
    directory or one of its ancestors (``--force`` would replace it), and, without ``force``, a
    non-empty directory.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DepthpruneError(f"output '{out}' exists and is not a directory: choose another --out")
    if _is_within(Path.cwd().resolve(), _resolved(out)):
        raise DepthpruneError(f"output '{out}' is the current directory or contains it: choose a new folder for --out")
    check_not_input(out, inputs)
    _check_writable_location(out, "output")
    if out.is_dir():
        remove_stale_temporaries(out)
        if any(out.iterdir()) and not force:
            raise DepthpruneError(f"output directory '{out}' exists and is not empty: choose another --out or pass --force")
        if not os.access(out, os.W_OK | os.X_OK) or not os.access(out.parent, os.W_OK | os.X_OK):
            raise DepthpruneError(f"output directory '{out}' is not writable: choose another --out")
    return out


def check_output_file(path: str | Path, inputs: Iterable[str | Path | None] = (), what: str = "output file") -> Path:
    """Check that a result file can be written at ``path`` (replacing an old one); writes nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DepthpruneError(f"{what} '{path}' is a directory: give a file name")
    check_not_input(path, inputs, what)
    _check_writable_location(path, what)
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise DepthpruneError(f"{what} '{path}' cannot be replaced: its folder is not writable")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temporary_dir_beside(target: str | Path) -> Path:
    """A new, recognisable temporary directory beside ``target`` (removed by the next run if left behind)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete directory ``tmp`` to ``out``, replacing an old ``out`` only now.

    Where the kernel can, the two are swapped in one step, so at every instant ``out`` holds either
    the old or the new result; the old one then sits under the temporary name and is removed (by the
    next run, if a kill comes first). Elsewhere the old ``out`` is first moved aside.
    """
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = temporary_dir_beside(out)
        os.replace(out, old / "old")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` that becomes ``out`` only if the block succeeds.

    On any error (or Ctrl-C, or SIGTERM) the temporary directory is removed and ``out`` is left as it was.
    With ``force`` an existing ``out`` is replaced, but only once the new one is complete.
    """
    out = check_output_dir(out, force, inputs)
    tmp = temporary_dir_beside(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on output ``out`` for the block; refuse if another process holds it.

    The lock is a hidden file beside ``out`` locked with ``flock``: the kernel releases it when the
    process dies, so a killed run never leaves a stale lock, and the file is removed on exit.
    """
    import fcntl

    out = _resolved(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DepthpruneError(f"another depthprune run is writing '{out}' right now: wait for it to finish "
                                      "or choose another --out") from None
            raise
        # The holder before us may have removed the file after we opened it: then our lock is on a
        # file nobody else can see; take the lock again on the file that is there now.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()
