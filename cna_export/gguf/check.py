"""Check a GGUF file's structure before any parser trusts it.

gguf-py's `GGUFReader` (which transformers uses to load GGUF models) assumes a well-formed file: a damaged one
fails with whatever numpy or the decoder happens to raise (ValueError, IndexError, UnicodeDecodeError, ...),
and a truncated one only when a tensor is reshaped. `check_gguf` walks the header itself with bounds checks on
every read (magic, version, key/value pairs, tensor infos, alignment) and checks that every tensor's bytes lie
inside the file without overlapping, so a bad file gets one clear `CheckpointError` and a file that passes
reads cleanly with `GGUFReader`.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

from cna_export.arch import ArchSpec, ModelShape, Site, model_type_for_gguf
from cna_export.arch.experts import ExpertShape, ExpertSpec
from cna_export.errors import CheckpointError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays in metadata
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
MAX_KEPT_ARRAY = 256  # string arrays up to this long are kept in the metadata (languages, tags); a vocabulary is not
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: GGML type, dims (GGUF order, fastest first), absolute byte range."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What `check_gguf` learned: version, architecture, alignment, where tensor data starts, the tensors, and the
    small metadata values (everything but long arrays such as the vocabulary)."""

    version: int
    architecture: str | None
    alignment: int
    data_start: int
    tensors: dict[str, GGUFTensorInfo]
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars, strings and short string arrays

    def get(self, key: str, kind: type | tuple[type, ...] = str) -> Any:
        """A metadata value if it has the expected Python type (`str`, `int`, `float`, `list`), else None."""
        value = self.metadata.get(key)
        return value if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else None


class _Cursor:
    """Little-endian reads from a buffer; any read past the end is a truncated file."""

    def __init__(self, buf: bytes | mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _bad(self.path, "is truncated inside its header")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        """Advance past n bytes without copying them."""
        if n < 0 or self.pos + n > len(self.buf):
            raise _bad(self.path, "is truncated inside its header")
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Advance past `count` length-prefixed strings (a vocabulary: 150k entries) without copying any."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise _bad(self.path, "is truncated inside its header")
            pos += 8 + unpack(buf, pos)[0]
        if pos > end:
            raise _bad(self.path, "is truncated inside its header")
        self.pos = pos

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(self.path, f"has a {what} that is not UTF-8 text") from None

    def remaining(self) -> int:
        return len(self.buf) - self.pos


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"GGUF file {path} {what}.", "re-download or re-convert the model; the file is damaged.")


def check_gguf(path: Path) -> GGUFLayout:
    """Validate the structure of a GGUF file without decoding tensor data.

    Args:
        path: the .gguf file.

    Returns:
        Its layout (version, architecture, tensors with absolute byte ranges).

    Raises:
        CheckpointError: bad magic, unsupported version, damaged header, unknown tensor type, or tensor data
            that lies past the end of the file (a truncated download) or overlaps another tensor.

    Example:
        >>> check_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf")).architecture
        'llama'
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise _bad(path, f"is too short to be a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Cursor(buf, path), size)


def _walk(cur: _Cursor, size: int) -> GGUFLayout:
    path = cur.path
    if cur.u32() != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (its first bytes are not the GGUF magic).",
            "pass a .gguf model file, or a Hugging Face folder for safetensors weights.",
        )
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        kind = "big-endian GGUF" if swapped in SUPPORTED_VERSIONS else f"GGUF version {version}"
        raise CheckpointError(
            f"{path} is a {kind} file; cna-export reads little-endian GGUF versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}.",
            "re-convert the model with a current llama.cpp (convert_hf_to_gguf.py).",
        )
    n_tensors, n_kv = cur.u64(), cur.u64()
    # Every key/value pair takes at least 12 bytes and every tensor info at least 24: counts that cannot fit
    # in the file are damage, caught here before any loop runs that long.
    if n_kv * 12 > cur.remaining() or n_tensors * 24 > cur.remaining():
        raise _bad(path, f"declares {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")
    alignment, metadata = GGUF_DEFAULT_ALIGNMENT, {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = _value_type(cur, key)
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _bad(path, "stores general.alignment with a type other than uint32")
            alignment = cur.u32()
            if alignment == 0 or alignment & (alignment - 1):
                raise _bad(path, f"has alignment {alignment}, which is not a power of two")
        else:
            _read_value(cur, vtype, key, metadata)
    architecture = metadata.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else None
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = cur.pos + (-cur.pos % alignment)
    tensors = _place(infos, data_start, alignment, size, path)
    return GGUFLayout(version, architecture, alignment, data_start, tensors, metadata)


def _tensor_info(cur: _Cursor) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
    """(name, type, dims, offset, bytes) of the next tensor info, checked."""
    path = cur.path
    name = cur.string("tensor name")
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:  # gguf-py cannot read a 0-dimensional tensor (IndexError)
        raise _bad(path, f"gives tensor {name!r} {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(cur.u64() for _ in range(n_dims))
    # An empty dimension makes the byte count 0 whatever the others say, so huge dims would pass the bounds
    # checks below and then overflow in gguf-py's reshape (ValueError); ggml dims are int64 besides.
    if not all(1 <= d < 2**63 for d in dims):
        raise _bad(path, f"gives tensor {name!r} dimensions {list(dims)} (each must be 1 to 2**63 - 1)")
    raw_type, offset = cur.u32(), cur.u64()
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise _bad(path, f"stores tensor {name!r} with unknown type {raw_type}") from None
    if dims and dims[0] % block:
        raise _bad(path, f"gives tensor {name!r} a row of {dims[0]} values, not whole {block}-value blocks")
    return name, ggml_type, dims, offset, math.prod(dims) // block * type_size


def _place(infos: list, data_start: int, alignment: int, size: int, path: Path) -> dict[str, GGUFTensorInfo]:
    """Absolute byte ranges of the tensors, checked: aligned, inside the file, listed once, not overlapping."""
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ggml_type, dims, offset, nbytes in infos:
        if name in tensors:
            raise _bad(path, f"lists tensor {name!r} twice")
        if offset % alignment:
            raise _bad(path, f"places tensor {name!r} at an offset that is not {alignment}-byte aligned")
        start = data_start + offset
        if start + nbytes > size:
            raise _bad(path, f"is truncated: tensor {name!r} ends past the end of the file")
        tensors[name] = GGUFTensorInfo(name, ggml_type, dims, start, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.nbytes))
    for prev, cur_t in zip(ordered, ordered[1:]):
        if cur_t.start < prev.start + prev.nbytes:
            raise _bad(path, f"has overlapping tensors {prev.name!r} and {cur_t.name!r}")
    return tensors


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str, metadata: dict[str, Any]) -> None:
    """Keep a scalar, a string or a short string array in `metadata`; skip anything larger."""
    if vtype in _SCALAR_FORMATS:
        metadata[key] = struct.unpack(_SCALAR_FORMATS[vtype], cur.take(_SCALAR_SIZES[vtype]))[0]
    elif vtype == GGUFValueType.STRING:
        metadata[key] = cur.string(f"value of {key}")
    elif vtype == GGUFValueType.ARRAY and cur.remaining() >= 12:
        start = cur.pos
        item, count = _value_type(cur, key), cur.u64()
        cur.pos = start
        if item == GGUFValueType.STRING and count <= MAX_KEPT_ARRAY:
            cur.skip(12)
            metadata[key] = [cur.string(f"item of {key}") for _ in range(count)]
        else:
            _skip_value(cur, vtype, key, 0)
    else:
        _skip_value(cur, vtype, key, 0)


def _value_type(cur: _Cursor, key: str) -> GGUFValueType:
    raw = cur.u32()
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _bad(cur.path, f"stores metadata {key!r} with unknown value type {raw}") from None


def _skip_value(cur: _Cursor, vtype: GGUFValueType, key: str, depth: int) -> None:
    if vtype in _SCALAR_SIZES:
        cur.skip(_SCALAR_SIZES[vtype])
    elif vtype == GGUFValueType.STRING:
        cur.skip(cur.u64())
    elif vtype == GGUFValueType.ARRAY:
        if depth >= MAX_NESTING:
            raise _bad(cur.path, f"nests arrays in metadata {key!r} too deeply")
        item = _value_type(cur, key)
        count = cur.u64()
        if item in _SCALAR_SIZES:
            cur.skip(count * _SCALAR_SIZES[item])
            return
        if count * (8 if item == GGUFValueType.STRING else 12) > cur.remaining():
            raise _bad(cur.path, "is truncated inside its header")
        if item == GGUFValueType.STRING:
            cur.skip_strings(count)
            return
        for _ in range(count):
            _skip_value(cur, item, key, depth + 1)
    else:  # pragma: no cover - every GGUFValueType is handled above
        raise _bad(cur.path, f"stores metadata {key!r} with unhandled value type {vtype}")


def gguf_shape(layout: GGUFLayout, spec: ArchSpec, path: Path) -> ModelShape:
    """Layers, MLP width (each layer's, where they differ) and hidden size of a GGUF model, from the tensors at its
    `gguf_up` sites (a mixture of experts: the stacked `ffn_up_exps` of its MoE layers and `ffn_up` of its dense
    ones, if any)."""
    ex = spec.experts
    ups = [spec.gguf_up] + ([ex.gguf_up] if ex is not None else [])
    layers = 0
    while any(site.name(layers) in layout.tensors for site in ups):
        layers += 1
    if layers == 0:
        raise CheckpointError(
            f"GGUF file {path} has no {ups[-1].name(0)} tensor.",
            "pass a GGUF of a decoder model with separate gate and up projections (llama, qwen2, gemma, ...).",
        )
    site = spec.gguf_up
    dense = [i for i in range(layers) if site.name(i) in layout.tensors]
    moe = _expert_shape(layout, ex, layers, dense, path) if ex is not None else None
    if not dense:  # every layer is MoE: the dense width (config.intermediate_size) is only in the metadata
        key = Keys.LLM.FEED_FORWARD_LENGTH.format(arch=layout.architecture)
        width, hidden = layout.get(key, int), _dims(layout, ex.gguf_up, range(layers), 3, path)[2]
        if width is None and spec.width_key == ex.width_key:  # no dense MLP at all: the expert width stands in
            width = moe.width  # (Qwen3.5-MoE, whose config has no intermediate_size and whose GGUF has no key)
        if width is None:
            raise CheckpointError(f"GGUF file {path} has no {key}.", "re-convert the model.")
        return ModelShape(layers, width, hidden, moe)
    if moe is None:  # a dense model: each layer's width (Gemma 4's double-wide layers are wider), one hidden size
        stored = [_dims(layout, site, [i], 2, path) for i in range(layers)]
        hidden = {d[1 - site.axis] for d in stored}
        if len(hidden) != 1:
            raise CheckpointError(
                f"GGUF file {path} has {site.name(0).replace('.0.', '.N.')} tensors of differing "
                f"hidden sizes {sorted(hidden)}.",
                "re-convert the model; the file is inconsistent.",
            )
        return ModelShape.of_widths([d[site.axis] // site.parts for d in stored], hidden.pop())
    stored = _dims(layout, site, dense, 2, path)
    return ModelShape(layers, int(stored[site.axis]) // site.parts, int(stored[1 - site.axis]), moe)


def _dims(layout: GGUFLayout, site: Site, layers: Iterable[int], ndim: int, path: Path) -> tuple[int, ...]:
    """The one shape (numpy order) of the tensors of `site` in `layers`; a file where they differ is refused."""
    dims = {layout.tensors[site.name(i)].dims for i in layers}
    if len(dims) != 1 or len(next(iter(dims))) != ndim:
        raise CheckpointError(
            f"GGUF file {path} has {site.name(0).replace('.0.', '.N.')} tensors of differing or "
            f"non-{ndim}-D shapes {sorted(dims)}.",
            "re-convert the model; the file is inconsistent.",
        )
    return tuple(int(d) for d in reversed(next(iter(dims))))


def _expert_shape(layout: GGUFLayout, ex: ExpertSpec, layers: int, dense: list[int], path: Path) -> ExpertShape:
    """Experts per MoE layer, their width and the shared expert's, from `ffn_up_exps` [E, n, n_embd] and
    `ffn_up_shexp` [n_shared, n_embd] (numpy order)."""
    moe_layers = [i for i in range(layers) if i not in dense]
    if not moe_layers:
        raise CheckpointError(f"GGUF file {path} has no {ex.gguf_up.name(0)} tensor.", "re-convert the model.")
    count, width, _ = _dims(layout, ex.gguf_up, moe_layers, 3, path)
    shared = 0
    if ex.shared_up is not None and ex.gguf_shared_up.name(moe_layers[0]) in layout.tensors:
        shared = _dims(layout, ex.gguf_shared_up, moe_layers, 2, path)[ex.gguf_shared_up.axis]
    return ExpertShape(count, width, shared, frozenset(dense))


def gguf_model_type(layout: GGUFLayout) -> str:
    """The transformers model_type of a checked GGUF file (`general.architecture`, `general.name` and whether it
    has experts: llama.cpp runs Mixtral as `llama` with `llama.expert_count`)."""
    experts = layout.get(Keys.LLM.EXPERT_COUNT.format(arch=layout.architecture), int)
    return model_type_for_gguf(layout.architecture, layout.get("general.name"), experts)
