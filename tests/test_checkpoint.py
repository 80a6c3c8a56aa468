"""Checkpoint I/O details: the streaming writer, the hash cache."""

from __future__ import annotations

import hashlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cna_export.checkpoint import OutTensor, read_header, sha256_files, write_safetensors


def test_writer_round_trips_through_safetensors(tmp_path):
    src = tmp_path / "src.bin"
    a = torch.arange(10, dtype=torch.float32)
    src.write_bytes(b"xxxx" + a.numpy().tobytes())
    b = torch.randn(3, 5).to(torch.bfloat16)
    tensors = [
        OutTensor("a", "F32", (10,), 40, copy_from=(src, 4)),
        OutTensor("b", "BF16", (3, 5), 30, make=lambda: b),
        OutTensor("c", "I64", (2,), 16, make=lambda: torch.tensor([7, 8])),
    ]
    write_safetensors(tmp_path / "out.safetensors", tensors, {"format": "pt", "k": "v"})
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b) and loaded["c"].tolist() == [7, 8]
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    entries, _ = read_header(tmp_path / "out.safetensors")
    assert entries["a"].start % 8 == 0, "tensor data starts 8-byte aligned"


def test_hash_cache_notices_changes(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"one")
    assert sha256_files([path])["w.safetensors"] == hashlib.sha256(b"one").hexdigest()
    assert sha256_files([path])["w.safetensors"] == hashlib.sha256(b"one").hexdigest()  # from the cache
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 1))
    assert sha256_files([path])["w.safetensors"] == hashlib.sha256(b"two").hexdigest()
