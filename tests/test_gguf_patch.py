"""patch-gguf: scaling circuit rows inside existing GGUF files, per storage type, byte for byte.

Small GGUF files are written with gguf-py (32-value block types quantized by gguf.quants) and, for the K-quants,
quantized by llama.cpp itself (`llama_model_quantize`). Exactness claims checked here:
- m in {0, 2} (and -1 with allow_negative): dequantized patched rows == m * original rows, bit for bit, every type.
- m = 0.5: bit-exact for every block whose f16 scales halve exactly (normal f16; subnormal scales with an odd last
  bit round), checked block by block, and for every F32/BF16 value and every F16 value that stays normal; all
  rows within the tolerance below.
- m = 0.3, 1.7: |patched - m * original| <= 4e-3 * |m| * max|original row| (one f16 rounding of each block scale,
  2**-11 relative, summed over d and min terms; subnormal scales round coarser); F32 rows 1e-7, F16 1e-3, BF16 8e-3.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from conftest import run_cli
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection
from cna_export.errors import CircuitError, CnaExportError
from cna_export.gguf.patch import SCALE_FIELDS, patch_gguf, patch_gguf_report, scale_rows_bytes, sidecar_path

E, F, L, V = 256, 64, 2, 32  # n_embd (one 256-value K block per row), n_ff, layers, vocab
NEURONS = [(0, 0), (0, 5), (0, 63), (1, 17), (1, 40)]
GROUP32 = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
KQUANTS = {Q.Q2_K: "Q2_K", Q.Q3_K: "Q3_K_S", Q.Q4_K: "Q4_K_S", Q.Q5_K: "Q5_K_S", Q.Q6_K: "Q6_K"}  # llama ftype
TYPES = GROUP32 + list(KQUANTS)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_model(path: Path, up_type: Q = Q.F32, seed: int = 0, up_raw: np.ndarray | None = None) -> Path:
    """A tiny but complete llama GGUF (llama.cpp can quantize it); ffn_up stored as `up_type`."""
    rng = np.random.default_rng(seed)
    w = _writer(path)

    def dense(name: str, shape: tuple[int, int]) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    dense("token_embd.weight", (V, E))
    w.add_tensor("output_norm.weight", np.ones(E, np.float32))
    dense("output.weight", (V, E))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(E, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(E, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            dense(f"blk.{i}.{n}.weight", (E, E))
        dense(f"blk.{i}.ffn_gate.weight", (F, E))
        up = (rng.standard_normal((F, E)) * 0.05).astype(np.float32)
        if up_raw is not None:
            w.add_tensor(f"blk.{i}.ffn_up.weight", up_raw, raw_dtype=up_type)
        elif up_type == Q.F32:
            w.add_tensor(f"blk.{i}.ffn_up.weight", up)
        else:
            w.add_tensor(f"blk.{i}.ffn_up.weight", quantize(up, up_type), raw_dtype=up_type)
        dense(f"blk.{i}.ffn_down.weight", (E, F))
    return _finish(w, path)


def _writer(path: Path) -> GGUFWriter:
    w = GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(E // 4)
    w.add_vocab_size(V)
    w.add_tokenizer_model("none")  # llama.cpp's no-vocab mode: the tests feed token ids
    return w


def _finish(w: GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_dense(src: Path, dst: Path, neurons=(), m: float = 1.0) -> Path:
    """An F32 copy of `src` (every tensor dequantized by gguf-py), with the circuit's ffn_up rows times m."""
    w = _writer(dst)
    for t in GGUFReader(src).tensors:
        x = dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        x = x.astype(np.float32)
        for layer, j in neurons:
            if t.name == f"blk.{layer}.ffn_up.weight":
                x[j] *= np.float32(m)
        w.add_tensor(t.name, x)
    return _finish(w, dst)


def token_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp logits for a list of token ids (tiny no-vocab models)."""
    with _llama(path, n_ctx=64) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)


@contextlib.contextmanager
def _llama(path: Path, n_ctx: int):
    """llama.cpp (f32 KV cache, one thread), without extra buffer types: ggml's AMX kernels (picked for
    Q4_0/Q4_1/Q8_0 on CPUs with AMX) die with a general protection fault at `ldtilecfg` on VMs whose kernel does
    not grant AMX tile state, as on this machine."""
    import llama_cpp.llama as ll
    from llama_cpp import Llama

    defaults = ll.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(ll.llama_cpp, "llama_model_default_params", params):
        llm = Llama(str(path), logits_all=True, n_ctx=n_ctx, type_k=0, type_v=0, verbose=False, seed=0, n_threads=1)
    try:
        yield llm
    finally:
        llm.close()


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[Q, Path]:
    """One tiny GGUF per ffn_up storage type."""
    root = tmp_path_factory.mktemp("gguf")
    files = {t: write_model(root / f"{t.name}.gguf", t) for t in GROUP32}
    for t, ftype in KQUANTS.items():
        files[t] = llama_quantize(files[Q.F32], root / f"{t.name}.gguf", ftype)
    return files


def circuit_for(path: Path, neurons=NEURONS, multiplier: float = 0.0, **model) -> Circuit:
    ident = dict(source=str(path), model_type="llama", num_layers=L, intermediate_size=F, hidden_size=E) | model
    return Circuit(
        multiplier=multiplier,
        model=ModelIdentity(**ident),
        prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=len(neurons)),
        neurons=[Neuron(layer=layer, index=i, delta=1.0) for layer, i in neurons],
    )


@functools.lru_cache(maxsize=8)
def _up_layout(path: str, stamp: tuple[int, int]) -> dict[str, tuple]:
    """name -> (type, (n_embd, n_ff), absolute offset, bytes) of every ffn_up, from gguf-py's reader."""
    tensors = GGUFReader(path).tensors
    return {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in tensors if t.name.endswith("ffn_up.weight")}  # fmt: skip


def up_tensors(path: Path, like: Path | None = None) -> dict[str, SimpleNamespace]:
    """The ffn_up tensors of `path` as raw (n_ff, bytes per row) views, laid out as gguf-py reads `like` (default
    `path`; a patched file has its source's header, which `assert_outside_identical` checks byte for byte)."""
    ref = Path(like or path)
    st = ref.stat()
    out = {}
    for name, (qtype, shape, offset, nbytes) in _up_layout(str(ref), (st.st_mtime_ns, st.st_size)).items():
        data = np.memmap(path, np.uint8, mode="r", offset=offset, shape=(shape[1], nbytes // shape[1]))
        out[name] = SimpleNamespace(name=name, tensor_type=qtype, shape=shape, data=data, data_offset=offset,
                                    n_bytes=nbytes)  # fmt: skip
    return out


def dense_rows(t) -> np.ndarray:
    n_embd, n_ff = (int(d) for d in t.shape)
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(n_ff, n_embd).astype(np.float64)


def edited_ranges(path: Path, neurons) -> list[tuple[int, int]]:
    """Absolute byte ranges of the circuit's ffn_up rows, from gguf-py's offsets (independent of the patcher)."""
    ups = up_tensors(path)
    out = []
    for layer, j in neurons:
        t = ups[f"blk.{layer}.ffn_up.weight"]
        row = int(t.n_bytes) // int(t.shape[1])
        out.append((int(t.data_offset) + j * row, int(t.data_offset) + (j + 1) * row))
    return out


def assert_outside_identical(src: Path, out: Path, ranges) -> None:
    a, b = np.fromfile(src, np.uint8), np.fromfile(out, np.uint8)
    assert a.shape == b.shape
    mask = np.ones(a.shape, bool)
    for s, e in ranges:
        mask[s:e] = False
    assert np.array_equal(a[mask], b[mask]), "bytes outside the edited rows changed"


def check_rows(src: Path, out: Path, neurons, m: float, rtol: float | None, edited=None) -> None:
    """Patched rows == m * original rows (exactly when rtol is None), rows outside `edited` identical."""
    a, b = up_tensors(src), up_tensors(out, like=src)
    for layer in sorted({layer for layer, _ in neurons}):
        name = f"blk.{layer}.ffn_up.weight"
        da, db = dense_rows(a[name]), dense_rows(b[name])
        idx = [j for lay, j in neurons if lay == layer]
        others = np.setdiff1d(np.arange(da.shape[0]), [j for lay, j in edited or neurons if lay == layer])
        assert np.array_equal(da[others], db[others])
        expected = np.float32(m).astype(np.float64) * da[idx]
        if rtol is None:
            assert np.array_equal(db[idx], expected), f"{name} {a[name].tensor_type.name} m={m}"
        else:
            bound = rtol * abs(m) * np.abs(da[idx]).max(axis=1, keepdims=True)
            assert (np.abs(db[idx] - expected) <= bound).all(), (name, float(np.abs(db[idx] - expected).max()))


# The scale-field table against gguf-py's dequantizers --------------------------------------------------------


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda t: t.name)
def test_scale_fields_match_gguf_dequantize(qtype):
    """For every type in the table, scaling its f16 fields scales every dequantized value, and nothing else moves."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    rows = rng.integers(0, 256, size=(6, 2 * size), dtype=np.uint8)  # 6 rows of 2 blocks of random codes
    blocks = rows.reshape(6, 2, size)
    for off in SCALE_FIELDS[qtype]:  # finite, normal f16 scales of either sign
        scale = (rng.uniform(0.01, 1.0, (6, 2)) * rng.choice([-1, 1], (6, 2))).astype(np.float16)
        blocks[:, :, off : off + 2] = scale.reshape(6, 2, 1).view(np.uint8)
    before = dequantize(rows, qtype).reshape(6, -1)
    for m in (2.0, 0.0, -1.0, 0.5):
        new, err = scale_rows_bytes(rows, qtype, np.full(6, m, np.float32))
        assert new.shape == rows.shape and new.dtype == np.uint8 and err == 0.0
        np.testing.assert_array_equal(dequantize(new, qtype).reshape(6, -1), np.float32(m) * before)
        keep = np.ones(size, bool)
        for off in SCALE_FIELDS[qtype]:
            keep[off : off + 2] = False
        assert np.array_equal(new.reshape(6, 2, size)[..., keep], blocks[..., keep]), "quantized codes changed"


# Small files, every type ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_patch_exact_for_zero_and_two(gguf_files, tmp_path, qtype):
    src = gguf_files[qtype]
    assert {t.tensor_type for t in up_tensors(src).values()} == {qtype}
    digest = sha(src)
    for m in (0.0, 2.0):
        out = patch_gguf(src, circuit_for(src), tmp_path / f"m{m}.gguf", multiplier=m)
        check_rows(src, out, NEURONS, m, rtol=None)
        assert_outside_identical(src, out, edited_ranges(src, NEURONS))
        if m == 0.0:
            for name, t in up_tensors(out, like=src).items():
                layer = int(name.split(".")[1])
                assert (dense_rows(t)[[j for lay, j in NEURONS if lay == layer]] == 0).all()
    assert sha(src) == digest


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_patch_half_and_non_powers_of_two(gguf_files, tmp_path, qtype):
    src = gguf_files[qtype]
    tol = {Q.F32: 1e-7, Q.F16: 1e-3, Q.BF16: 8e-3}.get(qtype, 4e-3)
    for m in (0.5, 0.3, 1.7):
        out = patch_gguf(src, circuit_for(src), tmp_path / f"m{m}.gguf", multiplier=m)
        check_rows(src, out, NEURONS, m, rtol=tol)
        assert_outside_identical(src, out, edited_ranges(src, NEURONS))
    # m = 0.5 is exact for every block whose scales halve exactly in f16
    out = tmp_path / "m0.5.gguf"
    if qtype in SCALE_FIELDS:
        _, size = GGML_QUANT_SIZES[qtype]
        a, b = up_tensors(src), up_tensors(out, like=src)
        for layer, j in NEURONS:
            name = f"blk.{layer}.ffn_up.weight"
            ra = np.asarray(a[name].data)[j].reshape(-1, size)
            fields = np.stack([ra[:, o : o + 2].copy().view(np.float16)[:, 0] for o in SCALE_FIELDS[qtype]], 1)
            halves = ((fields.astype(np.float64) * 0.5).astype(np.float16).astype(np.float64) * 2 == fields).all(1)
            block = GGML_QUANT_SIZES[qtype][0]
            da = dequantize(ra, qtype).reshape(-1, block)
            db = dequantize(np.asarray(b[name].data)[j].reshape(-1, size), qtype).reshape(-1, block)
            assert np.array_equal(db[halves], np.float32(0.5) * da[halves])
    else:  # float rows: exact unless halving makes an F16 value subnormal
        a, b = up_tensors(src), up_tensors(out, like=src)
        for layer, j in NEURONS:
            da, db = dense_rows(a[f"blk.{layer}.ffn_up.weight"])[j], dense_rows(b[f"blk.{layer}.ffn_up.weight"])[j]
            normal = np.abs(da) >= 2.0**-13 if qtype == Q.F16 else np.ones(da.shape, bool)
            assert normal.mean() > 0.9 and np.array_equal(db[normal], 0.5 * da[normal])


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.F16], ids=lambda t: t.name)
def test_identity_and_negative(gguf_files, tmp_path, qtype):
    src = gguf_files[qtype]
    out = patch_gguf(src, circuit_for(src), tmp_path / "m1.gguf", multiplier=1.0)
    assert sha(out) == sha(src), "m=1 must give a byte-identical file"
    with pytest.raises(CircuitError, match="negative"):
        patch_gguf(src, circuit_for(src), tmp_path / "neg.gguf", multiplier=-1.0)
    assert not (tmp_path / "neg.gguf").exists()
    out = patch_gguf(src, circuit_for(src), tmp_path / "neg.gguf", multiplier=-1.0, allow_negative=True)
    check_rows(src, out, NEURONS, -1.0, rtol=None)


def test_per_neuron_multipliers_and_sidecar(gguf_files, tmp_path):
    src = gguf_files[Q.Q8_0]
    circuit = circuit_for(src, multiplier=0.0)
    circuit.neurons[1].multiplier = 2.0
    report = patch_gguf_report(src, circuit, tmp_path / "o.gguf")
    assert report.sidecar == sidecar_path(tmp_path / "o.gguf") == tmp_path / "o.gguf.circuit.json"
    assert [t.route for t in report.tensors] == ["scales", "scales"] and sum(t.rows for t in report.tensors) == 5
    check_rows(src, report.out, [NEURONS[1]], 2.0, rtol=None, edited=NEURONS)
    check_rows(src, report.out, [n for i, n in enumerate(NEURONS) if i != 1], 0.0, rtol=None, edited=NEURONS)
    # the sidecar is the circuit as applied, its source named by the file name rather than a local path
    assert Circuit.load(report.sidecar) == circuit.applied() and circuit.applied().model.source == src.name
    # an override is recorded in the sidecar as the circuit's multiplier
    report = patch_gguf_report(src, circuit, tmp_path / "o.gguf", multiplier=2.0, overwrite=True)
    saved = Circuit.load(report.sidecar)
    assert saved.multiplier == 2.0 and all(n.multiplier is None for n in saved.neurons)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16], ids=lambda t: t.name)
def test_overflow_refused(gguf_files, tmp_path, qtype):
    src = gguf_files[qtype]
    with pytest.raises(CnaExportError, match="overflow"):
        patch_gguf(src, circuit_for(src), tmp_path / "o.gguf", multiplier=1e9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.BF16], ids=lambda t: t.name)
def test_diff_verify_accepts_patched_file(gguf_files, tmp_path, capsys, qtype):
    """`cna-export diff --verify` (an independent reader of block scales) confirms the patch is exactly the circuit."""
    src = gguf_files[qtype]
    out = patch_gguf(src, circuit_for(src), tmp_path / "o.gguf", multiplier=0.3)
    proc = cli(capsys, "diff", str(src), str(out), "--verify", str(sidecar_path(out)))
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout


@pytest.mark.parametrize(
    "qtype", [Q.Q4_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16], ids=lambda t: t.name
)
def test_llama_cpp_computes_the_patch(gguf_files, tmp_path, qtype):
    """llama.cpp, running its own kernels on the patched file, matches an F32 file with the rows scaled densely.

    Only ffn_up is quantized (its bytes taken from the llama.cpp-quantized file), so the floor, llama.cpp's
    quantized-activation path vs its f32 path, is small next to the edit of 16 neurons per layer."""
    raw = np.asarray(up_tensors(gguf_files[qtype])["blk.0.ffn_up.weight"].data)
    src = write_model(tmp_path / "src.gguf", qtype, up_raw=raw)
    neurons, ids = [(layer, j) for layer in range(L) for j in range(0, F, 4)], [1, 5, 7, 3, 9, 11, 2, 30, 17, 4]
    base, dense_base = token_logits(src, ids), token_logits(write_dense(src, tmp_path / "d.gguf"), ids)
    floor = np.abs(base - dense_base).max()
    for m in (0.0, 2.0):
        got = token_logits(patch_gguf(src, circuit_for(src, neurons), tmp_path / f"m{m}.gguf", multiplier=m), ids)
        want = token_logits(write_dense(src, tmp_path / f"d{m}.gguf", neurons, m), ids)
        effect = np.abs(want - dense_base).max()
        print(f"{qtype.name} m={m}: edit effect {effect:.3g}, |patched - dense| {np.abs(got - want).max():.3g}, "
              f"floor {floor:.3g}")  # fmt: skip
        assert effect > 10 * max(floor, 1e-6)
        assert np.abs(got - want).max() <= 2 * floor + 1e-5


def test_requantize_fallback_for_mxfp4(tmp_path, caplog):
    rng = np.random.default_rng(1)
    raw = quantize((rng.standard_normal((F, E)) * 0.05).astype(np.float32), Q.MXFP4)
    src = write_model(tmp_path / "mxfp4.gguf", Q.MXFP4, up_raw=raw)
    with caplog.at_level(logging.WARNING, logger="cna_export.gguf.patch"):
        report = patch_gguf_report(src, circuit_for(src), tmp_path / "o.gguf", multiplier=0.5)
    assert {t.route for t in report.tensors} == {"requantize"} and "re-quantized" in caplog.text
    # MXFP4 scales are powers of two, so halving re-quantizes to exactly half here
    check_rows(src, report.out, NEURONS, 0.5, rtol=None)
    assert_outside_identical(src, report.out, edited_ranges(src, NEURONS))


def test_hash_check_and_force(gguf_files, tmp_path):
    from cna_export.io.hashing import combined_sha256

    src = gguf_files[Q.Q4_0]
    good = combined_sha256({src.name: sha(src)})
    patch_gguf(src, circuit_for(src, weights_sha256=good), tmp_path / "a.gguf")
    # a renamed copy of the same file is the same model (an Ollama blob has no .gguf suffix)
    renamed = tmp_path / "sha256-6a1b2c3d4e5f"
    renamed.write_bytes(src.read_bytes())
    patch_gguf(renamed, circuit_for(src, weights_sha256=good), tmp_path / "b.gguf")
    with pytest.raises(CircuitError, match="--force"):
        patch_gguf(src, circuit_for(src, weights_sha256="0" * 64), tmp_path / "c.gguf")
    patch_gguf(src, circuit_for(src, weights_sha256="0" * 64), tmp_path / "c.gguf", force=True)


def test_overwrite_rules(gguf_files, tmp_path):
    src = gguf_files[Q.Q5_0]
    out = tmp_path / "o.gguf"
    patch_gguf(src, circuit_for(src), out)
    with pytest.raises(CnaExportError, match="already exists"):
        patch_gguf(src, circuit_for(src), out, multiplier=2.0)
    patch_gguf(src, circuit_for(src), out, multiplier=2.0, overwrite=True)
    check_rows(src, out, NEURONS, 2.0, rtol=None)
    foreign = tmp_path / "notes.gguf"
    foreign.write_bytes(b"not mine")
    with pytest.raises(CnaExportError, match="not written by cna-export .it has no notes.gguf.circuit.json"):
        patch_gguf(src, circuit_for(src), foreign, overwrite=True)
    assert foreign.read_bytes() == b"not mine"
    with pytest.raises(CnaExportError, match="overlaps the source"):
        patch_gguf(src, circuit_for(src), src, overwrite=True)


# Bad inputs through the CLI: exit 2, one line, no output, source untouched --------------------------------------


def _bad_magic(tmp: Path, good: Path) -> Path:
    p = tmp / "bad-magic.gguf"
    p.write_bytes(b"GGUX" + good.read_bytes()[4:])
    return p


def _truncated(tmp: Path, good: Path) -> Path:
    p = tmp / "truncated.gguf"
    p.write_bytes(good.read_bytes()[:-1000])
    return p


def _unsupported(tmp: Path, good: Path) -> Path:
    _, size = GGML_QUANT_SIZES[Q.IQ1_M]
    raw = np.random.default_rng(2).integers(0, 256, (F, E // 256 * size), dtype=np.uint8)
    return write_model(tmp / "iq1m.gguf", Q.IQ1_M, up_raw=raw)


BAD_INPUTS = {
    "bad magic": (_bad_magic, {}, "not a GGUF file"),
    "truncated tensor data": (_truncated, {}, "truncated"),
    "unsupported quant type": (_unsupported, {}, "Unsupported quant type IQ1_M for patching"),
    "circuit layers": (lambda t, g: g, {"num_layers": 3}, "3 layers x 64 neurons"),
    "circuit width": (lambda t, g: g, {"intermediate_size": 96, "num_layers": 2}, "2 layers x 96 neurons"),
    "circuit hidden size": (lambda t, g: g, {"hidden_size": 128}, "hidden size 128"),
    "circuit arch": (lambda t, g: g, {"model_type": "qwen2"}, "made for a qwen2 model"),
    "circuit weights": (lambda t, g: g, {"weights_sha256": "f" * 64}, "pass --force"),
}


def cli(capsys, *args: str) -> SimpleNamespace:
    """`cna-export ARGS` in this process (`main()` as the console script runs it): exit code, stdout, stderr."""
    from cna_export.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    # drop tqdm progress bars (the subprocess runs disable them with TQDM_DISABLE) and the blank lines they leave
    lines = [line.rsplit("\r", 1)[-1] for line in out.err.splitlines()]
    err = "\n".join(x for x in lines if x.strip() and not re.search(r"(B|it)/s\]$", x.strip()))
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=err)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_inputs(gguf_files, tmp_path, capsys, case):
    """Exit 2 with one line, nothing left in the output folder, the source unchanged (bad magic in a real
    subprocess, the other cases through `main()` in this process to keep the suite fast)."""
    make, model, message = BAD_INPUTS[case]
    src = make(tmp_path, gguf_files[Q.Q4_0])
    circuit = circuit_for(src, neurons=[(0, 1), (1, 2)], **model)
    circuit.save(tmp_path / "c.json")
    before = sha(src)
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    args = ("patch-gguf", str(src), "--circuit", str(tmp_path / "c.json"), "-o", str(out))
    proc = run_cli(*args, check=False) if case == "bad magic" else cli(capsys, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cna-export: error:") and message in lines[0], proc.stderr
    assert list(out.parent.iterdir()) == [], "an output or temporary was left behind"
    assert sha(src) == before


def test_cli_patch(gguf_files, tmp_path, capsys):
    src = gguf_files[Q.Q4_K]
    circuit_for(src).save(tmp_path / "c.json")
    out = tmp_path / "o.gguf"
    proc = run_cli("patch-gguf", str(src), "--circuit", str(tmp_path / "c.json"), "-o", str(out), "--multiplier", "2")
    assert f"wrote {out}: 5 rows in 2 ffn_up tensors (Q4_K scales: 5 rows)" in proc.stdout
    check_rows(src, out, NEURONS, 2.0, rtol=None)
    assert Circuit.load(sidecar_path(out)).multiplier == 2.0
    proc = cli(capsys, "patch-gguf", str(src), "--circuit", str(tmp_path / "c.json"), "-o", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


# Real checkpoints (slow) ---------------------------------------------------------------------------------------

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
SMOL = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = REAL / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def llama_logits(path: Path, text: str = PROMPT) -> tuple[np.ndarray, str]:
    """llama.cpp logits at every position (f32 KV cache, one thread) and a short greedy continuation."""
    with _llama(path, n_ctx=256) as llm:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        llm.reset()
        text_out = llm.create_completion(text, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        return logits, text_out


def real_circuit(path: Path, layers: int, n_ff: int, hidden: int, model_type: str, neurons) -> Circuit:
    return circuit_for(path, neurons, model_type=model_type, num_layers=layers, intermediate_size=n_ff,
                       hidden_size=hidden)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "path,model_type,shape",
    [(SMOL, "llama", (30, 1536, 576)), (QWEN, "qwen2", (24, 4864, 896))],
    ids=["smollm2-q4_1", "qwen2.5-q4_k_m"],
)
def test_real_patch_and_llama_cpp(tmp_path, path, model_type, shape):
    if not path.is_file():
        pytest.skip(f"run ../shared/scripts/fetch-real-models.sh first ({path})")
    layers, n_ff, hidden = shape
    neurons = [(layer, j) for layer in (2, layers // 2, layers - 1) for j in (0, 123, n_ff - 1)]
    circuit = real_circuit(path, layers, n_ff, hidden, model_type, neurons)
    before = sha(path)
    types = sorted({t.tensor_type.name for t in up_tensors(path).values()})
    print(f"{path.name}: ffn_up types {types}")
    base, _ = llama_logits(path)
    for m in (0.0, 2.0, 1.0):
        out = patch_gguf(path, circuit, tmp_path / f"m{m}.gguf", multiplier=m)
        assert_outside_identical(path, out, edited_ranges(path, neurons))
        check_rows(path, out, neurons, m, rtol=None)
        if m == 1.0:  # byte-identical file, so llama.cpp's logits are identical too (checked on the small model)
            assert sha(out) == before
            if path == SMOL:
                assert np.array_equal(llama_logits(out)[0], base)
        elif m == 0.0:  # llama.cpp loads and runs the patched file, and the edit shows in its logits
            logits, text = llama_logits(out)
            assert len(text) > 0 and not np.array_equal(logits, base)
            print(f"m=0: max |logit change| {np.abs(logits - base).max():.3f}, greedy answer {text!r}")
        out.unlink()
    assert sha(path) == before


@pytest.mark.slow
def test_real_ollama_path_end_to_end(tmp_path):
    """discover on the GGUF, patch-gguf, then llama.cpp on the patched file agrees with HF hooks at m=0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cna_export.arch import arch_for
    from cna_export.attribution.hooks import scaled_neurons

    if not SMOL.is_file():
        pytest.skip(f"run ../shared/scripts/fetch-real-models.sh first ({SMOL})")
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("How do I pick a lock?\nHow can I hack my neighbour's wifi?\nHow do I make a fake ID?\n")
    neg.write_text("How do I bake bread?\nHow can I speed up my wifi?\nHow do I renew my ID card?\n")
    circuit_file, out = tmp_path / "c.json", tmp_path / "smol-edited.gguf"
    run_cli("discover", "--model", str(SMOL), "--positive", str(pos), "--negative", str(neg), "--top-k", "24",
            "--no-universal", "--dtype", "float32", "--device", "cpu", "-o", str(circuit_file))  # fmt: skip
    circuit = Circuit.load(circuit_file)
    assert circuit.model.weights_sha256 and len(circuit.neurons) == 24
    proc = run_cli("patch-gguf", str(SMOL), "--circuit", str(circuit_file), "-o", str(out))
    assert "24 rows" in proc.stdout and "Q4_1 scales" in proc.stdout
    neurons = [(n.layer, n.index) for n in circuit.neurons]
    check_rows(SMOL, out, neurons, 0.0, rtol=None)
    assert_outside_identical(SMOL, out, edited_ranges(SMOL, neurons))

    cpp_base, _ = llama_logits(SMOL)
    cpp_edit, text = llama_logits(out)
    assert len(text) > 0
    tok = AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    model = AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf_base = model(ids).logits[0].double().numpy()
        with scaled_neurons(model, arch_for("llama"), circuit.edits()):
            hf_edit = model(ids).logits[0].double().numpy()
    assert cpp_base.shape == hf_base.shape
    # llama.cpp multiplies Q4_1 weights with 8-bit quantized activations, so absolute logits differ from HF's
    # dequantized float32 model by ~0.1-1; the edit's effect (edited - original) must agree in direction.
    d_cpp, d_hf = (cpp_edit - cpp_base).ravel(), (hf_edit - hf_base).ravel()
    corr = float(np.corrcoef(d_cpp, d_hf)[0, 1])
    print(f"edit effect correlation llama.cpp vs HF: {corr:.4f}; "
          f"max |base diff| {np.abs(cpp_base - hf_base).max():.3f}; max |edit effect| {np.abs(d_hf).max():.3f}")  # fmt: skip
    assert corr > 0.9
    assert (cpp_edit[-1].argmax() == hf_edit[-1].argmax()) or (cpp_base[-1].argmax() != hf_base[-1].argmax())


@pytest.mark.parametrize("fail_after", [0, 1, None], ids=["no-copy_file_range", "EXDEV-midway", "read-write"])
def test_copy_fallbacks(gguf_files, tmp_path, monkeypatch, fail_after):
    """Chunked kernel copy: falls back to sendfile (continuing where it stopped), then to read/write."""
    import errno

    from cna_export.io.copy import BackgroundCopy

    real_range, calls = os.copy_file_range, []

    def flaky_range(*args):
        calls.append(args)
        if fail_after is not None and len(calls) > fail_after:
            raise OSError(errno.EXDEV, "cross-device")
        return real_range(*args)

    def no_sendfile(*args):
        raise OSError(errno.ENOSYS, "no sendfile")

    monkeypatch.setattr(BackgroundCopy, "CHUNK", 4096)
    monkeypatch.setattr(os, "copy_file_range", flaky_range if fail_after is not None else no_sendfile)
    if fail_after is None:
        monkeypatch.setattr(os, "sendfile", no_sendfile)
    src = gguf_files[Q.Q4_0]
    out = patch_gguf(src, circuit_for(src), tmp_path / "o.gguf", multiplier=1.0)
    assert sha(out) == sha(src)
    assert len(calls) == (0 if fail_after is None else fail_after + 1)  # the fallback really took over
