"""Attribution inside llama.cpp on mixtures of experts (backends/llamacpp_sums.py, the MoE part of gguf/tap.py's
tap): on f32 GGUFs that llama.cpp's converter writes from the tiny MoE models, llama.cpp's SetStats (sums, top-n
counts, |act| sums, routing counts) equal the torch route's on the same token ids, batched or not; `discover` on
the GGUF gives the torch route's circuit and `run` patches its experts; a row whose weights the tap cannot find is
one line, exit 2.

Conversion is llama.cpp's converter in a child process (`hf_to_gguf` fixture), 5-20 s a file on 2 cores. Where
the tiny model (cna_export/testing) has a layout that the converter or llama.cpp refuses (tests/test_experts_gguf.py),
the model here changes only that: Qwen3-MoE without its dense layer (the qwen3moe graph has none), OLMoE with as
many key/value heads as query heads. DeepSeek-V3 (llama.cpp's `deepseek2`) brings the dense layer, an ungated
shared expert and grouped, bias-corrected, scaled sigmoid routing; its config.json says `scoring_func: sigmoid`
as the Hub's does (transformers 5 does not write the key, and without it llama.cpp routes with a softmax).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from conftest import build_model, run_cli  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cna_export.arch import arch_for  # noqa: E402
from cna_export.arch.experts import SHARED  # noqa: E402
from cna_export.attribution.collect import collect_sets, encode_prompts  # noqa: E402
from cna_export.backends.llamacpp import LlamaCppBackend  # noqa: E402
from cna_export.backends.llamacpp_sums import collect_sets_gguf, encode_sets  # noqa: E402
from cna_export.errors import CheckpointError  # noqa: E402
from cna_export.gguf.convert import export_gguf  # noqa: E402
from cna_export.gguf.external import ENV  # noqa: E402
from cna_export.gguf.llamacpp import LlamaCppModel  # noqa: E402

# family -> config changes from the tiny model (see the module docstring)
FAMILIES = {
    "qwen2_moe": {},
    "mixtral": {},
    "qwen3_moe": dict(mlp_only_layers=[]),
    "olmoe": dict(num_key_value_heads=4),
    "deepseek_v3": dict(scoring_func="sigmoid"),
}
PROMPTS = [
    ["How do I bake bread?", "Write a Python function that reverses a string.", "The quick brown fox jumps",
     "Sure, first"],
    ["Explain how to make a paper airplane.", "def add(a, b): return a + b", "Wie spaet ist es?", "0123456789 {}"],
    ["I cannot help with that request.", "Qu'est-ce que la photosynthese? first, second, third", "comments"],
]  # fmt: skip
TOL = 1e-4  # of the largest value: llama.cpp f32 (f32 KV cache) vs transformers fp32


def describe_gguf(path: Path):
    """(architecture row, shape, chat template) of a GGUF, as the llama.cpp backend opens it."""
    from cna_export.io.source import resolve

    backend = LlamaCppBackend(resolve(str(path)))
    return backend.spec, backend.shape, backend.chat_template


@pytest.fixture(scope="module")
def moe_ggufs(hf_to_gguf, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (the tiny model's folder, its f32 GGUF through llama.cpp's converter)."""
    root = tmp_path_factory.mktemp("llamacpp-moe")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, hf_to_gguf)
        for arch, changes in FAMILIES.items():
            src = build_model(root / arch, arch, **changes)
            out[arch] = (src, export_gguf(src, root / f"{arch}.f32.gguf", outtype="f32"))
    return out


def torch_stats(folder: Path, sets, top_n: int | None, batch_size: int, last: int | None = None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = arch_for(model.config.model_type)
    return collect_sets(model, spec, sets, batch_size, pad_id=0, top_n=top_n, last_layer=last)


@pytest.mark.parametrize("arch", FAMILIES)
def test_stats_match_torch_route(arch, moe_ggufs):
    """Same token ids: llama.cpp's float64 sums, |act| sums, per-expert top-n counts and routing counts equal the
    torch route's (router weight x down input, zero where a token is not routed), one prompt per decode or batched
    with a shared prefix, against torch one prompt per pass or left-padded batches of three."""
    folder, path = moe_ggufs[arch]
    spec, shape, template = describe_gguf(path)
    assert spec.model_type == arch and shape.moe is not None
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS, template)
        assert sets == [encode_prompts(AutoTokenizer.from_pretrained(folder), p) for p in PROMPTS]
        got = collect_sets_gguf(model, spec, shape, sets, batch_size=3, top_n=2)
        alone = collect_sets_gguf(model, spec, shape, sets, batch_size=1, top_n=2, share_prefix=False)
    ref, padded = (torch_stats(folder, sets, 2, b) for b in (1, 3))
    moe = shape.moe
    for g, a, r, p in zip(got, alone, ref, padded):
        scale = float(r.sums.abs().max())
        for x in (g, a, p):
            torch.testing.assert_close(x.sums, r.sums, atol=TOL * scale, rtol=0)
            torch.testing.assert_close(x.abs_sums, r.abs_sums, atol=TOL * scale, rtol=0)
            assert torch.equal(x.routed, r.routed)
            assert (x.top_counts != r.top_counts).sum() <= 2  # flips only at near-ties
        # Every prompt's last token went to n_expert_used experts of each MoE layer; the others' columns are 0.
        for layer in sorted(set(range(shape.num_layers)) - moe.dense_layers):
            assert int(g.routed[layer].sum()) == 2 * g.count
            for e in range(moe.num_experts):
                if not r.routed[layer, e]:
                    assert not g.sums[layer, e * moe.width : (e + 1) * moe.width].any()
            if moe.shared:
                assert g.sums[layer, moe.num_experts * moe.width :].abs().max() > 0.01 * scale
        for layer in moe.dense_layers:  # DeepSeek's layer 0: its ffn_down input, as in a dense model
            assert g.sums[layer, : shape.intermediate_size].abs().max() > 0.01 * scale


def test_graph_ends_after_last_layer_with_shared_expert(moe_ggufs):
    """With `last_layer` the graph ends once that layer's routed experts, router weights, shared expert and gate
    are read; the layer's sums are the full run's."""
    folder, path = moe_ggufs["qwen2_moe"]
    spec, shape, template = describe_gguf(path)
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS[:2], None)
        full = collect_sets_gguf(model, spec, shape, sets, batch_size=4)
        short = collect_sets_gguf(model, spec, shape, sets, batch_size=4, last_layer=1)
    assert short[0].sums[2:].abs().max() == 0 and short[0].routed[2:].sum() == 0
    torch.testing.assert_close(short[0].sums[:2], full[0].sums[:2])
    torch.testing.assert_close(short[0].routed[:2], full[0].routed[:2])


def test_q8_0_file_is_close_to_torch_route(moe_ggufs, hf_to_gguf, tmp_path, monkeypatch):
    """On a Q8_0 file (llama.cpp quantizes the activations inside its quantized matmuls): the same routing, and every
    layer's sums correlate with the torch route on the float model."""
    folder, _ = moe_ggufs["qwen2_moe"]
    monkeypatch.setenv(ENV, hf_to_gguf)
    path = export_gguf(folder, tmp_path / "qwen2_moe.q8_0.gguf", outtype="q8_0")
    spec, shape, template = describe_gguf(path)
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS[:2], template)
        got = collect_sets_gguf(model, spec, shape, sets, batch_size=4)
    for g, r in zip(got, torch_stats(folder, sets, None, 1)):
        assert torch.equal(g.routed, r.routed)
        for layer in range(shape.num_layers):
            assert torch.corrcoef(torch.stack([g.sums[layer], r.sums[layer]]))[0, 1] > 0.999


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_discover_cli_gives_the_torch_circuit(arch, moe_ggufs, tmp_path):
    """`discover --model x.gguf` (llama.cpp) and `--backend torch` (transformers on the model folder the GGUF came
    from: the same float weights) select the same (layer, expert, index) neurons with the same deltas and routing
    coverage; universal neurons (per expert, over the routed prompts) and specificity included."""
    folder, path = moe_ggufs[arch]
    pos, neg, neutral = (tmp_path / f"{n}.txt" for n in ("pos", "neg", "neutral"))
    for f, prompts in zip((pos, neg, neutral), PROMPTS):
        f.write_text("\n".join(prompts))
    common = ["discover", "--positive", str(pos), "--negative", str(neg), "--neutral", str(neutral), "--top-k", "40",
              "--skip-first-layers", "0", "--skip-last-layers", "0", "--universal-top-n", "2"]  # fmt: skip
    run_cli(*common, "--model", str(path), "-o", str(tmp_path / "native.json"))
    run_cli(*common, "--model", str(folder), "--backend", "torch", "-o", str(tmp_path / "torch.json"))
    native, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("native", "torch"))
    assert native["format_version"] == 2 and native["model"]["num_experts"] == ref["model"]["num_experts"]
    for key in ("expert_size", "shared_expert_size", "dense_layers"):
        assert native["model"][key] == ref["model"][key]
    got = {(n["layer"], n["expert"], n["index"]): n["delta"] for n in native["neurons"]}
    want = {(n["layer"], n["expert"], n["index"]): n["delta"] for n in ref["neurons"]}
    assert len(got.keys() & want.keys()) >= 38, (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    scale = max(abs(d) for d in want.values())
    for key in got.keys() & want.keys():
        assert got[key] == pytest.approx(want[key], abs=TOL * scale)
    kinds = {e if e in (None, SHARED) else "routed" for _, e, _ in got}
    assert "routed" in kinds and (SHARED in kinds) == bool(ref["model"]["shared_expert_size"])
    assert native["routing"]["coverage"] == ref["routing"]["coverage"]
    universal = native["selection"]["universal_excluded"]
    assert universal and universal == ref["selection"]["universal_excluded"]


def test_weights_the_tap_cannot_find_are_one_line(moe_ggufs, tmp_path):
    """A row that says a unit's output is weighted where llama.cpp's graph applies no such weight (here: a gate on
    DeepSeek's ungated shared expert) fails after the first decode, naming the family, the tensor and the torch
    route; through the CLI (a child process with that row) it is one line and exit 2."""
    import subprocess
    import sys

    from conftest import REPO

    _, path = moe_ggufs["deepseek_v3"]
    spec, shape, template = describe_gguf(path)
    gated = dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, shared_gate="mlp.shared_experts_gate"))
    with LlamaCppModel(path, n_threads=1) as model:
        sets = encode_sets(model, PROMPTS[:2], None)
        with pytest.raises(CheckpointError, match="deepseek_v3 does not multiply the output of blk.1.ffn_down_shexp"):
            collect_sets_gguf(model, gated, shape, sets, batch_size=2)
    pos = tmp_path / "pos.txt"
    pos.write_text("\n".join(PROMPTS[0]))
    child = ("import dataclasses, sys\nfrom cna_export.arch import ARCHITECTURES as A\ns = A['deepseek_v3']\n"
             "A['deepseek_v3'] = dataclasses.replace(s, experts=dataclasses.replace(s.experts, shared_gate='g'))\n"
             "from cna_export.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", child, "discover", "--model", str(path), "--positive", str(pos), "--negative", str(pos),
         "--top-k", "3", "--no-universal", "-o", str(tmp_path / "c.json")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("cna-export: error: "), err
    assert "deepseek_v3" in err and "--backend torch" in err


def test_run_on_moe_gguf_patches_the_selected_experts(moe_ggufs, tmp_path):
    """`run` on an MoE GGUF: discovery inside llama.cpp, then patch-gguf of the same file; `diff --verify` holds the
    patched file to the circuit of (layer, expert, index) neurons."""
    _, path = moe_ggufs["qwen2_moe"]
    out = tmp_path / "edited"
    run_cli("run", "refusal-ablate", "--model", str(path), "--out", str(out), "--top-k", "30", "--skip-first-layers",
            "0", "--skip-last-layers", "0")  # fmt: skip
    circuit = json.loads((out / "circuit.json").read_text())
    assert len(circuit["neurons"]) == 30 and all(n["expert"] is not None for n in circuit["neurons"])
    proc = run_cli("diff", str(path), str(out / path.name), "--verify", str(out / "circuit.json"))
    assert proc.stdout.startswith("OK:"), proc.stdout


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_torch_route_refuses_moe_gguf(arch, moe_ggufs, tmp_path):
    """transformers' GGUF loader does not read experts (Qwen2-MoE: a shape error; Mixtral: a dense Llama with random
    MLPs), so `--backend torch` on an MoE GGUF is one line, exit 2, naming the llama.cpp route, and nothing is written."""
    _, path = moe_ggufs[arch]
    pos = tmp_path / "pos.txt"
    pos.write_text("\n".join(PROMPTS[0]))
    proc = run_cli("discover", "--model", str(path), "--positive", str(pos), "--negative", str(pos), "--top-k", "3",
                   "--no-universal", "--backend", "torch", "-o", str(tmp_path / "c.json"), check=False)  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "mixture-of-experts GGUF" in err and "drop --backend torch" in err and not (tmp_path / "c.json").exists()
