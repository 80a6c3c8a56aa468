"""Checkpoint I/O details: the streaming writer, the hash cache."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cna_export.io.checkpoint import read_header
from cna_export.io.hashing import BackgroundHasher, StreamHash, sha256_files
from cna_export.io.writer import OutTensor, write_safetensors


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


def test_stream_hash_follows_the_writer_edits_included(tmp_path, monkeypatch):
    """The hash computed while writing (copies, made tensors and in-place edits) is the finished file's sha256."""
    monkeypatch.setattr(StreamHash, "CHUNK", 4096)  # many reads per tensor, as in a real multi-GB shard
    src = tmp_path / "src.bin"
    big = torch.randn(300, 70)
    src.write_bytes(big.numpy().tobytes() * 2)

    def zero_column(t: torch.Tensor) -> None:
        t[:, 5] = 0

    tensors = [
        OutTensor("a", "F32", (300, 70), big.numel() * 4, copy_from=(src, 0), edit=zero_column),
        OutTensor("b", "F32", (4,), 16, make=lambda: torch.ones(4)),
        OutTensor("c", "F32", (300, 70), big.numel() * 4, copy_from=(src, big.numel() * 4)),
    ]
    path = tmp_path / "out.safetensors"
    with BackgroundHasher(tmp_path) as hasher:
        write_safetensors(path, tensors, {"format": "pt"}, hashing=hasher.stream(path))
        digest = hasher.results()["out.safetensors"]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_file(path)["a"][:, 5].abs().sum() == 0


def test_stream_hash_of_a_failed_write_does_not_hang(tmp_path):
    path = tmp_path / "out.safetensors"

    def boom() -> torch.Tensor:
        raise OSError(28, "No space left on device")

    done = threading.Event()

    def run() -> None:
        with pytest.raises(OSError), BackgroundHasher(tmp_path) as hasher:
            write_safetensors(path, [OutTensor("a", "F32", (1,), 4, make=boom)], {}, hashing=hasher.stream(path))
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "the hashing thread of a failed write kept the export from finishing"


def test_copied_tensors_keep_their_offset_within_a_page(tmp_path):
    """The header is padded so copied bytes sit at the source's offset modulo 4096 (whole-page kernel copies);
    the file stays valid safetensors with 8-byte aligned data."""
    src = tmp_path / "src.bin"
    a, b = torch.randn(1000), torch.randn(300)
    src.write_bytes(b"x" * 2824 + a.numpy().tobytes() + b.numpy().tobytes())
    tensors = [
        OutTensor("a", "F32", (1000,), 4000, copy_from=(src, 2824)),
        OutTensor("b", "F32", (300,), 1200, copy_from=(src, 6824)),
    ]
    write_safetensors(tmp_path / "out.safetensors", tensors, {"format": "pt", "cna_export.version": "x" * 50})
    entries, _ = read_header(tmp_path / "out.safetensors")
    assert entries["a"].start % 4096 == 2824 and entries["b"].start % 4096 == 6824 % 4096
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
