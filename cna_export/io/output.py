"""Safe output locations: checks before writing, and outputs that appear complete or not at all.

Every output is written into a hidden temporary sibling, `.NAME.cna-tmp-HOST-PID-RANDOM`, and renamed into
place at the very end. A run killed at any point (even by SIGKILL) therefore leaves either the previous state
or the complete new output at `NAME`, never a half-written one; what it may leave is its clearly temporary
sibling. The next run writing the same `NAME` removes such siblings when the process that made them, on this
machine, is gone. Replacing an existing output (`--overwrite`) swaps the two atomically where Linux allows it
(`renameat2(RENAME_EXCHANGE)`), so `NAME` always holds one complete version.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from cna_export.errors import OutputError

log = logging.getLogger(__name__)

TMP_TAG = "cna-tmp"
# Errors that mean "this location cannot take the output", as opposed to a bad input.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def check_output_path(out: Path, source: Path | None, overwrite: bool, marker: str | None = None) -> None:
    """Refuse output locations that would clobber the source or existing work.

    Args:
        out: the file or folder to write.
        source: the model file or folder that must stay untouched (None for outputs unrelated to a model).
        overwrite: whether an existing `out` may be replaced.
        marker: for folder outputs, a file that marks a previous output of the same kind (an export's
            `circuit.json`). With it, `--overwrite` replaces only empty folders or folders holding the marker,
            so a mistyped `--out ~/work --overwrite` cannot delete a folder of unrelated files.

    Raises:
        OutputError: naming the problem and the fix.
    """
    out = Path(out)
    out_r = out.resolve()
    if source is not None:
        src_r = Path(source).resolve()
        src_dir = src_r if src_r.is_dir() else src_r.parent
        if out_r == src_r or src_r.is_relative_to(out_r) or (src_r.is_dir() and out_r.is_relative_to(src_dir)):
            raise OutputError(
                f"Output {out} overlaps the source model {source}.",
                "write the export to a separate folder; the source is never modified.",
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(
                f"Output {out} already exists.", "pass --overwrite to replace it, or choose another path."
            )
        _check_replaceable(out, marker)
    parent = out_r.parent
    if not parent.exists():
        raise OutputError(f"Output folder {parent} does not exist.", "create it first or choose another path.")
    if not parent.is_dir():
        raise OutputError(f"Output folder {parent} is a file, not a folder.", "choose another path.")
    # os.access also reports a read-only file system (EROFS), which permission bits do not show for root.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Output folder {parent} is not writable.", "choose a writable location.")


def _check_replaceable(out: Path, marker: str | None) -> None:
    if marker is None or out.is_symlink() or not out.exists():
        return  # a symlink is replaced itself; what it points to is left alone
    if out.is_dir() and ((out / marker).is_file() or not any(out.iterdir())):
        return
    kind = "folder" if out.is_dir() else "file"
    raise OutputError(
        f"Output {out} is an existing {kind} that was not written by cna-export (it has no {marker}), "
        "so --overwrite will not replace it.",
        "choose another path, or delete it yourself if it is really to be replaced.",
    )


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the file system of `folder` has less than `needed` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < needed:
        raise OutputError(
            f"Not enough free space in {folder}: the output needs {_size(needed)} and {_size(free)} are free.",
            "free some space or choose an --out location on another disk.",
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _owner() -> str:
    """HOST-PID of this process, as embedded in temporary names (host reduced to letters and digits)."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}"


def temp_sibling(out: Path, kind: str = "") -> Path:
    """A hidden temporary path next to `out` that names its owner: `.NAME.cna-tmp-HOST-PID-RANDOM[-kind]`."""
    out = Path(out).absolute()
    suffix = f"-{kind}" if kind else ""
    return out.parent / f".{out.name}.{TMP_TAG}-{_owner()}-{uuid.uuid4().hex[:8]}{suffix}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove temporaries of `out` left behind by runs that were killed (their process on this host is gone).

    Temporaries of other hosts (shared file systems) and of live processes are never touched.

    Returns:
        The paths removed.
    """
    out = Path(out).absolute()
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{TMP_TAG}-([A-Za-z0-9]+)-(\d+)-[0-9a-f]{{8}}(-[a-z]+)?$")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.match(path.name)
        if m and m[1] == host and not _alive(int(m[2])):
            log.info("removing %s, left by an interrupted run", path)
            _remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False, is_dir: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success move it to `out`, on any failure remove it.

    A crash at any point leaves either the old state or the complete new output, never a half-written
    `out`. Stale temporaries of earlier killed runs for the same `out` are removed first. Running out of space
    or writing to a read-only file system becomes an `OutputError` naming `out`.

    Example:
        >>> with staged_output(Path("edited"), overwrite=True, marker="circuit.json") as tmp:
        ...     write_everything_into(tmp)
    """
    out = Path(out).absolute()
    remove_stale_temps(out)
    tmp = temp_sibling(out)
    try:
        if is_dir:
            tmp.mkdir()
        yield tmp
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise OutputError(f"Output {out} already exists.", "pass --overwrite to replace it.")
            _check_replaceable(out, marker)
            if _exchange(tmp, out):
                _remove(tmp)  # now holds the previous output
            else:
                old = temp_sibling(out, "old")
                os.replace(out, old)
                os.replace(tmp, out)
                _remove(old)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in _SPACE_ERRNOS:
            raise OutputError(
                f"No space left on the device while writing {out} ({exc.strerror}); the partial output was removed.",
                "free some space or choose an --out location on another disk.",
            ) from exc
        if exc.errno == errno.EROFS:
            raise OutputError(
                f"Cannot write {out}: the file system is read-only.", "choose a writable location."
            ) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # file system or kernel without RENAME_EXCHANGE: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a small text file atomically (a temporary sibling renamed over `path`), replacing any old one."""
    with staged_output(Path(path), overwrite=True, is_dir=False) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
