"""The llama.cpp backend's runner: one GGUF file as evaluation and chat see a model, quantized and mmapped as it is.

Prompts go in as the GGUF's own tokens (chat-templated with its own template); answers come out greedily, a batch
of sequences per decode sharing one unified KV cache, in which the prefix every prompt shares (the chat template's
system turn, a recipe's system prompt) is computed once and shared by all; teacher-forced scoring keeps the logits
from the last prompt token on, so position `len(prompt) - 1 + t` predicts answer token t, as
`cna_export.evaluate.measure.score` reads them; MMLU scores the next-token log-probabilities of the four letters
after each raw prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from cna_export.attribution.collect import common_prefix
from cna_export.backends.llamacpp_sums import length_groups
from cna_export.errors import CnaExportError, RecipeError
from cna_export.evaluate.measure import EvalConfig, Scored
from cna_export.evaluate.mmlu import LETTERS
from cna_export.gguf.llamacpp import LlamaCppContext, LlamaCppModel, Seq
from cna_export.progress import SCORE_UNITS, track


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class LlamaCppRunner:
    """One GGUF file loaded by llama.cpp as evaluation and chat see a model: prompts in, greedy answers and
    teacher-forced scores out (`cna_export.backends.base.Runner`).

    Example:
        >>> with LlamaCppModel(Path("qwen.Q4_K_M.gguf")) as m:
        ...     runner = LlamaCppRunner(m, chat_template)
        ...     answers = runner.generate(runner.encode(prompts), EvalConfig())
    """

    def __init__(self, model: LlamaCppModel, chat_template: str | None) -> None:
        self.model, self.template = model, chat_template

    @property
    def has_chat_template(self) -> bool:
        return bool(self.template)

    def encode(self, prompts: Sequence[str], chat_template: bool = True, system: str | None = None) -> list[list[int]]:
        """Token ids per prompt with the GGUF's tokenizer, through its chat template when asked and it has one
        (after a `system` message, when given)."""
        if not prompts:
            raise RecipeError("A prompt set is empty.", "give at least one prompt on each side.")
        return [self.model.encode(p, self.template if chat_template else None, system) for p in prompts]

    def is_end(self, token: int) -> bool:
        return bool(self.model.lc.llama_vocab_is_eog(self.model.vocab, token))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """An answer's text without its end token (the shape of a tokenizer's `decode`, for `summarize`)."""
        return self.model.detokenize([t for t in ids if not (skip_special_tokens and self.is_end(t))])

    def generate(
        self, encoded: list[list[int]], cfg: EvalConfig, desc: str = "generate", first: list | None = None
    ) -> list[list[int]]:
        """Greedy answers (ending with the end token when the model stopped), `cfg.batch_size` per decode; with
        `first` (a list), each answer's first-token log-probabilities appended to it in prompt order."""
        answers: list[list[int]] = [[] for _ in encoded]
        firsts: list[torch.Tensor | None] = [None] * len(encoded)
        for ctx, group, prefix in self._groups(encoded, cfg.batch_size, desc, extra=cfg.max_new_tokens):
            rows = ctx.decode([Seq(encoded[i][prefix:], prefix) for i in group])
            live = list(range(len(group)))
            for step in range(cfg.max_new_tokens):
                logits = {k: ctx.logits(r) for k, r in zip(live, rows)}
                if step == 0 and first is not None:
                    for k, row_logits in logits.items():
                        firsts[group[k]] = torch.from_numpy(_log_softmax(row_logits).astype(np.float32))
                nxt = {k: int(np.argmax(x)) for k, x in logits.items()}
                for k, token in nxt.items():
                    answers[group[k]].append(token)
                live = [k for k in live if not self.is_end(nxt[k])]
                if not live or step == cfg.max_new_tokens - 1:
                    break
                rows = ctx.decode([Seq([nxt[k]], len(encoded[group[k]]) + step) for k in live], seq_ids=live)
        if first is not None:
            first.extend(firsts)
        return answers

    def score(self, encoded: list[list[int]], answers: list[list[int]], cfg: EvalConfig, desc: str = "score",
            ref: Sequence[Scored] | None = None) -> list[Scored]:  # fmt: skip
        """Prompt + answer through the model; the distribution at every answer position (as `measure.score`; with
        `ref`, the original's scores of the same answers, the KL to them: `Scored.of`)."""
        seqs = [p + a for p, a in zip(encoded, answers)]
        out: list[Scored | None] = [None] * len(seqs)
        for ctx, group, prefix in self._groups(seqs, cfg.batch_size, desc, prompts=encoded):
            # Logits from the last prompt token on: position len(prompt) - 1 + t predicts answer token t.
            last = ctx.decode([Seq(seqs[i][prefix:], prefix, logits_from=len(encoded[i]) - 1 - prefix) for i in group])
            for row, i in zip(last, group):
                n = len(answers[i])
                logp = _log_softmax(np.stack([ctx.logits(row - n + t) for t in range(n)]))
                nll = -logp[np.arange(n), answers[i]]
                out[i] = Scored.of(
                    torch.from_numpy(nll),
                    torch.from_numpy(logp[: cfg.kl_tokens].astype(np.float32)),
                    ref[i] if ref is not None else None,
                )
        return out  # type: ignore[return-value]

    def letter_logprobs(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """[prompts, 4] next-token log-probabilities of " A".." D" after each raw prompt (MMLU)."""
        ids = [self.model.tokenize(f" {c}", add_special=False)[0] for c in LETTERS]
        encoded = [self.model.tokenize(p, add_special=True) for p in prompts]
        out = torch.empty(len(prompts), len(LETTERS), dtype=torch.float64)
        for ctx, group, prefix in self._groups(encoded, batch_size, "mmlu"):
            rows = ctx.decode([Seq(encoded[i][prefix:], prefix) for i in group])
            for row, i in zip(rows, group):
                out[i] = torch.from_numpy(_log_softmax(ctx.logits(row))[ids])
        return out

    def lm_eval(self, tasks: Sequence[str], limit: int | None = None, include: Path | None = None) -> dict:
        raise CnaExportError("--lm-eval runs lm-evaluation-harness in torch.", "add --backend torch.")

    def _groups(
        self, seqs: list[list[int]], batch_size: int, desc: str, extra: int = 0, prompts: list[list[int]] | None = None
    ) -> Iterator[tuple[LlamaCppContext, list[int], int]]:
        """A context for `batch_size` sequences of up to the longest of `seqs` plus `extra` tokens each, and the
        length-sorted groups of `seqs` one by one with the length of the prefix all of them share (of `prompts`,
        when given: the prompts of prompt + answer sequences). The prefix's KV cells are computed once, as
        sequence 0, and shared by every sequence of every group; a group decodes from the prefix on, and its own
        cells are dropped after it."""
        bs = min(batch_size, len(seqs))
        prefix = common_prefix(prompts or seqs)
        widest = max(len(s) for s in seqs) - prefix
        with self.model.context(prefix + bs * (widest + extra) + 8, max(bs * widest, bs, prefix), bs) as ctx:
            if prefix:
                ctx.decode([Seq(seqs[0][:prefix], output=False)])
            for group in track(length_groups(seqs, bs), desc, lambda g: len(g) * (extra or SCORE_UNITS)):
                for k in range(1, len(group)) if prefix else ():
                    ctx.share(0, k, prefix)
                yield ctx, group, prefix
                for k in range(len(group)):
                    ctx.forget(k, prefix)
