"""Read-only, tensor-at-a-time access to a checkpoint, whatever its format, for comparing two of them.

A `Weights` object lists tensor names in storage order, knows which are MLP projections (`down`/`up` of which
layer), and gives each tensor as raw bytes (a memory map, read only when compared), as values, or for quantized
GGUF tensors as (rows, bytes per row). `open_pair` opens an original and an edited checkpoint so that both
sides use the same tensor names: a GGUF file compared with a safetensors folder is dequantized first.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cna_export.arch import ARCHITECTURES, ModelShape
from cna_export.checkpoint import CheckpointReader
from cna_export.errors import ArchitectureError, CheckpointError

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024  # raw comparison works on slices this large, so it never holds a whole tensor twice


class Weights:
    """Read-only, tensor-at-a-time access to one checkpoint, with the names of its MLP tensors.

    Attributes:
        label: what the user typed.
        fmt: "safetensors" or "gguf".
        names: tensor names in storage order.
        mlp: tensor name -> ("down" | "up", layer) for the MLP projections.
    """

    label: str
    fmt: str
    model_type: str
    shape: ModelShape
    names: list[str]
    mlp: dict[str, tuple[str, int]]

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(storage type, shape in PyTorch order)."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        raise NotImplementedError

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, as a flat uint8 memory map (not read until compared)."""
        raise NotImplementedError

    def values(self, name: str) -> torch.Tensor:
        """Float values: native dtype for float storage, float32 dequantized for quantized GGUF types."""
        raise NotImplementedError

    def quant(self, name: str) -> str | None:
        """The quantized GGUF type name, or None for float storage."""
        return None

    def pair(self, layer: int) -> dict[str, str]:
        return {kind: name for name, (kind, lay) in self.mlp.items() if lay == layer}


class SafetensorsWeights(Weights):
    """A Hugging Face folder (or Hub snapshot) of safetensors shards."""

    def __init__(self, folder: Path, label: str) -> None:
        from cna_export.source import Source, describe

        self.label, self.fmt, self.folder = label, "safetensors", Path(folder)
        spec, self.shape, config = describe(Source(label, self.folder))
        self.model_type = config["model_type"]
        self.reader = CheckpointReader(self.folder)
        self.names = [e.name for f in self.reader.files for e in self.reader.entries_in(f)]
        self.mlp = {}
        for i in range(self.shape.num_layers):
            self.mlp[spec.down_weight.format(i=i)] = ("down", i)
            self.mlp[spec.up_weight.format(i=i)] = ("up", i)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.reader.entries[name]
        return entry.dtype, entry.shape

    def nbytes(self, name: str) -> int:
        return self.reader.entries[name].nbytes

    def raw(self, name: str) -> np.ndarray:
        e = self.reader.entries[name]
        if not e.nbytes:
            return np.empty(0, np.uint8)
        return np.memmap(self.folder / e.file, dtype=np.uint8, mode="r", offset=e.start, shape=(e.nbytes,))

    def values(self, name: str) -> torch.Tensor:
        return self.reader.tensor(name)


class GGUFWeights(Weights):
    """A GGUF file, through gguf-py's memory-mapped reader."""

    FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, path: Path, label: str) -> None:
        from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFReader, Keys

        self.label, self.fmt, self.path = label, "gguf", Path(path)
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable GGUF file ({exc}).", "check the file.") from None
        fields = self.reader.fields

        def get(key: str):
            if key not in fields:
                raise CheckpointError(f"{path} has no {key} metadata.", "use a GGUF written by llama.cpp or gguf-py.")
            return fields[key].contents()

        arch = get(Keys.General.ARCHITECTURE)
        # Several model types run as one llama.cpp architecture (mistral as llama); the first in the table wins.
        by_arch = {}
        for spec in ARCHITECTURES.values():
            by_arch.setdefault(MODEL_ARCH_NAMES[spec.gguf_arch], spec.model_type)
        if arch not in by_arch:
            raise ArchitectureError(f"GGUF architecture {arch!r} is not supported.", f"use one of {sorted(by_arch)}.")
        self.model_type = by_arch[arch]
        self.shape = ModelShape(
            int(get(Keys.LLM.BLOCK_COUNT.format(arch=arch))),
            int(get(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch))),
            int(get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))),
        )
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.names = [t.name for t in self.reader.tensors]
        self.mlp = {}
        for i in range(self.shape.num_layers):
            self.mlp[TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN].format(bid=i) + ".weight"] = ("down", i)
            self.mlp[TENSOR_NAMES[MODEL_TENSOR.FFN_UP].format(bid=i) + ".weight"] = ("up", i)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self.tensors[name]
        return t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def raw(self, name: str) -> np.ndarray:
        return self.tensors[name].data.reshape(-1).view(np.uint8)

    def rows(self, name: str) -> np.ndarray:
        """Quantized tensor as (rows, bytes per row) uint8: row j of ffn_up is neuron j."""
        return self.tensors[name].data

    def values(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors[name]
        dtype, shape = self.meta(name)
        if dtype in self.FLOATS:
            raw = np.array(self.raw(name))  # one copy, so the tensor is writable and independent of the map
            return torch.from_numpy(raw).view(self.FLOATS[dtype]).reshape(shape)
        return torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(shape)

    def quant(self, name: str) -> str | None:
        dtype = self.tensors[name].tensor_type.name
        return None if dtype in self.FLOATS else dtype


def open_weights(ref: str) -> Weights:
    """A GGUF path, a model folder or a Hub id (downloaded through the huggingface_hub cache)."""
    from cna_export.source import resolve

    source = resolve(ref)
    if source.is_gguf:
        return GGUFWeights(source.path, ref)
    return SafetensorsWeights(source.folder, ref)


@contextlib.contextmanager
def open_pair(original: str, edited: str) -> Iterator[tuple[Weights, Weights]]:
    """Open both checkpoints. A GGUF file compared with a folder is first dequantized into a temporary folder
    (through transformers, in the folder's dtype), which is how `apply` exports a GGUF source."""
    a, b = open_weights(original), open_weights(edited)
    if a.fmt == b.fmt:
        yield a, b
        return
    gguf_side, dense = (a, b) if a.fmt == "gguf" else (b, a)
    from cna_export.export import materialize_gguf
    from cna_export.source import resolve

    down = next(name for name, (kind, _) in dense.mlp.items() if kind == "down")
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dense.meta(down)[0], "float32")
    log.warning("dequantizing %s to %s to compare it with a safetensors folder", gguf_side.label, dtype)
    with tempfile.TemporaryDirectory(prefix="cna-diff-") as tmp:
        materialize_gguf(resolve(gguf_side.label), Path(tmp), dtype)
        converted = SafetensorsWeights(Path(tmp), gguf_side.label)
        yield (converted, b) if a.fmt == "gguf" else (a, converted)


def same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Raw equality, slice by slice (never two whole tensors in memory)."""
    if x.shape != y.shape:
        return False
    return all(np.array_equal(x[i : i + CHUNK], y[i : i + CHUNK]) for i in range(0, x.size, CHUNK))
