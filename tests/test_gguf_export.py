"""HF folder -> GGUF: llama.cpp (llama-cpp-python) must give the logits and token ids transformers gives.

Tolerances (max |logit difference| on tiny random models, logits of size ~3; measured values in README.md):
f32 1e-4 (Gemma family 2e-3: ggml evaluates GELU through an f16 lookup table; emulating that table in
transformers brings the difference to ~2e-4), f16 1e-2, bf16 6e-2, q8_0 0.2. Random tiny models have near-ties,
so argmax agreement is required where transformers' top-2 margin exceeds twice the tolerance.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import sentencepiece
import torch
from conftest import ARCHS, make_circuit, run_cli
from gguf import GGMLQuantizationType, GGUFReader, Keys
from llama_cpp import Llama

from cna_export.arch import arch_for
from cna_export.errors import ArchitectureError, CheckpointError, CnaExportError, OutputError
from cna_export.gguf.convert import export_gguf
from cna_export.gguf.ollama import CHAT_FORMATS, chat_format, modelfile_text, write_modelfile
from cna_export.gguf.vocab import PRE_TOKENIZERS, pre_tokenizer

GEMMAS = {"gemma", "gemma2", "gemma3_text"}
TOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2, "q8_0": 0.2}
PROMPT = "How do I bake bread? def add(a, b): return a + b. Qu'est-ce que la photosynthese? The quick brown fox"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, Ærøskøbing; 東京タワー 🎉🚀 and ümlaut ß",
    "def add(a, b):\n    return a + b  # 0123456789 {}[]()<>=+-*/\n\tindented\r\n",
    "  leading spaces,   runs of   spaces and trailing  ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def tolerance(arch: str, outtype: str) -> float:
    return 2e-3 if outtype == "f32" and arch in GEMMAS else TOL[outtype]


def hf_logits(folder: Path, ids: list[int], edits=None) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    from cna_export.attribution.hooks import scaled_neurons

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if edits is None:
            return model(torch.tensor([ids])).logits[0].numpy()
        with scaled_neurons(model, arch_for(model.config.model_type), edits):
            return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp.llama as ll

    # Without extra buffer types: ggml's AMX kernels (picked for Q8_0 on CPUs with AMX) crash at `ldtilecfg` on VMs
    # whose kernel does not grant AMX tile state, as here (also for files from llama.cpp's own quantizer).
    defaults = ll.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(ll.llama_cpp, "llama_model_default_params", params):
        llm = Llama(str(path), logits_all=True, n_ctx=256, type_k=0, type_v=0, verbose=False, seed=0, n_threads=1)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def assert_logits_close(got: np.ndarray, ref: np.ndarray, tol: float) -> float:
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"max |logit diff| {diff:.2e} > {tol:.0e}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()
    return diff


@pytest.fixture(scope="module")
def prompt_ids(tiny_models) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_models["llama"])(PROMPT)["input_ids"]
    assert len(ids) > 16 + 8  # longer than the tiny Gemma 2/3 sliding window
    return ids


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(arch, tiny_models, prompt_ids, tmp_path):
    out = export_gguf(tiny_models[arch], tmp_path / f"{arch}.gguf", outtype="f32")
    assert_logits_close(llama_logits(out, prompt_ids), hf_logits(tiny_models[arch], prompt_ids), tolerance(arch, "f32"))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_outtypes(arch, outtype, tiny_models, prompt_ids, tmp_path):
    out = export_gguf(tiny_models[arch], tmp_path / f"{arch}-{outtype}.gguf", outtype=outtype)
    got = llama_logits(out, prompt_ids)
    assert_logits_close(got, hf_logits(tiny_models[arch], prompt_ids), tolerance(arch, outtype))
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    want = {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
    assert types["blk.0.ffn_gate.weight"] == want[outtype]
    assert all(kind == GGMLQuantizationType.F32 for name, kind in types.items() if "norm" in name)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_weights_bytes_equal_llama_cpp_quantizer(outtype, tiny_models, tmp_path):
    """Our f16/bf16/q8_0 tensors are byte for byte what llama.cpp's own quantizer makes from our f32 file."""
    import ctypes

    import llama_cpp

    f32 = export_gguf(tiny_models["llama"], tmp_path / "f32.gguf", outtype="f32")
    ours = export_gguf(tiny_models["llama"], tmp_path / "ours.gguf", outtype=outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]  # LLAMA_FTYPE_MOSTLY_*
    ref = tmp_path / "ref.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: t for t in GGUFReader(ref).tensors}
    compared = 0
    for t in GGUFReader(ours).tensors:
        if t.tensor_type == theirs[t.name].tensor_type:
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
            compared += 1
    assert compared >= len(theirs) - 2  # llama.cpp may pick other types for token_embd/output only


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # rope permutation / query-scale folding on edited weights
def test_edited_export_matches_runtime_hooks(arch, tiny_models, prompt_ids, tmp_path):
    from cna_export.fold.export import apply_circuit
    from cna_export.io.source import resolve

    folder = tiny_models[arch]
    circuit = make_circuit(folder, [(0, 3), (0, 17), (1, 5), (1, 40)])
    for m in (0.0, 2.0):
        edited = apply_circuit(resolve(str(folder)), circuit, tmp_path / f"m{m:g}", multiplier=m)
        out = export_gguf(edited, tmp_path / f"m{m:g}.gguf", outtype="f32")
        expected = hf_logits(folder, prompt_ids, circuit.edits(m))
        assert np.abs(expected - hf_logits(folder, prompt_ids)).max() > 1e-3  # the edit changes the logits
        assert_logits_close(llama_logits(out, prompt_ids), expected, tolerance(arch, "f32"))
        meta = GGUFReader(out).get_field("cna_export.circuit_sha256")
        assert meta is not None and meta.contents() == circuit.sha256()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # (transformers' GGUF loader ignores qwen3's key_length)
def test_gguf_reads_back_as_a_cna_export_source(arch, tiny_models, prompt_ids, tmp_path):
    """The GGUF passes the project's header check and loads back through transformers as a source."""
    from transformers import AutoModelForCausalLM

    from cna_export.gguf.check import check_gguf
    from cna_export.io.source import describe, resolve

    out = export_gguf(tiny_models[arch], tmp_path / f"{arch}.gguf", outtype="f32")
    check_gguf(out)
    spec, shape, _ = describe(resolve(str(out)))
    assert spec.model_type == arch and shape.num_layers == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([prompt_ids])).logits[0].numpy()
    assert_logits_close(got, hf_logits(tiny_models[arch], prompt_ids), 1e-5)


def test_tokenizer_parity_tiny(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_models["qwen2"]
    out = export_gguf(folder, tmp_path / "tok.gguf", outtype="f16")
    check_tokenizer_parity(AutoTokenizer.from_pretrained(folder), out)


def check_tokenizer_parity(tok, gguf_path: Path) -> None:
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    prefix = GGUFReader(gguf_path).get_field(Keys.Tokenizer.ADD_PREFIX)
    prefix = prefix is not None and prefix.contents()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Écris une fonction 排序 😀"}, {"role": "assistant", "content": "def f(x): ..."}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    for text in [*TEXTS, chat]:
        if prefix and (text.startswith(" ") or any(t in text for t in tok.all_special_tokens)):
            # SentencePiece with a prefix space (Llama 2, Mistral): llama.cpp prepends "▁" to the text and to every
            # run after a special token, and before a leading space too (as SentencePiece does, checked in
            # test_sentencepiece_tokenizer); transformers' Metaspace(prepend_scheme="first") does neither.
            continue
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        text_back = llm.detokenize(want, special=True).decode("utf-8")
        if prefix and text_back.startswith(" "):  # llama.cpp keeps SentencePiece's added prefix space; HF drops it
            text_back = text_back[1:]
        assert text_back == tok.decode(want), text
    # add_bos/add_eos follow transformers: tokenizing with special tokens adds what transformers adds.
    assert llm.tokenize(TEXTS[0].encode(), add_bos=True, special=True) == tok(TEXTS[0])["input_ids"]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([{"type": "ByteLevel", "use_regex": True}], "gpt-2"),
        ([{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}], "smollm"),
        ([{"type": "Split", "pattern": {"Regex": next(iter(PRE_TOKENIZERS))}}, {"type": "ByteLevel", "use_regex": False}],
         "llama-bpe"),
        ([{"type": "Whitespace"}], "default"),
    ],
)  # fmt: skip
def test_pre_tokenizer_from_structure(steps, expected):
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}}) == expected


SPM_STYLES = {
    # model type, tokenizer class, SentencePiece prefix space, special pieces (pad, eos, bos, unk), chat template
    "gemma": ("gemma", "GemmaTokenizer", False, ("<pad>", "<eos>", "<bos>", "<unk>"),
              "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "mistral": ("mistral", "LlamaTokenizer", True, ("<pad>", "</s>", "<s>", "<unk>"),
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SPM_STYLES))
def spm_model(request, tmp_path_factory) -> Path:
    """A tiny model whose tokenizer is SentencePiece (tokenizer.model + transformers' class for that family)."""
    import io

    import sentencepiece as spm
    import transformers
    from conftest import CORPUS, TINY
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.convert_slow_tokenizer import generate_merges

    model_type, cls, prefix, (pad, eos, bos, unk), template = SPM_STYLES[request.param]
    folder = tmp_path_factory.mktemp(f"{request.param}-spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=450, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece=pad, eos_piece=eos, bos_piece=bos, unk_piece=unk, add_dummy_prefix=prefix,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {piece: sp.get_score(i) for piece, i in vocab.items()})
    tok = getattr(transformers, cls)(vocab=vocab, merges=merges, pad_token=pad, eos_token=eos, bos_token=bos,
                                     unk_token=unk, add_bos_token=True,
                                     extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])  # fmt: skip
    tok.chat_template = template
    tok.save_pretrained(folder)
    config = AutoConfig.for_model(model_type, vocab_size=512, max_position_embeddings=256, bos_token_id=2,
                                  eos_token_id=1, pad_token_id=0, **TINY[model_type].config)  # fmt: skip
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer(spm_model, tmp_path):
    from transformers import AutoTokenizer

    out = export_gguf(spm_model, tmp_path / "spm.gguf", outtype="f32")
    reader = GGUFReader(out)
    assert reader.get_field(Keys.Tokenizer.MODEL).contents() == "llama"
    assert reader.get_field(Keys.Tokenizer.ADD_BOS).contents() is True
    tok = AutoTokenizer.from_pretrained(spm_model)
    check_tokenizer_parity(tok, out)
    if reader.get_field(Keys.Tokenizer.ADD_PREFIX).contents():  # text with a leading space: as SentencePiece does
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
        llm = Llama(str(out), vocab_only=True, verbose=False)
        text = "  leading spaces,   runs of   spaces"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    arch = reader.get_field(Keys.General.ARCHITECTURE).contents()
    assert_logits_close(llama_logits(out, ids), hf_logits(spm_model, ids), tolerance(arch, "f32"))
    fmt = chat_format(reader.get_field(Keys.Tokenizer.CHAT_TEMPLATE).contents())
    assert fmt is not None and fmt.name == {"gemma": "gemma", "llama": "mistral"}[arch]


def test_metadata_and_fallbacks(tiny_models, tmp_path):
    out = export_gguf(tiny_models["qwen2"], tmp_path / "q.gguf", outtype="q8_0")
    reader = GGUFReader(out)
    assert reader.get_field(Keys.General.ARCHITECTURE).contents() == "qwen2"
    assert reader.get_field(Keys.General.FILE_TYPE).contents() == 7
    assert reader.get_field(Keys.Tokenizer.MODEL).contents() == "gpt2"
    # transformers loads a qwen2 folder with the Qwen2 tokenizer class, whose regex split is llama.cpp's "qwen2".
    assert reader.get_field(Keys.Tokenizer.PRE).contents() == "qwen2"
    assert "<|im_start|>" in reader.get_field(Keys.Tokenizer.CHAT_TEMPLATE).contents()
    assert reader.get_field(Keys.Tokenizer.EOS_ID).contents() == 2
    types = {t.name: t.tensor_type for t in reader.tensors}
    # qwen2's MLP is 112 wide: down_proj rows are not whole 32-value Q8_0 blocks, so they stay F16 (as llama.cpp).
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.attn_q.bias"] == GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied embeddings


def test_llama3_rope_scaling(tmp_path):
    from conftest import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "llama31"
    folder.mkdir()
    tok = build_tokenizer(folder)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rope_parameters=rope, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    ids = tok((PROMPT + " ") * 3)["input_ids"]
    out = export_gguf(folder, tmp_path / "l31.gguf", outtype="f32")
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(out).tensors}
    assert_logits_close(llama_logits(out, ids), hf_logits(folder, ids), TOL["f32"])


def test_bad_inputs_and_no_partial_output(tiny_models, tmp_path, monkeypatch):
    folder = tiny_models["llama"]
    with pytest.raises(CnaExportError, match="outtype"):
        export_gguf(folder, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(CnaExportError, match=r"\.gguf"):
        export_gguf(folder, tmp_path / "x.bin")
    (tmp_path / "exists.gguf").write_bytes(b"old")
    with pytest.raises(OutputError, match="--overwrite"):
        export_gguf(folder, tmp_path / "exists.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputError, match="is an existing folder, and this output is a file"):
        export_gguf(folder, tmp_path / "dir.gguf", overwrite=True)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ArchitectureError, match="Unsupported model_type"):
        export_gguf(odd, tmp_path / "odd.gguf")
    with pytest.raises(CheckpointError, match="config.json"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")

    import cna_export.gguf.convert as ge

    calls = []

    def failing(reader, t):  # fail after a few tensors have been written
        calls.append(t.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(reader, t)

    original = ge._convert
    monkeypatch.setattr(ge, "_convert", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(folder, tmp_path / "exists.gguf", overwrite=True)
    assert (tmp_path / "exists.gguf").read_bytes() == b"old"  # the previous file is untouched
    assert not [p.name for p in tmp_path.iterdir() if "cna-tmp" in p.name]  # no temporary left behind


@pytest.mark.parametrize("fmt", CHAT_FORMATS, ids=lambda f: f.name)
def test_modelfile_recognises_chat_formats(fmt):
    jinja = "{% for m in messages %}" + fmt.marker + "{{ m['content'] }}{% endfor %}"
    assert chat_format(jinja) == fmt
    text = modelfile_text("m.gguf", jinja)
    assert "FROM ./m.gguf" in text and 'TEMPLATE """' in text
    assert [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop")] == list(fmt.stops)
    assert "{{ .Prompt }}" in text and "{{ .Response }}" in text


def test_modelfile_default_system_and_unknown_template():
    smol = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named "
            "SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}")  # fmt: skip
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile_text(
        "s.gguf", smol
    )
    text = modelfile_text("u.gguf", "{{ bos_token }}{% for m in messages %}### {{ m['content'] }}{% endfor %}")
    assert not [line for line in text.splitlines() if line.startswith("TEMPLATE")] and "# No TEMPLATE" in text
    assert "PARAMETER stop" not in text


def test_cli_gguf_modelfile_and_ollama_create(tiny_models, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "ollama-argv.txt"
    bin_dir.mkdir()
    fake = bin_dir / "ollama"
    fake.write_text(f"#!{sys.executable}\nimport os, sys\nopen({str(log)!r}, 'w').write(os.getcwd() + '\\n' + "
                    "'\\n'.join(sys.argv[1:]))\n")  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "models" / "tiny.gguf"
    out.parent.mkdir()
    proc = run_cli("gguf", str(tiny_models["llama"]), "-o", str(out), "--outtype", "f32", "--ollama-create", "tiny-x")
    assert "created Ollama model tiny-x" in proc.stdout
    modelfile = out.parent / "Modelfile"
    assert "FROM ./tiny.gguf" in modelfile.read_text() and "<|im_start|>assistant" in modelfile.read_text()
    cwd, *argv = log.read_text().splitlines()
    assert argv == ["create", "tiny-x", "-f", str(modelfile)] and cwd == str(out.parent)
    again = run_cli("gguf", str(tiny_models["llama"]), "-o", str(out), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CnaExportError, match="ollama is not on PATH"):
        from cna_export.gguf.ollama import ollama_create

        ollama_create("tiny-x", modelfile)
    with pytest.raises(OutputError):
        write_modelfile(out)  # exists, no overwrite


def test_cli_apply_with_gguf(tiny_models, tmp_path, prompt_ids):
    folder = tiny_models["qwen3"]
    circuit = make_circuit(folder, [(1, 7), (1, 9)], multiplier=0.0)
    circuit.save(tmp_path / "c.json")
    out = tmp_path / "edited"
    proc = run_cli("apply", "--model", str(folder), "--circuit", str(tmp_path / "c.json"), "--out", str(out),
                   "--gguf", "f32")  # fmt: skip
    gguf_path = out / "edited-f32.gguf"  # inside the export folder, listed in its model card
    assert f"wrote {gguf_path}" in proc.stdout
    assert "edited-f32.gguf" in (out / "README.md").read_text()
    assert_logits_close(llama_logits(gguf_path, prompt_ids), hf_logits(out, prompt_ids), TOL["f32"])


# Real model ----------------------------------------------------------------------------------------------------

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
SMOL = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory) -> Path:
    from cna_export.fold.export import materialize_gguf
    from cna_export.io.source import resolve

    folder = tmp_path_factory.mktemp("smol-hf")
    materialize_gguf(resolve(str(SMOL)), folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_file(), reason=f"run scripts/fetch-real-models.sh first ({SMOL})")
def test_real_smollm2_f16_logits_tokens_and_generation(smol_folder, tmp_path):
    from transformers import AutoTokenizer

    out = export_gguf(smol_folder, tmp_path / "smol-f16.gguf", outtype="f16")
    tok = AutoTokenizer.from_pretrained(smol_folder)
    check_tokenizer_parity(tok, out)
    for question in ["What is the capital of France?", "Write a haiku about rain."]:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # f16 weights (and f16 activations in llama.cpp's matmuls) over 30 layers: logits of size ~38 differ by
        # 0.04-0.08 here, depending on the CPU kernels llama.cpp picks.
        assert_logits_close(llama_logits(out, ids), hf_logits(smol_folder, ids), 0.25)
    llm = Llama(str(out), n_ctx=256, verbose=False, seed=0, n_threads=2)
    answer = llm.create_completion(text, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert answer.strip()


def test_apply_gguf_failure_leaves_no_export(tiny_models, tmp_path, monkeypatch):
    """--gguf is converted inside the staged folder: a failing conversion leaves no half export behind."""
    import cna_export.gguf.convert as gguf_export
    from cna_export.backends.options import ExportOptions
    from cna_export.fold.export import apply_circuit
    from cna_export.io.source import resolve

    def broken(folder, out, **kwargs):
        Path(out).write_bytes(b"partial")
        raise CnaExportError("GGUF conversion failed.", "none")

    monkeypatch.setattr(gguf_export, "export_gguf", broken)
    folder = tiny_models["llama"]
    with pytest.raises(CnaExportError, match="conversion failed"):
        apply_circuit(
            resolve(str(folder)),
            make_circuit(folder, [(1, 7)], multiplier=0.0),
            tmp_path / "o",
            ExportOptions(gguf="f16"),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
