"""Lazy, checked reading of a safetensors checkpoint: the shard index, each header (validated: dtypes, byte
ranges, overlaps), and one tensor at a time through `safe_open` (memory-mapped). The side files an export copies.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cna_export.errors import CheckpointError
from cna_export.io.untrusted_json import parse_json, read_json

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files in a model folder that are not weights and travel unchanged into an export.
NOT_COPIED_SUFFIXES = (".safetensors", ".gguf", ".msgpack", ".h5", ".onnx", *PICKLE_SUFFIXES)
NOT_COPIED_NAMES = {INDEX_NAME, "README.md", "circuit.json", "recipe.yaml"}
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
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
    header = parse_json(raw, lambda why: _bad(path, f"has a header that is not valid JSON ({why})"))
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
        data = read_json(index, lambda why: _bad(index, f"is not a valid shard index ({why})"))
        try:
            weight_map = data["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
            files = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError):
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
