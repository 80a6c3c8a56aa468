"""Streaming safetensors writer: the header first, then each tensor's bytes, copied straight from a source file
(untouched tensors, never decoded) or made from an edited tensor, so peak memory is about one tensor whatever the
model size. The safetensors package has no streaming writer, hence this small one; every file it writes is read
back through `safe_open` in the tests.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cna_export.errors import CheckpointError
from cna_export.io.checkpoint import ST_TO_TORCH, TORCH_TO_ST
from cna_export.io.copy import copy_range
from cna_export.io.hashing import StreamHash

PAGE = 4096


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
                _copy_from(t.copy_from[0], t.copy_from[1], t.nbytes, out)
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
    t.edit(
        torch.frombuffer(memoryview(mapped)[offset - start :], dtype=torch.uint8)
        .view(ST_TO_TORCH[t.dtype])
        .view(t.shape)
    )
    # The map goes with its last view, when this returns. Its dirty pages are left to the kernel: msync would
    # force a slow disk write.


def _copy_from(src: Path, offset: int, length: int, out) -> None:
    """Append bytes [offset, offset+length) of `src` to the open file `out` without decoding them."""
    out.flush()
    with open(src, "rb") as f:
        at = out.tell()
        try:
            copy_range(f.fileno(), out.fileno(), offset, length, at, name=str(src))
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise CheckpointError(f"{src} ended early while copying.", "re-download the checkpoint.") from None
            raise
    out.seek(at + length)  # the copy wrote at explicit offsets; keep the Python file object in step
