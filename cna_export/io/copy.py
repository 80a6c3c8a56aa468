"""The one kernel-copy helper: bytes move from file to file without passing through Python.

`os.copy_file_range` (a reflink on btrfs/xfs, an in-kernel copy elsewhere) is tried first, then `os.sendfile`,
then plain reads and writes; each falls back where the previous one stopped, so a copy that starts in the kernel
and hits a file-system boundary still finishes. All of them release the GIL, so a copy on a worker thread
(`BackgroundCopy`) overlaps with validation and computation on two cores.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 64 << 20
# errnos meaning "this in-kernel copy does not work between these files" (another file system, old kernel).
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def copy_range(
    fin: int,
    fout: int,
    offset: int,
    length: int,
    at: int,
    *,
    chunk: int = CHUNK,
    stop: threading.Event | None = None,
    name: str = "the source",
) -> None:
    """Copy bytes [offset, offset + length) of file descriptor `fin` to position `at` of `fout`.

    Raises:
        OSError: EIO when `fin` ends early; any error other than "this method is unavailable here".
    """

    def by_range(n: int, src: int, dst: int) -> int:
        return os.copy_file_range(fin, fout, n, src, dst)

    def by_sendfile(n: int, src: int, dst: int) -> int:
        os.lseek(fout, dst, os.SEEK_SET)  # sendfile writes at the output's file position
        return os.sendfile(fout, fin, src, n)

    def by_read(n: int, src: int, dst: int) -> int:
        return os.pwrite(fout, os.pread(fin, min(n, 16 << 20), src), dst)

    methods = [by_range, by_sendfile, by_read] if hasattr(os, "copy_file_range") else [by_sendfile, by_read]
    done = 0
    while done < length and not (stop is not None and stop.is_set()):
        try:
            got = methods[0](min(chunk, length - done), offset + done, at + done)
        except OSError as exc:
            if len(methods) > 1 and exc.errno in _NO_KERNEL_COPY:
                log.debug("in-kernel copy unavailable here (%s); trying the next method", exc)
                methods.pop(0)
                continue
            raise
        if got == 0:
            raise OSError(errno.EIO, f"{name} ended early while being copied", name)
        done += got


class BackgroundCopy:
    """Copy the whole of `src` to `dst` on a worker thread, so the caller validates and computes meanwhile.

    `wait()` blocks until the copy is complete and re-raises its error; leaving the context after an error cancels
    the copy after the chunk in flight.
    """

    CHUNK = 256 << 20

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = Path(src), Path(dst)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cna-copy", daemon=True)

    def __enter__(self) -> BackgroundCopy:
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.stop.set()
        self.thread.join()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with open(self.src, "rb") as fin, open(self.dst, "wb") as fout:
                size = os.fstat(fin.fileno()).st_size
                copy_range(
                    fin.fileno(), fout.fileno(), 0, size, 0, chunk=self.CHUNK, stop=self.stop, name=str(self.src)
                )
        except BaseException as exc:  # handed to the caller by wait()
            self.error = exc
