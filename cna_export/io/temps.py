"""Temporaries and renames: the hidden siblings outputs are staged in, and the renames that commit them.

A temporary is named `.NAME.cna-tmp-HOST-PID-RANDOM[-kind]`, so a later run can tell a killed run's leftovers
(its process on this host is gone) from a live one's, and nothing but a temporary is ever removed. Replacing an
existing output swaps the two atomically where Linux allows it (`renameat2(RENAME_EXCHANGE)`); a new output is
renamed with `RENAME_NOREPLACE`, so a concurrent run's output is never clobbered. `cna_export.io.output` builds the
output rule on these.
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
            remove_temp(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_folder(out: Path, kind: str) -> Iterator[Path]:
    """A working folder next to `out` for the length of the block, named like every temporary (so a killed run's
    is removed by the next one), and removed at the end."""
    path = temp_sibling(out, kind)
    path.mkdir()
    try:
        yield path
    finally:
        remove_temp(path)


def remove_temp(path: Path) -> None:
    """Remove a temporary of cna-export's (by its name); anything else is a bug and is left alone."""
    if f".{TMP_TAG}-" not in path.name:
        raise RuntimeError(f"refusing to remove {path}: not a cna-export temporary")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# Renames -------------------------------------------------------------------------------------------------------

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where the kernel, libc or file system does not support the flag."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap(tmp: Path, out: Path) -> None:
    """Exchange `tmp` and `out` (both exist): atomically where Linux allows it, else by three renames."""
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        return
    old = temp_sibling(out, "old")
    os.replace(out, old)
    os.replace(tmp, out)
    os.replace(old, tmp)


def rename_new(tmp: Path, out: Path) -> None:
    """Rename `tmp` to the path `out`, which must not exist (a concurrent run's output is never clobbered)."""
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputError(
            f"Output {out} appeared while this command ran.", "pass --overwrite to replace it, or choose another path."
        ) from None
    os.rename(tmp, out)
