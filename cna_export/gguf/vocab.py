"""Tokenizer of a Hugging Face folder -> GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template).

Two tokenizer families are supported, as llama.cpp names them:
- `gpt2`: byte-level BPE from tokenizer.json (Llama 3, Qwen, SmolLM2, GPT-2 style), with merges and a
  pre-tokenizer name (`tokenizer.ggml.pre`) that selects llama.cpp's regex split;
- `llama`: SentencePiece from tokenizer.model (Gemma, Mistral, Llama 2), with scores and token types.

llama.cpp's own converter picks the pre-tokenizer by hashing the token ids of a test text; gguf-py does not ship
that table. Here the pre-tokenizer is read from tokenizer.json's `pre_tokenizer` structure instead: the regex it
splits with names the llama.cpp pre-tokenizer that uses the same regex (`PRE_TOKENIZERS`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFWriter, TokenType

from cna_export.errors import CheckpointError
from cna_export.io.untrusted_json import parse_json, read_json

log = logging.getLogger(__name__)

# A Split pre-tokenizer's regex (followed by ByteLevel without its own regex) -> llama.cpp pre-tokenizer.
PRE_TOKENIZERS: dict[str, str] = {
    # Llama 3 (and 3.1/3.2): digits split in groups of up to three.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        "llama-bpe"
    ),
    # Qwen2, Qwen2.5, Qwen3: single digits.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        "qwen2"
    ),
}
# Byte-level BPE without a Split: GPT-2's regex, optionally after splitting every digit (SmolLM, StarCoder).
PRE_BYTELEVEL = "gpt-2"
PRE_DIGITS_BYTELEVEL = "smollm"
PRE_UNKNOWN = "default"


@dataclass
class GgufVocab:
    """Everything the GGUF needs to tokenize like the Hugging Face tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]
    add_space_prefix: bool | None = None
    special: gguf.SpecialVocab | None = field(default=None, repr=False)
    defaults: dict[str, bool] = field(default_factory=dict)  # add_bos/add_eos when the folder does not say

    def add_to(self, writer: GGUFWriter) -> None:
        """Write the tokenizer keys (model, pre, tokens, scores, types, merges, special ids, chat template)."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        assert self.special is not None
        # Always state add_bos/add_eos: llama.cpp's defaults differ by pre-tokenizer (Llama 3 adds a BOS).
        for key, value in self.defaults.items():
            self.special.add_special_token.setdefault(key, value)
        self.special.add_to_gguf(writer, quiet=True)


def load_vocab(folder: Path, n_vocab: int) -> GgufVocab:
    """Read the tokenizer of `folder` for a model whose embedding has `n_vocab` rows.

    Token lists are padded to `n_vocab` with unused `[PADi]` tokens (as llama.cpp's converter does), since
    llama.cpp requires one token per embedding row.

    Raises:
        CheckpointError: no usable tokenizer, or more tokens than embedding rows.
    """
    folder = Path(folder)
    tok_json, adds = _transformers_tokenizer(folder)
    tok_json = tok_json or _read_json(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece(folder, tok_json, n_vocab)
    elif tok_json is not None and _is_byte_level_bpe(tok_json):
        vocab = _byte_level_bpe(folder, tok_json, n_vocab)
    else:
        raise CheckpointError(
            f"{folder} has no tokenizer that can go into a GGUF (byte-level BPE tokenizer.json or SentencePiece "
            "tokenizer.model).",
            "copy the tokenizer files of the original model into the folder.",
        )
    vocab.defaults.update(adds)  # what transformers adds when asked for special tokens beats any file setting
    if adds and vocab.special is not None:
        vocab.special.add_special_token.update(adds)
    log.info("tokenizer: %s (pre %s), %d tokens", vocab.model, vocab.pre, len(vocab.tokens))
    return vocab


def _transformers_tokenizer(folder: Path) -> tuple[dict[str, Any] | None, dict[str, bool]]:
    """The tokenizer transformers really runs for `folder`: its serialized backend, and whether it adds BOS/EOS.

    transformers may rebuild parts of tokenizer.json from the tokenizer class of the model type (for example the
    Qwen2 tokenizer installs its own regex split and NFC normalizer), so the file alone can tokenize differently
    from `AutoTokenizer.from_pretrained(folder)`. The GGUF must match the latter. Returns (None, {}) where
    transformers cannot load the tokenizer.
    """
    if not (folder / "tokenizer.json").is_file():
        return None, {}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        backend = getattr(tok, "backend_tokenizer", None)
        plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    except Exception as exc:  # a tokenizer transformers cannot load: fall back to the file itself
        log.info("transformers could not load the tokenizer of %s (%s); reading tokenizer.json", folder, exc)
        return None, {}
    # "a" never tokenizes to BOS/EOS itself, so an extra first/last id is one transformers added.
    adds = {
        "bos": tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] != plain[:1],
        "eos": tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] != plain[-1:],
    }
    if backend is None:
        return None, adds
    return parse_json(
        backend.to_str(),
        lambda why: CheckpointError(
            f"The tokenizer of {folder} does not serialize to JSON ({why}).", "restore tokenizer.json."
        ),
    ), adds


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path, lambda why: CheckpointError(f"{path} is unreadable ({why}).", "restore the file."))
    except OSError as exc:
        raise CheckpointError(f"{path} is unreadable ({exc.strerror}).", "restore the file.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object.", "restore the file.")
    return data


def _is_byte_level_bpe(tok: dict[str, Any]) -> bool:
    model, decoder = tok.get("model") or {}, tok.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def looks_special(text: str) -> bool:
    """Added tokens that are control tokens by their look, as llama.cpp's converter treats them."""
    return (
        text in ("<pad>", "<mask>")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith(("<start_of_", "<end_of_")) and text.endswith(">"))
    )


def _check_size(folder: Path, size: int, n_vocab: int) -> None:
    if size > n_vocab:
        raise CheckpointError(
            f"The tokenizer in {folder} has {size} tokens but the embedding has only {n_vocab} rows.",
            "use the tokenizer that belongs to these weights.",
        )


def _pad_token(i: int) -> bytes:
    return f"[PAD{i}]".encode()


def _added_types(tok_json: dict[str, Any] | None) -> dict[int, tuple[str, int]]:
    """Added tokens by id: (text, CONTROL for special ones, USER_DEFINED for the rest)."""
    out = {}
    for item in (tok_json or {}).get("added_tokens") or []:
        text, special = item["content"], item.get("special", False)
        out[item["id"]] = (text, TokenType.CONTROL if special or looks_special(text) else TokenType.USER_DEFINED)
    return out


def _byte_level_bpe(folder: Path, tok: dict[str, Any], n_vocab: int) -> GgufVocab:
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = _added_types(tok)
    by_id = {i: text for text, i in vocab.items()}
    size = max([*by_id, *added], default=-1) + 1
    _check_size(folder, size, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            text, kind = added[i]
            tokens.append(text.encode("utf-8"))
            types.append(kind)
        elif i in by_id:
            tokens.append(by_id[i].encode("utf-8"))  # byte-level strings ("Ġthe") as llama.cpp stores them
            types.append(TokenType.NORMAL)
        else:
            tokens.append(_pad_token(i))
            types.append(TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise CheckpointError(f"{folder}/tokenizer.json has no BPE merges.", "restore the tokenizer files.")
    return GgufVocab(
        "gpt2", pre_tokenizer(tok), tokens, None, types, special=special, defaults={"bos": False, "eos": False}
    )


def pre_tokenizer(tok: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits text like tokenizer.json's pre_tokenizer."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return PRE_BYTELEVEL
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return PRE_DIGITS_BYTELEVEL
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    log.warning(
        "The tokenizer's pre-tokenizer (%s) is not one llama.cpp is known to match; using %r, so llama.cpp may split "
        "some texts differently from transformers.",
        json.dumps(pre)[:200],
        PRE_UNKNOWN,
    )
    return PRE_UNKNOWN


def _sentencepiece(folder: Path, tok_json: dict[str, Any] | None, n_vocab: int) -> GgufVocab:
    try:
        spm = gguf.vocab.SentencePieceVocab(folder)
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"Could not read {folder}/tokenizer.model ({exc}).", "install sentencepiece and check the file."
        ) from None
    tokens, scores, types = [], [], []
    for text, score, kind in spm.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # Tokens tokenizer.json adds on top of (or marks inside) the SentencePiece model, e.g. Gemma's turn markers.
    for i, (text, kind) in _added_types(tok_json).items():
        if i < len(tokens):
            if types[i] in (TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED):
                tokens[i], types[i] = text.encode("utf-8"), kind
        elif i == len(tokens):
            tokens.append(text.encode("utf-8"))
            scores.append(-1000.0)
            types.append(kind)
    _check_size(folder, len(tokens), n_vocab)
    for i in range(len(tokens), n_vocab):
        tokens.append(_pad_token(i))
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    return GgufVocab(
        "llama",
        None,
        tokens,
        scores,
        types,
        add_space_prefix=_adds_space_prefix(tok_json),
        special=special,
        defaults={"bos": True, "eos": False},
    )


def _adds_space_prefix(tok_json: dict[str, Any] | None) -> bool:
    """Whether the SentencePiece tokenizer prepends "▁" to the text (Llama 2, Mistral: yes; Gemma: no)."""
    if tok_json is None:
        return True  # SentencePiece's own default (add_dummy_prefix)
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False
