"""Evaluate an edit on held-out prompts: did the behaviour change, and did anything else break?

Per variant of a model (the original, the original with neurons scaled by runtime hooks, or an exported folder):
- behaviour rate on held-out positive prompts (e.g. refusals), from batched greedy generation and a detector;
- the same detector, and the refusal detector, on benign prompts (false positives, false refusals);
- KL(original || edited) of the next-token distribution along the original model's benign answers
  (teacher-forced: the original's answer tokens go through both models), at the first token and averaged over
  the first `kl_tokens` positions;
- quality: repetition (1 - repeated 4-gram share) of the variant's own answers, and the perplexity of the
  original's benign answers under the variant, with its ratio to the original's own perplexity.

The original model's generations and log-probabilities are computed once (`build_baseline`) and reused for every
variant. A variant is a `Runner` of either backend (`cna_export.backends`: torch hooks or a patched GGUF in
llama.cpp), so both measure the same way. Metric math is in pure functions; `generate` and `score` are the torch
backend's model I/O.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cna_export.attribution.collect import batches, input_device
from cna_export.errors import CnaExportError, RecipeError
from cna_export.evaluate.declared import judge
from cna_export.evaluate.detectors import Detector, detect_refusal, normalize
from cna_export.progress import SCORE_UNITS, track

if TYPE_CHECKING:
    from cna_export.backends.base import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Generation and scoring settings shared by every variant of one evaluation."""

    max_new_tokens: int = 32
    batch_size: int = 16
    kl_tokens: int = 8  # positions of the original's answer over which KL is averaged
    chat_template: bool = True
    system_prompt: str | None = None  # the recipe's system message, before every prompt
    # False: no teacher-forced pass; first-token KL is read from the generation's first step and kl_mean and the
    # perplexity are not measured (the tuner's validation trials, whose objectives use the first-token KL only).
    score_answers: bool = True

    def check(self) -> None:
        for name in ("max_new_tokens", "batch_size", "kl_tokens"):
            if getattr(self, name) < 1:
                raise CnaExportError(f"{name}={getattr(self, name)} must be at least 1.", "pass a positive number.")


# Pure metrics ------------------------------------------------------------------------------------------------


def kl_divergence(ref_logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position from log-probabilities of shape [positions, vocab] (float64 result).

    Example:
        >>> p = torch.tensor([[0.5, 0.5]]).log(); q = torch.tensor([[0.25, 0.75]]).log()
        >>> round(float(kl_divergence(p, q)[0]), 6)  # 0.5 ln 2 + 0.5 ln(2/3)
        0.143841
    """
    ref, other = ref_logp.to(torch.float64), other_logp.to(torch.float64)
    # Terms where the reference has zero probability contribute nothing (0 * log 0 = 0).
    terms = torch.where(ref.isneginf(), torch.zeros_like(ref), ref.exp() * (ref - other))
    return terms.sum(-1).clamp(min=0.0)


def repetition(ids: Sequence[int], n: int = 4) -> float:
    """1 - (repeated n-grams / all n-grams): 1.0 for no repetition, towards 0 for loops. Short answers score 1."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 1.0
    return 1.0 - (len(grams) - len(set(grams))) / len(grams)


def perplexity(nlls: Sequence[torch.Tensor]) -> float:
    """exp(mean negative log-likelihood) over all tokens of all answers."""
    total = sum(float(x.sum()) for x in nlls)
    count = sum(x.numel() for x in nlls)
    return math.exp(total / count) if count else float("nan")


def disjoint(heldout: Sequence[str], discovery: Sequence[str]) -> list[str]:
    """Held-out prompts minus any that also appear (case/space-insensitive) among the discovery prompts."""
    seen = {normalize(p) for p in discovery}
    kept = [p for p in heldout if normalize(p) not in seen]
    if len(kept) < len(heldout):
        log.warning("dropped %d held-out prompts that are also discovery prompts", len(heldout) - len(kept))
    if not kept:
        raise RecipeError(
            "Every held-out prompt is also a discovery prompt.", "evaluate on prompts not used to discover."
        )
    return kept


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# Model I/O of the torch backend ----------------------------------------------------------------------------


def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def eos_ids_of(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's EOS ids and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    encoded: list[list[int]],
    cfg: EvalConfig,
    desc: str = "generate",
    first: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy answers (token ids, ending with the EOS token when the model stopped) in prompt order; with `first`
    (a list), each answer's first-token log-probabilities ([vocab], float32) are appended to it in prompt order."""
    from transformers import GenerationConfig

    pad_id, eos = pad_id_of(tokenizer), eos_ids_of(model, tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
        output_logits=first is not None,
        return_dict_in_generate=True,
    )
    device = input_device(model)
    answers: list[list[int]] = [[] for _ in encoded]
    firsts: list[torch.Tensor | None] = [None] * len(encoded)
    units = lambda b: len(b[2]) * cfg.max_new_tokens  # noqa: E731  (decode steps, for the overall estimate)
    for ids, mask, chunk in track(batches(encoded, cfg.batch_size, pad_id), desc, units):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        for row, i in enumerate(chunk):
            if first is not None:
                firsts[i] = F.log_softmax(out.logits[0][row].float(), dim=-1).cpu()
            answer = []
            for token in out.sequences[row, ids.shape[1] :].tolist():
                answer.append(token)
                if token in eos:
                    break
            answers[i] = answer
    if first is not None:
        first.extend(firsts)  # type: ignore[arg-type]
    return answers


@dataclass
class Scored:
    """Teacher-forced scores of one answer: per-token NLL and log-probs at the first positions, or (a variant
    scored against the original's, `of`) the KL per position in place of its log-probs."""

    nll: torch.Tensor  # [answer tokens] float64
    logp: torch.Tensor | None  # [min(kl_tokens, answer tokens), vocab] float32
    kl: torch.Tensor | None = None  # [min(kl_tokens, answer tokens)] float64, KL(original || this)

    @classmethod
    def of(cls, nll: torch.Tensor, logp: torch.Tensor, ref: Scored | None) -> Scored:
        """Scores of one answer; with `ref` (the original's), the KL at once and no log-probs kept: a variant then
        holds [kl_tokens] numbers per answer instead of [kl_tokens, vocab], so `--kl-tokens 64` fits in memory."""
        if ref is None:
            return cls(nll, logp)
        return cls(nll, None, kl_divergence(ref.logp, logp))


@torch.inference_mode()
def score(
    model: nn.Module,
    encoded: list[list[int]],
    answers: list[list[int]],
    cfg: EvalConfig,
    pad_id: int,
    desc: str = "score",
    ref: Sequence[Scored] | None = None,
) -> list[Scored]:
    """Run prompt + answer through `model` and read the distribution at every answer position (with `ref`, the
    original's scores of the same answers: the KL to them, see `Scored.of`)."""
    seqs = [p + a for p, a in zip(encoded, answers)]
    device = input_device(model)
    out: list[Scored | None] = [None] * len(seqs)
    for ids, mask, chunk in track(batches(seqs, cfg.batch_size, pad_id), desc, lambda b: len(b[2]) * SCORE_UNITS):
        # Left padding puts every answer at the end, so only the last max(len)+1 positions need logits.
        keep = max(len(answers[i]) for i in chunk) + 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        for row, i in enumerate(chunk):
            n = len(answers[i])
            logp = F.log_softmax(logits[row, keep - 1 - n : keep - 1].float(), dim=-1).cpu()
            target = torch.tensor(answers[i]).unsqueeze(-1)
            nll = -logp.gather(-1, target).squeeze(-1).to(torch.float64)
            out[i] = Scored.of(nll, logp[: cfg.kl_tokens].clone(), ref[i] if ref is not None else None)
    return out  # type: ignore[return-value]


# Baseline and variants ---------------------------------------------------------------------------------------


@dataclass
class Baseline:
    """The original model's answers and scores on the held-out sets, computed once per evaluation or sweep."""

    positive: list[str]
    negative: list[str]
    enc_pos: list[list[int]]
    enc_neg: list[list[int]]
    pos_answers: list[list[int]]
    neg_answers: list[list[int]]
    ref: list[Scored] | None  # the original's benign answers scored by the original (None: cfg.score_answers off)
    first: list[torch.Tensor] | None = None  # without scoring: the original's first-token log-probs, benign prompts
    metrics: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


Extra = Callable[["Runner"], dict]  # more metrics of a variant, e.g. MMLU (`mmlu.capability_check`)


def build_baseline(
    runner: Runner,
    positive: Sequence[str],
    negative: Sequence[str],
    detector: Detector,
    cfg: EvalConfig,
    extras: Sequence[Extra] = (),
) -> Baseline:
    """Generate and score the original model's answers once (`runner`: the original, from `Backend.load`);
    `extras` add metrics (lm-eval, MMLU) to the baseline's.

    Example:
        >>> base = build_baseline(backend.load(), harmful, benign, detect_refusal, EvalConfig())
    """
    cfg.check()
    enc_pos = runner.encode(positive, cfg.chat_template, cfg.system_prompt)
    enc_neg = runner.encode(negative, cfg.chat_template, cfg.system_prompt)
    pos_answers = runner.generate(enc_pos, cfg, "original: positive")
    first = None if cfg.score_answers else []
    neg_answers = runner.generate(enc_neg, cfg, "original: benign", first=first)
    ref = runner.score(enc_neg, neg_answers, cfg, "original: score") if cfg.score_answers else None
    base = Baseline(list(positive), list(negative), enc_pos, enc_neg, pos_answers, neg_answers, ref, first)
    head = {"label": "original", "k": 0, "multiplier": 1.0}
    answers = Answers(pos_answers, neg_answers, ref, first)
    base.metrics, base.records = summarize(base, runner, detector, answers, head)
    for extra in extras:
        base.metrics.update(extra(runner))
    return base


def measure(
    runner: Runner,
    baseline: Baseline,
    detector: Detector,
    cfg: EvalConfig,
    *,
    label: str = "edited",
    k: int | None = None,
    multiplier: float | None = None,
    extras: Sequence[Extra] = (),
) -> tuple[dict, list[dict]]:
    """Metrics and per-prompt records of one variant (`Backend.variant`, `Backend.edited`, or any runner), on the
    baseline's prompts: its answers, the original's benign answers scored by it, and `extras` (lm-eval, MMLU)
    run on the same variant.

    Example:
        >>> with backend.variant(circuit, 0.0) as edited:
        ...     metrics, records = measure(edited, base, detect_refusal, EvalConfig(), label="m=0")
    """
    pos_answers = runner.generate(baseline.enc_pos, cfg, f"{label}: positive")
    first = None if baseline.ref is not None else []
    neg_answers = runner.generate(baseline.enc_neg, cfg, f"{label}: benign", first=first)
    scored = None
    if baseline.ref is not None:
        scored = runner.score(baseline.enc_neg, baseline.neg_answers, cfg, f"{label}: score", ref=baseline.ref)
    more = [extra(runner) for extra in extras]
    head = {"label": label, "k": k, "multiplier": multiplier}
    metrics, records = summarize(baseline, runner, detector, Answers(pos_answers, neg_answers, scored, first), head)
    for m in more:
        metrics.update(m)
    return metrics, records


def lm_eval_check(tasks: Sequence[str], limit: int | None = None, include: Path | None = None) -> Extra:
    """An extra for `build_baseline` / `measure`: lm-evaluation-harness scores of each variant (torch only)."""
    return lambda runner: {"lm_eval": runner.lm_eval(tasks, limit, include)}


@dataclass
class Answers:
    """One variant's greedy answers (positive and benign prompts) and its scores of the original's benign answers;
    without scoring (`EvalConfig.score_answers` off), its first-token log-probabilities on the benign prompts."""

    positive: list[list[int]]
    negative: list[list[int]]
    scored: list[Scored] | None
    first: list[torch.Tensor] | None = None

    def kl(self, base: Baseline) -> list[torch.Tensor]:
        """Per benign prompt, KL(original || this) at the scored positions, or at the first answer token only."""
        if self.scored is None:
            return [kl_divergence(ref[None], own[None]) for ref, own in zip(base.first, self.first)]  # type: ignore[arg-type]
        return [
            sc.kl if sc.kl is not None else kl_divergence(ref.logp, sc.logp) for ref, sc in zip(base.ref, self.scored)
        ]  # type: ignore[arg-type]


def summarize(
    base: Baseline, runner: Runner, detector: Detector, answers: Answers, head: dict
) -> tuple[dict, list[dict]]:
    """One variant's answers and scores as its metrics and per-prompt records (both backends' variants alike);
    `head` (label, k, multiplier) starts every record and the metrics."""
    pos_answers, neg_answers = answers.positive, answers.negative

    def text(ids: list[int]) -> str:
        return runner.decode(ids, skip_special_tokens=True)

    records, reps = [], []
    pos_hits = neg_hits = neg_refusals = 0
    values: dict[str, list[float]] = {"positive": [], "negative": []}  # a measure detector's numbers

    def verdict(s: str, prompt: str, answer: str, ids: list[int]) -> str | None:
        rule, value = judge(detector, answer, prompt, len(ids))
        if value is not None:
            values[s].append(value)
            records[-1]["measure"] = value
        return rule

    for prompt, ids in zip(base.positive, pos_answers):
        answer = text(ids)
        reps.append(repetition(ids))
        records.append({**head, "set": "positive", "prompt": prompt, "answer": answer})
        rule = verdict("positive", prompt, answer, ids)
        pos_hits += rule is not None
        records[-1].update(behaviour=rule is not None, rule=rule, repetition=reps[-1])
    kl_first, kl_mean = [], []
    for i, (prompt, ids, kl) in enumerate(zip(base.negative, neg_answers, answers.kl(base))):
        answer = text(ids)
        records.append({**head, "set": "negative", "prompt": prompt, "answer": answer})
        rule, refusal = verdict("negative", prompt, answer, ids), detect_refusal(answer)
        neg_hits += rule is not None
        neg_refusals += refusal is not None
        reps.append(repetition(ids))
        kl_first.append(float(kl[0]))
        records[-1].update(
            behaviour=rule is not None, rule=rule, refusal_rule=refusal, repetition=reps[-1], kl_first=kl_first[-1]
        )
        if answers.scored is not None:
            kl_mean.append(float(kl.mean()))
            records[-1].update(kl_mean=kl_mean[-1], nll_original_answer=float(answers.scored[i].nll.mean()))
    n_pos, n_neg = len(base.positive), len(base.negative)
    metrics = {
        **head,
        "rate": pos_hits / n_pos,
        "positive_hits": pos_hits,
        "n_positive": n_pos,
        "benign_rate": neg_hits / n_neg,
        "benign_hits": neg_hits,
        "n_negative": n_neg,
        "benign_refusal_rate": neg_refusals / n_neg,
        "kl_first": sum(kl_first) / n_neg,
        **({"kl_mean": sum(kl_mean) / n_neg} if kl_mean else {}),
        "repetition": sum(reps) / len(reps),
        # The CNA paper's quality metric is this same number (1 - repeated n-gram share of the generations).
        "quality": sum(reps) / len(reps),
    }
    if answers.scored is not None:  # the perplexity of the original's benign answers under this variant
        ppl, ppl_original = perplexity([s.nll for s in answers.scored]), perplexity([r.nll for r in base.ref])
        metrics.update(ppl=ppl, ppl_original=ppl_original, ppl_ratio=ppl / ppl_original)
    if values["positive"]:  # a measure detector: the mean of its number on each set
        metrics["measure_mean"] = sum(values["positive"]) / len(values["positive"])
        metrics["benign_measure_mean"] = sum(values["negative"]) / max(1, len(values["negative"]))
    return metrics, records
