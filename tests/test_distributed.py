"""Scale-out: data-parallel attribution under torchrun (gloo, 2 processes) and device-map split models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.attribution.collect import collect, encode_prompts
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import load_prompts
from cna_export.io.source import describe, load_model, resolve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equals_single_process(tiny_models, tmp_path):
    src = tiny_models["qwen3"]
    common = [
        "discover",
        "--model",
        str(src),
        "--recipe",
        "refusal-ablate",
        "--top-k",
        "30",
        "--batch-size",
        "5",
        "--skip-first-layers",
        "0",
        "--skip-last-layers",
        "1",
    ]
    run_cli(*common, "-o", str(tmp_path / "single.json"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cna_export", *common, "-o", str(tmp_path / "dp.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1, "only rank 0 writes"
    single, dp = Circuit.load(tmp_path / "single.json"), Circuit.load(tmp_path / "dp.json")
    assert [(n.layer, n.index) for n in dp.neurons] == [(n.layer, n.index) for n in single.neurons]
    for a, b in zip(single.neurons, dp.neurons):
        assert b.delta == pytest.approx(a.delta, rel=1e-5, abs=1e-7)
    assert dp.selection.universal_excluded == single.selection.universal_excluded
    assert dp.prompts == single.prompts


def test_device_map_with_disk_offload_matches_unsplit(tiny_models, tmp_path):
    src = tiny_models["llama"]
    source = resolve(str(src))
    spec, _, _ = describe(source)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    split, tok = load_model(source, dtype="float32", device="cpu", device_map=device_map,
                            offload_folder=tmp_path / "offload")  # fmt: skip
    assert any(p.device.type == "meta" for p in split.parameters()), "some weights should be offloaded to disk"
    whole = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    enc = encode_prompts(tok, load_prompts("builtin:neutral_diverse")[:10])
    a = collect(whole, spec, enc, 4, tok.pad_token_id, top_n=4)
    b = collect(split, spec, enc, 4, tok.pad_token_id, top_n=4)
    torch.testing.assert_close(b.sums, a.sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.top_counts, b.top_counts)
