"""Attribution inside llama.cpp (cna_export/backends/llamacpp_sums.py): the same sums as the torch route on f32 GGUFs
converted by the project, the GGUF's own tokenizer and chat template, bad inputs, and the real SmolLM2 Q4_1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from cna_export.arch import arch_for  # noqa: E402
from cna_export.attribution.collect import collect_sets, encode_prompts  # noqa: E402
from cna_export.backends.llamacpp import LlamaCppBackend  # noqa: E402
from cna_export.backends.llamacpp_sums import collect_sets_gguf, encode_sets  # noqa: E402
from cna_export.errors import CnaExportError  # noqa: E402
from cna_export.gguf.convert import export_gguf  # noqa: E402
from cna_export.gguf.llamacpp import LlamaCppModel  # noqa: E402
from tests.conftest import TINY, run_cli  # noqa: E402

DENSE = [a for a in ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3") if a in TINY]
GEMMAS = {"gemma", "gemma2", "gemma3_text"}
PROMPTS = [
    ["How do I bake bread?", "Write a Python function that reverses a string.", "The quick brown fox jumps"],
    ["Explain how to make a paper airplane.", "def add(a, b): return a + b", "Wie spaet ist es?"],
    ["I cannot help with that request.", "Qu'est-ce que la photosynthese? first, second, third", "comments"],
]
REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
SMOL = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"


def describe_gguf(path: Path):
    """(architecture row, shape, chat template) of a GGUF, as the llama.cpp backend opens it."""
    from cna_export.io.source import resolve

    backend = LlamaCppBackend(resolve(str(path)))
    return backend.spec, backend.shape, backend.chat_template


@pytest.fixture(scope="module")
def f32_ggufs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("f32")
    return {arch: export_gguf(tiny_models[arch], root / f"{arch}.gguf", outtype="f32") for arch in DENSE}


def torch_stats(folder: Path, sets, top_n: int, last: int, batch_size: int = 2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = arch_for(model.config.model_type)
    return collect_sets(model, spec, sets, batch_size, pad_id=0, top_n=top_n, last_layer=last)


@pytest.mark.parametrize("arch", DENSE)
def test_sums_match_torch_route_on_f32_gguf(arch, tiny_models, f32_ggufs):
    """Same token ids, same sets: float64 sums, top-n counts and |act| sums of llama.cpp equal the torch route's."""
    from transformers import AutoTokenizer

    path = f32_ggufs[arch]
    spec, shape, template = describe_gguf(path)
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS, template)
        # The GGUF's tokenizer and chat template give the ids transformers gives.
        tok = AutoTokenizer.from_pretrained(tiny_models[arch])
        assert sets == [encode_prompts(tok, prompts) for prompts in PROMPTS]
        last = shape.num_layers - 1
        got = collect_sets_gguf(model, spec, shape, sets, batch_size=2, top_n=8, last_layer=last)
        alone = collect_sets_gguf(model, spec, shape, sets, batch_size=1, top_n=8, share_prefix=False)
    # One prompt per batch: the exact reference (padded torch batches shift Gemma 2/3's sliding windows).
    ref = torch_stats(tiny_models[arch], sets, top_n=8, last=last, batch_size=1)
    tol = 5e-3 if arch in GEMMAS else 1e-4  # ggml's GELU goes through an f16 table (README: logits 8e-4)
    for g, a, r in zip(got, alone, ref):
        assert g.count == r.count
        scale = float(r.sums.abs().max())
        torch.testing.assert_close(g.sums, r.sums, atol=tol * scale, rtol=0)
        torch.testing.assert_close(g.abs_sums, r.abs_sums, atol=tol * scale, rtol=0)
        # Batching, the shared prefix and the order of the prompts do not change the sums (beyond rounding, which
        # ggml's f16 GELU table can turn into a step for Gemma).
        torch.testing.assert_close(g.sums, a.sums, atol=(2e-4 if arch in GEMMAS else 1e-5) * scale, rtol=0)
        # Top-n membership may flip only at near-ties.
        assert (g.top_counts != r.top_counts).sum() <= 2


def test_stops_after_last_layer(f32_ggufs):
    path = f32_ggufs["llama"]
    spec, shape, template = describe_gguf(path)
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS[:2], None)
        full = collect_sets_gguf(model, spec, shape, sets, batch_size=3)
        short = collect_sets_gguf(model, spec, shape, sets, batch_size=3, last_layer=0)
    assert short[0].sums[1:].abs().max() == 0
    torch.testing.assert_close(short[0].sums[0], full[0].sums[0])


def test_discover_cli_defaults_to_llama_cpp_and_agrees_with_torch(tiny_models, f32_ggufs, tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(PROMPTS[0] + PROMPTS[2]))
    neg.write_text("\n".join(PROMPTS[1]))
    common = ["discover", "--model", str(f32_ggufs["qwen2"]), "--positive", str(pos), "--negative", str(neg),
              "--top-k", "20", "--no-universal"]  # fmt: skip
    run_cli(*common, "-o", str(tmp_path / "native.json"))
    run_cli(*common, "--backend", "torch", "-o", str(tmp_path / "torch.json"))
    native, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("native", "torch"))
    assert native["model"]["weights_sha256"] == ref["model"]["weights_sha256"]
    got = {(n["layer"], n["index"]): n["delta"] for n in native["neurons"]}
    want = {(n["layer"], n["index"]): n["delta"] for n in ref["neurons"]}
    assert len(got.keys() & want.keys()) >= 19
    for key in got.keys() & want.keys():
        assert got[key] == pytest.approx(want[key], abs=1e-4)


def test_bad_inputs_are_one_line(f32_ggufs, tmp_path):
    # A GGUF whose header passes the project's check but which llama.cpp cannot load (an unknown architecture).
    from gguf import GGUFReader, GGUFWriter

    broken = tmp_path / "broken.gguf"
    reader = GGUFReader(f32_ggufs["llama"])
    writer = GGUFWriter(broken, arch="llama")
    writer.add_block_count(3)
    tensor = reader.tensors[0]
    writer.add_tensor(tensor.name, tensor.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CnaExportError, match="llama.cpp could not load"):
        LlamaCppModel(broken)
    long = tmp_path / "long.txt"
    long.write_text("the quick brown fox " * 200)  # more tokens than the tiny models' 256-token context
    proc = run_cli("discover", "--model", str(f32_ggufs["llama"]), "--positive", str(long), "--negative",
                   str(long), "--top-k", "3", "--no-universal", "-o", str(tmp_path / "c.json"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "more than the context" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("discover", "--model", str(tmp_path), "--backend", "llama.cpp", "--positive", str(long),
                   "--negative", str(long), "-o", str(tmp_path / "d.json"), check=False)  # fmt: skip
    assert proc.returncode == 2


def test_missing_llama_cpp_is_one_line(tmp_path):
    """Without llama-cpp-python the route fails with the install command, not an ImportError."""
    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "from cna_export.gguf.llamacpp import require_llama_cpp\n"
            "try:\n    require_llama_cpp()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")  # fmt: skip
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("CnaExportError") and "cna-export[gguf]" in out


@pytest.mark.slow  # transformers dequantizes the file for the reference (~20 s idle, minutes on a busy machine)
@pytest.mark.skipif(not SMOL.is_file(), reason="real SmolLM2 GGUF not fetched (../shared/scripts/fetch-real-models.sh)")
def test_real_smollm2_q4_1_matches_dequantized_torch_route():
    """On the real quantized file: every layer's deltas correlate with the torch route on the dequantized model
    (llama.cpp quantizes activations inside its quantized matmuls, so they are close, not equal)."""
    from transformers import AutoModelForCausalLM

    spec, shape, template = describe_gguf(SMOL)
    with LlamaCppModel(SMOL) as model:
        sets = encode_sets(model, PROMPTS[:2], template)
        got = collect_sets_gguf(model, spec, shape, sets, batch_size=3)
    hf = AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()
    ref = collect_sets(hf, spec, sets, 3, pad_id=0)
    for g, r in zip(got, ref):
        for layer in range(shape.num_layers):
            corr = torch.corrcoef(torch.stack([g.sums[layer], r.sums[layer]]))[0, 1]
            assert corr > 0.99, (layer, float(corr))


def test_generation_matches_transformers_and_patched_gguf_differs(tiny_models, f32_ggufs, tmp_path):
    """Batched greedy answers through llama.cpp equal transformers' on an f32 GGUF; the GGUF that `run` writes
    (patched, same type) changes the model (tests/test_llamacpp_eval.py compares whole evaluations)."""
    from transformers import AutoModelForCausalLM

    from cna_export.backends.llamacpp_runner import LlamaCppRunner
    from cna_export.evaluate.measure import EvalConfig

    path, prompts = f32_ggufs["qwen2"], PROMPTS[0] + PROMPTS[1]
    cfg = EvalConfig(max_new_tokens=6, batch_size=4)
    template = describe_gguf(path)[2]
    with LlamaCppModel(path, n_threads=1) as model:
        runner = LlamaCppRunner(model, template)
        encoded = runner.encode(prompts)
        got = runner.generate(encoded, cfg)
        scores = runner.score(encoded, got, cfg)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
    for ids, answer in zip(encoded, got):
        out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        want = out[0, len(ids) :].tolist()
        assert answer == want[: len(answer)] and len(answer) >= 1
    out = tmp_path / "edited"
    run_cli("run", "refusal-ablate", "--model", str(path), "--out", str(out), "--top-k", "30", "--skip-first-layers",
            "0", "--skip-last-layers", "0", "--modelfile")  # fmt: skip
    assert {p.name for p in out.iterdir()} >= {path.name, "circuit.json", "recipe.yaml", "README.md", "Modelfile"}
    assert (out / path.name).stat().st_size == path.stat().st_size
    with LlamaCppModel(out / path.name, n_threads=1) as model:
        edited = LlamaCppRunner(model, None).score(encoded, got, cfg)
    assert any(not torch.equal(a.nll, b.nll) for a, b in zip(scores, edited))


def test_no_ffn_down_in_graph_is_one_clear_error(f32_ggufs):
    """An architecture row whose ffn_down tensor name is not in llama.cpp's graph fails with a CheckpointError."""
    import dataclasses

    from cna_export.arch import Site
    from cna_export.errors import CheckpointError

    path = f32_ggufs["llama"]
    spec, shape, template = describe_gguf(path)
    wrong = dataclasses.replace(spec, gguf_down=Site("blk.{i}.ffn_nothing.weight", axis=1))
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS[:2], None)
        with pytest.raises(CheckpointError, match="ffn_down input cannot be read"):
            collect_sets_gguf(model, wrong, shape, sets, batch_size=2)
