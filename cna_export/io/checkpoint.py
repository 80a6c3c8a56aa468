"""Checkpoint I/O: a lazy reader over safetensors shards, a streaming writer, and atomic output folders.

The reader maps tensor names to byte ranges and decodes a tensor only when asked (through `safe_open`, which
memory-maps). The writer streams: it writes the header first and then each tensor's bytes, either copied
straight from a source file (untouched tensors, never decoded) or from an edited tensor, so peak memory is
about one tensor whatever the model size. The safetensors package has no streaming writer, hence the small
header writer here; every file it writes is read back through `safe_open` in the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from cna_export.errors import CheckpointError

# Output safety lives in output.py; re-exported here, where the rest of the project has always found it.
from cna_export.io.output import check_output_path, staged_output  # noqa: F401

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files in a model folder that are not weights and travel unchanged into an export.
NOT_COPIED_SUFFIXES = (".safetensors", ".gguf", ".msgpack", ".h5", ".onnx", *PICKLE_SUFFIXES)
NOT_COPIED_NAMES = {INDEX_NAME, "README.md", "circuit.json", "recipe.yaml"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024
PAGE = 4096

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `file` (a name inside the folder), absolute byte range [start, end)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check one safetensors header. Returns (entries by name, metadata).

    Checks: header length inside the file, valid JSON object, known dtypes, byte ranges that match the
    shapes, lie inside the file and do not overlap.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, "is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _bad(path, f"declares a {n}-byte header but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"has a header that is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "has a header that is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "has __metadata__ that is not a string map")
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(type(x) is int and x >= 0 for x in (*shape, begin, end))  # bool is an int; not here
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _bad(path, f"has a malformed entry for tensor {name!r}")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list here is unhashable
            raise _bad(path, f"stores tensor {name!r} with unknown dtype {dtype!r}")
        if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
            raise _bad(path, f"gives tensor {name!r} a byte range that does not match its shape {list(shape)}")
        if base + end > size:
            raise _bad(path, f"is truncated: tensor {name!r} ends past the end of the file")
        entries[name] = TensorEntry(name, path.name, dtype, shape, base + begin, base + end)
    ordered = sorted(entries.values(), key=lambda e: (e.start, e.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end:
            raise _bad(path, f"has overlapping tensors {prev.name!r} and {cur.name!r}")
    return entries, metadata


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} {what}.", "re-download or re-export the checkpoint; the file is damaged.")


class CheckpointReader:
    """Lazy, name-keyed access to the safetensors weights of one Hugging Face model folder.

    Example:
        >>> reader = CheckpointReader(Path("Llama-3.2-1B-Instruct"))
        >>> w = reader.tensor("model.layers.0.mlp.down_proj.weight")
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files, weight_map = _weight_files(self.folder)
        self.entries: dict[str, TensorEntry] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        for file in self.files:
            entries, metadata = read_header(self.folder / file)
            self.file_metadata[file] = metadata
            for name, entry in entries.items():
                if name in self.entries:
                    raise _bad(self.folder / file, f"repeats tensor {name!r} found in another shard")
                self.entries[name] = entry
        # An index that disagrees with its shards would make loaders look for tensors in the wrong file.
        for name, file in (weight_map or {}).items():
            if name not in self.entries or self.entries[name].file != file:
                raise _bad(self.folder / INDEX_NAME, f"says tensor {name!r} is in {file}, but it is not there")

    def tensor(self, name: str) -> torch.Tensor:
        """Decode one tensor (memory-mapped read)."""
        entry = self.entry(name)
        try:
            with safe_open(self.folder / entry.file, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types; they all mean a bad file.
            raise _bad(self.folder / entry.file, f"could not be read ({exc})") from None

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(
                f"Tensor {name!r} is not in the checkpoint at {self.folder}.",
                "check that the checkpoint matches its config.json (same architecture and size).",
            ) from None

    def entries_in(self, file: str) -> list[TensorEntry]:
        """Entries of one file in on-disk order."""
        return sorted((e for e in self.entries.values() if e.file == file), key=lambda e: e.start)


def _weight_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """Names of the safetensors files of a folder, and its index's weight map when it has one.

    Shard names come from a file, so they are trusted only as plain names of files inside `folder`.
    """
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder.", "pass a Hugging Face model folder, a Hub id or a .gguf file."
        )
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            raise _bad(index, "is not a valid shard index") from None
        if not files:
            raise _bad(index, "lists no shards")
        for name in files:
            if Path(name).name != name or name in ("", ".", "..") or "\\" in name or "\0" in name:
                raise CheckpointError(
                    f"{index} names shard {name!r} outside the model folder.",
                    "use an index whose shard names are plain file names.",
                )
            if name.endswith(PICKLE_SUFFIXES):
                raise CheckpointError(
                    f"{index} names pickle shard {name}, which cna-export never loads.",
                    "convert the model to safetensors first (or download its safetensors revision).",
                )
            if not (folder / name).is_file():
                raise CheckpointError(f"{index} names shard {name} which is missing.", "download the missing shard.")
        return files, weight_map
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise CheckpointError(
            f"{folder} holds only pickle weights (.bin/.pt), which cna-export never loads.",
            "convert the model to safetensors first (or download its safetensors revision).",
        )
    raise CheckpointError(f"{folder} has no safetensors weights.", "pass a folder with model.safetensors or an index.")


def side_files(folder: Path) -> list[Path]:
    """Non-weight files that an export copies unchanged: config, tokenizer, generation config, templates.

    These are copied byte for byte into an export that may be published, so a symlink among them must stay
    inside the model folder (or, for a huggingface_hub cache snapshot, inside that repository's `blobs`): a
    downloaded folder with `tokenizer.json -> ~/.ssh/id_rsa` must not leak the key into the export. Weight
    files are exempt (they are parsed as safetensors, never copied blindly, and are often links to shared
    storage).
    """
    roots = trusted_roots(folder)
    keep = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.name in NOT_COPIED_NAMES:
            continue
        if path.suffix in NOT_COPIED_SUFFIXES:
            continue
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise CheckpointError(
                f"{path} links to {target}, outside the model folder, and would be copied into the export.",
                "copy the file into the model folder instead of linking it.",
            )
        keep.append(path)
    return keep


def trusted_roots(folder: Path) -> list[Path]:
    """Where the files of a model folder may live: the folder, plus its repository's blobs for a Hub snapshot."""
    root = Path(folder).resolve()
    roots = [root]
    # huggingface_hub cache layout: <cache>/models--owner--name/snapshots/<revision>/<file> -> ../../blobs/<hash>
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append(root.parent.parent / "blobs")
    return roots


# Writing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: bytes come from `copy_from` (a file and offset) or from `make()`.

    `edit`, if given, is applied in place to the copied bytes (viewed as a tensor of `dtype` and `shape`
    through a memory map of the output file), so an edit touches only the values it changes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    copy_from: tuple[Path, int] | None = None
    make: Callable[[], torch.Tensor] | None = None
    edit: Callable[[torch.Tensor], None] | None = None


def write_safetensors(
    path: Path,
    tensors: list[OutTensor],
    metadata: dict[str, str],
    progress: tqdm | None = None,
    hashing: StreamHash | None = None,
) -> None:
    """Write one safetensors file, streaming tensor by tensor in the given order.

    Each tensor is final (copied and edited) before the next one is written, so `hashing` can follow the writer
    and the file's sha256 is ready moments after its last byte."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    phase = None  # where the source's data starts, modulo a page
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        if phase is None and t.copy_from is not None:
            phase = (t.copy_from[1] - offset) % PAGE
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so tensor data starts 8-byte aligned
    # Pad further so the copied bytes sit at the same offset within a page as in the source: the kernel then
    # copies whole pages (a shifted copy straddles two pages per page and runs ~30% slower).
    if phase is not None and phase % 8 == 0:
        raw += b" " * ((phase - 8 - len(raw)) % PAGE)
    offset = 8 + len(raw)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        out.flush()
        if hashing is not None:
            hashing.advance(offset)
        for t in tensors:
            if t.copy_from is not None:
                _copy_range(t.copy_from[0], t.copy_from[1], t.nbytes, out)
            else:
                tensor = t.make().contiguous()
                if TORCH_TO_ST[tensor.dtype] != t.dtype or tuple(tensor.shape) != t.shape:
                    raise AssertionError(f"edited tensor {t.name} changed dtype or shape")
                out.write(tensor.view(torch.uint8).reshape(-1).numpy().data)
                out.flush()
            if t.edit is not None and t.nbytes:
                _edit_in_place(path, offset, t)
            offset += t.nbytes
            if hashing is not None:
                hashing.advance(offset)
            if progress is not None:
                progress.update(t.nbytes)
        # No fsync: a killed process cannot lose page-cache data, and the folder only appears, complete, by
        # rename. (cp does not fsync either; power-loss durability is the file system's job.)
    if hashing is not None:
        hashing.close()


# Linux 5.14+: fault a whole range in writable with one call instead of one page fault per 4 KB page (a column
# edit touches every page of a down_proj). Python < 3.13 lacks the name; older kernels refuse it (EINVAL).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)


def _edit_in_place(path: Path, offset: int, t: OutTensor) -> None:
    """Apply `t.edit` to the tensor's bytes at `offset` of `path`, through a shared memory map."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, offset - start + t.nbytes, offset=start)
    finally:
        os.close(fd)  # the map keeps its own reference to the file
    if _POPULATE_WRITE is not None:
        try:
            mapped.madvise(_POPULATE_WRITE)
        except OSError:
            pass  # only slower
    t.edit(torch.frombuffer(memoryview(mapped)[offset - start :], dtype=torch.uint8).view(ST_TO_TORCH[t.dtype])
           .view(t.shape))  # fmt: skip
    # The map goes with its last view, when this returns. Its dirty pages are left to the kernel: msync would
    # force a slow disk write.


def _copy_range(src: Path, offset: int, length: int, out) -> None:
    """Copy bytes [offset, offset+length) of src into the open file `out` without decoding them."""
    out.flush()
    with open(src, "rb") as f:
        fd_in, fd_out = f.fileno(), out.fileno()
        remaining = length
        try:
            while remaining:
                n = os.copy_file_range(fd_in, fd_out, min(remaining, COPY_CHUNK), offset + length - remaining)
                if n == 0:
                    raise CheckpointError(f"{src} ended early while copying.", "re-download the checkpoint.")
                remaining -= n
        except OSError as exc:
            if remaining != length or exc.errno not in (18, 22, 38, 95):  # EXDEV EINVAL ENOSYS EOPNOTSUPP
                raise
            f.seek(offset)
            while remaining:
                chunk = f.read(min(remaining, COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{src} ended early while copying.", "re-download the checkpoint.") from None
                out.write(chunk)
                remaining -= len(chunk)
            out.flush()
            return
        # os.copy_file_range moved the output fd; keep the Python file object in step.
        out.seek(0, os.SEEK_END)


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
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

    CHUNK = 16 * 1024 * 1024

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
        from concurrent.futures import ThreadPoolExecutor

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
    with tqdm(total=sum(p.stat().st_size for p in todo), unit="B", unit_scale=True, desc=desc, leave=False) as bar:
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
