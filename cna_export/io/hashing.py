"""sha256 of checkpoints: whole files, files still being written (on a worker thread), a small on-disk cache,
and one combined hash for a set of files (the circuit's and the card's provenance)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cna_export.errors import CheckpointError
from cna_export.progress import bar as progress_bar

log = logging.getLogger(__name__)
CHUNK = 16 * 1024 * 1024  # bytes read at a time


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest()


class StreamHash:
    """sha256 of a file while it is being written: the writer says how many leading bytes are final
    (`advance`), a worker thread hashes up to there, reading back from the page cache.

    Example:
        >>> with BackgroundHasher(folder) as hasher:
        ...     write_safetensors(folder / "model.safetensors", tensors, meta, hashing=hasher.stream(path))
    """

    CHUNK = CHUNK  # the module's, as a class attribute that a test can lower

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._final = 0
        self._closed = False
        self._aborted = False
        self._cv = threading.Condition()

    def advance(self, final: int) -> None:
        with self._cv:
            self._final = final
            self._cv.notify()

    def close(self) -> None:
        """Every byte is written: the hash ends at the last `advance`."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify()

    def run(self) -> str | None:
        """Hash until closed (hex digest) or aborted (None)."""
        h, pos, fd = hashlib.sha256(), 0, None
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda pos=pos: self._aborted or self._closed or self._final > pos)
                    if self._aborted:
                        return None
                    final, closed = self._final, self._closed
                if fd is None and final > pos:
                    fd = os.open(self.path, os.O_RDONLY)
                while pos < final:
                    chunk = os.pread(fd, min(self.CHUNK, final - pos), pos)
                    if not chunk:
                        raise CheckpointError(f"{self.path} is shorter than written.", "check the disk.")
                    h.update(chunk)
                    pos += len(chunk)
                if closed and pos >= final:
                    return h.hexdigest()
        finally:
            if fd is not None:
                os.close(fd)


class BackgroundHasher:
    """sha256 of files on worker threads (hashlib and file reads release the GIL): whole files with `submit`,
    files still being written with `stream`, so hashing an export overlaps with writing it.

    Example:
        >>> with BackgroundHasher(folder) as hasher:
        ...     hasher.submit(folder / "config.json")
        ...     digests = hasher.results()  # relative posix path -> hex
    """

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = Path(root)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")
        self._jobs: dict[str, Any] = {}
        self._streams: list[StreamHash] = []

    def _name(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def submit(self, path: Path) -> None:
        self._jobs[self._name(path)] = self._pool.submit(sha256_file, Path(path))

    def stream(self, path: Path) -> StreamHash:
        """A hash that follows the writer of `path` (which must `close()` it when done)."""
        stream = StreamHash(path)
        self._streams.append(stream)
        self._jobs[self._name(path)] = self._pool.submit(stream.run)
        return stream

    def results(self) -> dict[str, str]:
        return {name: job.result() for name, job in self._jobs.items()}

    def __enter__(self) -> BackgroundHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in self._streams:
            stream.abort()  # a no-op once closed and hashed; unblocks a worker whose writer failed
        for job in self._jobs.values():
            job.cancel()
        self._pool.shutdown(wait=True)


def sha256_files(paths: Iterable[Path], desc: str = "hashing") -> dict[str, str]:
    """sha256 of each file (name -> hex), with one byte progress bar.

    Digests are cached by (real path, size, mtime, inode) in `$CNA_EXPORT_CACHE` (default
    ~/.cache/cna-export), so `apply` after `discover` does not read a multi-GB model a second time only to
    hash it. A file rewritten in place gets a new mtime and is hashed again.
    """
    paths = list(paths)
    cache = _HashCache()
    todo = [p for p in paths if cache.get(p) is None]
    with progress_bar(
        total=sum(p.stat().st_size for p in todo), unit="B", unit_scale=True, desc=desc, leave=False
    ) as bar:
        for p in todo:
            cache.put(p, sha256_file(p, bar))
    return {p.name: cache.get(p) for p in paths}


class _HashCache:
    """A tiny on-disk sha256 cache: one small file per key, written atomically; failures only cost speed."""

    def __init__(self) -> None:
        root = os.environ.get("CNA_EXPORT_CACHE") or Path.home() / ".cache" / "cna-export"
        self.folder = Path(root) / "sha256"

    def _key(self, path: Path) -> Path:
        st = path.stat()
        raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        return self.folder / hashlib.sha256(raw.encode()).hexdigest()

    def get(self, path: Path) -> str | None:
        try:
            value = self._key(path).read_text().strip()
        except OSError:
            return None
        return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None

    def put(self, path: Path, digest: str) -> None:
        key = self._key(path)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = key.with_name(f".{key.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(digest)
            os.replace(tmp, key)
        except OSError:
            log.debug("could not cache the hash of %s", path)


def combined_sha256(file_hashes: dict[str, str]) -> str:
    """One hash for a set of files: sha256 over sorted 'name sha256' lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
