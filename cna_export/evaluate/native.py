"""Evaluation inside llama.cpp: greedy answers of a GGUF file and of its patched copy, batched, scored with the
same detectors as the torch route, and the first-answer-token KL on the benign prompts. Both files stay
quantized and mmapped; nothing is dequantized in Python."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cna_export.evaluate.detectors import detector_for
from cna_export.gguf.llamacpp import LlamaCppModel, Seq

log = logging.getLogger(__name__)


@dataclass
class Answers:
    """Greedy answers of one model on one prompt set, and the log-probs of each prompt's first answer token."""

    texts: list[str]
    tokens: list[list[int]]
    first_logp: np.ndarray  # [prompts, vocab] float64


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def generate_gguf(model: LlamaCppModel, prompts: Sequence[str], chat_template: str | None, max_new_tokens: int = 32,
                  batch_size: int = 16) -> Answers:  # fmt: skip
    """Greedy answers, `batch_size` sequences per decode (the prompt pass, then one token per live sequence)."""
    encoded = [model.encode(p, chat_template) for p in prompts]
    texts, tokens, first = [""] * len(prompts), [[] for _ in prompts], [None] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    widest = max(len(e) for e in encoded)
    n_ctx = batch_size * (widest + max_new_tokens) + 8
    with model.context(n_ctx, max(batch_size * widest, batch_size), batch_size) as ctx:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            rows = ctx.decode([Seq(encoded[i]) for i in group])
            live = list(range(len(group)))
            for step in range(max_new_tokens):
                logits = {k: ctx.logits(rows[n]) for n, k in enumerate(live)}
                nxt = {}
                for k in live:
                    i = group[k]
                    if step == 0:
                        first[i] = _log_softmax(logits[k])
                    token = int(np.argmax(logits[k]))
                    tokens[i].append(token)
                    if not model.lc.llama_vocab_is_eog(model.vocab, token):
                        nxt[k] = token
                live = [k for k in live if k in nxt]
                if not live or step == max_new_tokens - 1:
                    break
                seqs = [Seq([nxt[k]], len(encoded[group[k]]) + step) for k in live]
                rows = ctx.decode(seqs, seq_ids=live)
            for k in range(len(group)):
                ctx.forget(k)
    for i, toks in enumerate(tokens):
        texts[i] = model.detokenize([t for t in toks if not model.lc.llama_vocab_is_eog(model.vocab, t)])
    return Answers(texts, tokens, np.stack(first))


def first_token_kl(ref: Answers, other: Answers) -> float:
    """Mean KL(ref || other) of the first answer token's distribution over the prompts."""
    p = np.exp(ref.first_logp)
    return float((p * (ref.first_logp - other.first_logp)).sum(-1).mean())


def evaluate_gguf(
    original: Path, edited: Path, positive: Sequence[str], negative: Sequence[str], behaviour: str, *,
    max_new_tokens: int = 32, batch_size: int = 16, chat_template: bool = True, n_threads: int | None = None,
) -> dict:  # fmt: skip
    """The behaviour rate on `positive` and `negative` prompts of the original and the edited GGUF, and the
    first-token KL of the edited model on the benign (`negative`) prompts.

    Example:
        >>> evaluate_gguf(Path("qwen.Q4_K_M.gguf"), Path("out/qwen.Q4_K_M.gguf"), harmful, benign, "refusal")
    """
    from cna_export.attribution.native import gguf_chat_template

    detect = detector_for(behaviour)
    template = gguf_chat_template(Path(original), chat_template)
    out: dict = {"behaviour": behaviour, "max_new_tokens": max_new_tokens, "prompts": [len(positive), len(negative)]}
    answers = {}
    for label, path in (("original", original), ("edited", edited)):
        with LlamaCppModel(Path(path), n_threads) as model:
            pos = generate_gguf(model, positive, template, max_new_tokens, batch_size)
            neg = generate_gguf(model, negative, template, max_new_tokens, batch_size)
        answers[label] = (pos, neg)
        out[label] = {
            "positive_rate": sum(detect(t) is not None for t in pos.texts) / len(pos.texts),
            "negative_rate": sum(detect(t) is not None for t in neg.texts) / len(neg.texts),
        }
    out["first_token_kl"] = first_token_kl(answers["original"][1], answers["edited"][1])
    out["answers"] = {label: {"positive": p.texts, "negative": n.texts} for label, (p, n) in answers.items()}
    return out
