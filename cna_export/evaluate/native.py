"""Evaluation inside llama.cpp: `eval` and `sweep` on a GGUF file, quantized and mmapped as it is.

Every variant is a file: the original, an edited GGUF the user names, or the original patched by a circuit at a
multiplier (`patch_gguf` into a temporary file: same quantization, the circuit's ffn rows only). Each variant
answers the held-out prompts greedily (batched sequences per decode), and the original's benign answers are
teacher-forced through it for KL and perplexity, exactly as the torch route does (`cna_export.evaluate.measure`);
the metrics, per-prompt records, results document and report are the torch route's own (`summarize`,
`write_report`). MMLU scores the same letter log-likelihoods as `cna_export.evaluate.mmlu`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cna_export.attribution.native import length_groups
from cna_export.circuit.format import Circuit
from cna_export.errors import CnaExportError
from cna_export.evaluate.detectors import Detector, detector_for
from cna_export.evaluate.measure import Baseline, EvalConfig, Scored, summarize
from cna_export.gguf.llamacpp import LlamaCppContext, LlamaCppModel, Seq
from cna_export.progress import SCORE_UNITS, track

log = logging.getLogger(__name__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class GgufRunner:
    """One GGUF file as the evaluation sees a model: prompts in, greedy answers and teacher-forced scores out.

    Example:
        >>> with LlamaCppModel(Path("qwen.Q4_K_M.gguf")) as m:
        ...     runner = GgufRunner(m, chat_template)
        ...     answers = runner.generate(runner.encode(prompts), EvalConfig())
    """

    def __init__(self, model: LlamaCppModel, chat_template: str | None) -> None:
        self.model, self.template = model, chat_template

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.model.encode(p, self.template) for p in prompts]

    def is_end(self, token: int) -> bool:
        return bool(self.model.lc.llama_vocab_is_eog(self.model.vocab, token))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """An answer's text without its end token (the shape of a tokenizer's `decode`, for `summarize`)."""
        return self.model.detokenize([t for t in ids if not (skip_special_tokens and self.is_end(t))])

    def generate(self, encoded: list[list[int]], cfg: EvalConfig, desc: str = "generate") -> list[list[int]]:
        """Greedy answers (ending with the end token when the model stopped), `cfg.batch_size` per decode."""
        answers: list[list[int]] = [[] for _ in encoded]
        for ctx, group in self._groups(encoded, cfg.batch_size, desc, extra=cfg.max_new_tokens):
            rows = ctx.decode([Seq(encoded[i]) for i in group])
            live = list(range(len(group)))
            for step in range(cfg.max_new_tokens):
                nxt = {k: int(np.argmax(ctx.logits(r))) for k, r in zip(live, rows)}
                for k, token in nxt.items():
                    answers[group[k]].append(token)
                live = [k for k in live if not self.is_end(nxt[k])]
                if not live or step == cfg.max_new_tokens - 1:
                    break
                rows = ctx.decode([Seq([nxt[k]], len(encoded[group[k]]) + step) for k in live], seq_ids=live)
        return answers

    def score(self, encoded: list[list[int]], answers: list[list[int]], cfg: EvalConfig, desc: str = "score",
              ref: Sequence[Scored] | None = None) -> list[Scored]:  # fmt: skip
        """Prompt + answer through the model; the distribution at every answer position (as `measure.score`)."""
        seqs = [p + a for p, a in zip(encoded, answers)]
        out: list[Scored | None] = [None] * len(seqs)
        for ctx, group in self._groups(seqs, cfg.batch_size, desc):
            # Logits from the last prompt token on: position len(prompt) - 1 + t predicts answer token t.
            last = ctx.decode([Seq(seqs[i], logits_from=len(encoded[i]) - 1) for i in group])
            for row, i in zip(last, group):
                n = len(answers[i])
                logp = _log_softmax(np.stack([ctx.logits(row - n + t) for t in range(n)]))
                nll = -logp[np.arange(n), answers[i]]
                out[i] = Scored.of(torch.from_numpy(nll), torch.from_numpy(logp[: cfg.kl_tokens].astype(np.float32)),
                                   ref[i] if ref is not None else None)  # fmt: skip
        return out  # type: ignore[return-value]

    def letter_logprobs(self, prompts: Sequence[str], letters: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """[prompts, letters] next-token log-probabilities of each letter after each raw prompt (MMLU)."""
        ids = [self.model.tokenize(f" {c}", add_special=False)[0] for c in letters]
        encoded = [self.model.tokenize(p, add_special=True) for p in prompts]
        out = torch.empty(len(prompts), len(letters), dtype=torch.float64)
        for ctx, group in self._groups(encoded, batch_size, "mmlu"):
            rows = ctx.decode([Seq(encoded[i]) for i in group])
            for row, i in zip(rows, group):
                out[i] = torch.from_numpy(_log_softmax(ctx.logits(row))[ids])
        return out

    def _groups(self, seqs: list[list[int]], batch_size: int, desc: str,
                extra: int = 0) -> Iterator[tuple[LlamaCppContext, list[int]]]:  # fmt: skip
        """A context for `batch_size` sequences of up to the longest of `seqs` plus `extra` tokens each, and the
        length-sorted groups of `seqs` one by one (their KV cells are dropped after each group)."""
        bs = min(batch_size, len(seqs))
        widest = max(len(s) for s in seqs)
        with self.model.context(bs * (widest + extra) + 8, max(bs * widest, bs), bs) as ctx:
            for group in track(length_groups(seqs, bs), desc, lambda g: len(g) * (extra or SCORE_UNITS)):
                yield ctx, group
                for k in range(len(group)):
                    ctx.forget(k)


def _mmlu(runner: GgufRunner, questions: Sequence | None, batch_size: int) -> dict:
    if not questions:
        return {}
    from cna_export.evaluate import mmlu

    logp = runner.letter_logprobs([mmlu.prompt_of(q) for q in questions], mmlu.LETTERS, batch_size)
    return {"mmlu": mmlu.record_of(logp, questions)}


def gguf_baseline(runner: GgufRunner, positive: Sequence[str], negative: Sequence[str], detector: Detector,
                  cfg: EvalConfig, questions: Sequence | None = None) -> Baseline:  # fmt: skip
    """The original file's answers and scores, computed once (`measure.build_baseline` in llama.cpp)."""
    cfg.check()
    enc_pos, enc_neg = runner.encode(positive), runner.encode(negative)
    pos = runner.generate(enc_pos, cfg, "original: positive")
    neg = runner.generate(enc_neg, cfg, "original: benign")
    ref = runner.score(enc_neg, neg, cfg, "original: score")
    base = Baseline(list(positive), list(negative), enc_pos, enc_neg, pos, neg, ref)
    base.metrics, base.records = summarize(base, runner, detector, pos, neg, ref, label="original", k=0,
                                            multiplier=1.0)  # fmt: skip
    base.metrics.update(_mmlu(runner, questions, cfg.batch_size))
    return base


def gguf_measure(
    path: Path, baseline: Baseline, detector: Detector, cfg: EvalConfig, *, label: str, k: int | None,
    multiplier: float | None, questions: Sequence | None = None, n_threads: int | None = None,
    extra: Callable[[GgufRunner], dict] | None = None,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """Metrics and per-prompt records of one variant file (`measure.measure` in llama.cpp); `extra(runner)`: more
    metrics of the variant (`cna_export.evaluate.depth`)."""
    with LlamaCppModel(path, n_threads) as model:
        runner = GgufRunner(model, None)
        pos = runner.generate(baseline.enc_pos, cfg, f"{label}: positive")
        neg = runner.generate(baseline.enc_neg, cfg, f"{label}: benign")
        scored = runner.score(baseline.enc_neg, baseline.neg_answers, cfg, f"{label}: score", ref=baseline.ref)
        metrics, records = summarize(baseline, runner, detector, pos, neg, scored, label=label, k=k,
                                      multiplier=multiplier)  # fmt: skip
        metrics.update(_mmlu(runner, questions, cfg.batch_size))
        metrics.update(extra(runner) if extra is not None else {})
    return metrics, records


@contextmanager
def patched(path: Path, circuit: Circuit, multiplier: float, allow_negative: bool) -> Iterator[Path]:
    """The GGUF patched by `circuit` at `multiplier`, in a temporary file removed afterwards."""
    from cna_export.gguf.patch import patch_gguf

    with tempfile.TemporaryDirectory(prefix="cna-eval-") as tmp:
        out = Path(tmp) / path.name
        patch_gguf(path, circuit, out, multiplier=multiplier, allow_negative=allow_negative)
        yield out


def original_baseline(path: Path, positive, negative, detector: Detector, cfg: EvalConfig, questions=None,
                      n_threads: int | None = None, extra: Callable | None = None) -> Baseline:  # fmt: skip
    from cna_export.attribution.native import gguf_chat_template

    with LlamaCppModel(path, n_threads) as model:
        runner = GgufRunner(model, gguf_chat_template(path, cfg.chat_template))
        base = gguf_baseline(runner, positive, negative, detector, cfg, questions)
        base.metrics.update(extra(runner) if extra is not None else {})
        return base


def eval_variants_gguf(
    path: Path, positive: Sequence[str], negative: Sequence[str], behaviour: str, cfg: EvalConfig, *,
    circuit: Circuit | None = None, multipliers: Sequence[float] | None = None, edited: Path | None = None,
    allow_negative: bool = False, questions: Sequence | None = None, n_threads: int | None = None,
    extra: Callable | None = None, on_variant: Callable[[dict, list[dict]], None] | None = None,
) -> tuple[Baseline, list[dict], list[dict], Circuit | None]:  # fmt: skip
    """The original file's baseline and the metrics of each variant: `edited` (a GGUF file, or an export folder
    holding one with its circuit.json), or `circuit` patched in at each multiplier. `extra(runner)` adds metrics
    to each; `on_variant(metrics, records)` hears of each as it finishes (the report stream)."""
    done = on_variant or (lambda metrics, records: None)
    if edited is not None and circuit is not None:
        raise CnaExportError("Pass either an edited model or a circuit, not both.", "drop --circuit or --edited.")
    detector = detector_for(behaviour)
    baseline = original_baseline(path, positive, negative, detector, cfg, questions, n_threads, extra)
    done(baseline.metrics, baseline.records)
    points, records = [], list(baseline.records)
    if edited is not None:
        edited_file, circuit = edited_gguf(Path(edited), path.name)
        m = circuit.multiplier if circuit is not None else None
        k = len(circuit.neurons) if circuit is not None else None
        metrics, recs = gguf_measure(edited_file, baseline, detector, cfg, label="exported", k=k, multiplier=m,
                                     questions=questions, n_threads=n_threads, extra=extra)  # fmt: skip
        done(metrics, recs)
        points.append(metrics)
        records += recs
    elif circuit is not None:
        for m in multipliers if multipliers else [circuit.multiplier]:
            with patched(path, circuit, m, allow_negative) as variant:
                metrics, recs = gguf_measure(variant, baseline, detector, cfg, label=f"m={m:g}",
                                             k=len(circuit.neurons), multiplier=m, questions=questions,
                                             n_threads=n_threads, extra=extra)  # fmt: skip
            done(metrics, recs)
            points.append(metrics)
            records += recs
    return baseline, points, records, circuit


def sweep_source_gguf(
    path: Path, name: str, recipe, base: Path | None, ks: Sequence, multipliers: Sequence[float], cfg: EvalConfig, *,
    positive: str | None = None, negative: str | None = None, allow_negative: bool = False, limit: int | None = None,
    **rule,
) -> tuple[dict, list[dict], dict[int, Circuit], object]:  # fmt: skip
    """`sweep.sweep_source` in llama.cpp: attribute once inside llama.cpp with the recipe's discovery prompts,
    sweep k x m on its validation split. `rule`: kl_budget, benign_budget, out."""
    from cna_export.attribution.discover import plan_discovery
    from cna_export.attribution.native import attribute_gguf, describe_gguf, gguf_identity
    from cna_export.evaluate import sweep as S

    spec, shape, metadata = describe_gguf(path)
    plan = plan_discovery(recipe, base)
    counts = S.resolve_ks(ks, shape, plan.selection)
    held_pos, held_neg = S.heldout_sets(recipe, base, positive, negative, split="validation", limit=limit)
    att = attribute_gguf(path, spec, gguf_identity(name, path, spec, shape, metadata), plan.positive, plan.negative,
                         plan.neutral, plan.selection)  # fmt: skip
    results, records, circuits = sweep_gguf(
        path, att, counts, multipliers, held_pos, held_neg, recipe.behaviour, cfg, model_name=name,
        recipe=recipe.name, goal=S.goal_of(recipe.multiplier), allow_negative=allow_negative or recipe.allow_negative,
        split=S.split_of(recipe, "validation", positive), **rule,
    )  # fmt: skip
    return results, records, circuits, att


def run_eval_gguf(
    path: Path, positive: Sequence[str], negative: Sequence[str], behaviour: str, cfg: EvalConfig, *,
    model_name: str, split: str = "test", **variants,
) -> tuple[dict, list[dict], Circuit | None]:  # fmt: skip
    """`sweep.run_eval` in llama.cpp: the results document, per-prompt records and the circuit used, if any.
    `variants`: `eval_variants_gguf`'s options (circuit, multipliers, edited, allow_negative, questions)."""
    from cna_export.evaluate import sweep as S

    baseline, points, records, circuit = eval_variants_gguf(path, positive, negative, behaviour, cfg, **variants)
    moved = [p["multiplier"] for p in points if p["multiplier"] not in (None, 1)]
    results = S.results_document("eval", model_name, behaviour, cfg, baseline, goal=S.goal_of(moved[0]) if moved else None,
                          split=split, backend="llama.cpp")  # fmt: skip
    results["points"] = points
    results["edited"] = str(variants["edited"]) if variants.get("edited") is not None else None
    return results, records, circuit


def edited_gguf(edited: Path, name: str) -> tuple[Path, Circuit | None]:
    """The edited GGUF file and its applied circuit: a .gguf (its `.circuit.json` sidecar, if any) or an export
    folder from `run` (the GGUF of the source's name, or its only .gguf, and circuit.json)."""
    if edited.is_dir():
        files = [edited / name] if (edited / name).is_file() else sorted(edited.glob("*.gguf"))
        if len(files) != 1:
            raise CnaExportError(f"{edited} holds {len(files)} GGUF files, not one.", "pass the edited .gguf itself.")
        sidecar = edited / "circuit.json"
        return files[0], Circuit.load(sidecar) if sidecar.is_file() else None
    if edited.suffix != ".gguf" or not edited.is_file():
        raise CnaExportError(f"--edited {edited} is not a GGUF file or an export folder with one.",
                             "pass the patched .gguf (or the folder `run` wrote), or --backend torch.")  # fmt: skip
    from cna_export.gguf.patch import sidecar_path

    sidecar = sidecar_path(edited)
    return edited, Circuit.load(sidecar) if sidecar.is_file() else None


def sweep_gguf(
    path: Path, attribution, ks: Sequence[int], multipliers: Sequence[float], positive: Sequence[str],
    negative: Sequence[str], behaviour: str, cfg: EvalConfig, *, model_name: str, recipe: str | None = None,
    kl_budget: float | None = 0.1, benign_budget: float | None = None, goal: str | None = None,
    allow_negative: bool = False, out: Path | None = None, split: str = "validation", n_threads: int | None = None,
) -> tuple[dict, list[dict], dict[int, Circuit]]:  # fmt: skip
    """`sweep.run_sweep` in llama.cpp: every (k, m) point is the file patched at that point."""
    from cna_export.evaluate import sweep as S
    from cna_export.fold.scale import check_multiplier

    for m in multipliers:
        check_multiplier(m, allow_negative)
    detector = detector_for(behaviour)
    circuits = {k: attribution.circuit(k, behaviour=behaviour, recipe=recipe) for k in ks}
    baseline = original_baseline(path, positive, negative, detector, cfg, n_threads=n_threads)
    results = S.results_document(
        "sweep", model_name, behaviour, cfg, baseline, goal=goal or S.goal_of(min(multipliers)), kl_budget=kl_budget,
        benign_budget=benign_budget, ks=list(ks), multipliers=list(multipliers),
        num_neurons=circuits[ks[0]].num_neurons, recipe=recipe, split=split, backend="llama.cpp",
    )  # fmt: skip
    records = list(baseline.records)

    def point(k: int, m: float) -> tuple[dict, list[dict]]:
        with patched(path, circuits[k], m, allow_negative) as variant:
            return gguf_measure(variant, baseline, detector, cfg, label=f"k={k} m={m:g}", k=k, multiplier=m,
                                n_threads=n_threads)  # fmt: skip

    S.sweep_grid(results, records, ks, multipliers, point, kl_budget=kl_budget, benign_budget=benign_budget, out=out)
    return results, records, circuits
