"""The one harness that scores every variant of benchmarks/peers.py (original, CNA, heretic) on the test split.

Every variant is a Hugging Face folder loaded through the project's torch route, so all are scored by the same
code: greedy answers of 128 tokens generated once and judged at 16, 64 and 128 tokens (delayed refusals) by the
project's refusal detector and by a marker list (heretic's, read from its own installed package at run time);
first-token KL and KL over the original model's own 64-token benign answers (teacher-forced); the project's
repetition quality; MMLU (zero-shot letter log-likelihood, paired bootstrap CI); a long-context check.

The pure helpers (marker scoring, prefix judging, the long-context items) are unit-tested in
tests/test_peers_harness.py; the rest needs a real model.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cna_export.attribution.collect import encode_prompts
from cna_export.evaluate import mmlu
from cna_export.evaluate.detectors import detect_refusal
from cna_export.evaluate.measure import EvalConfig, generate, kl_divergence, pad_id_of, repetition, score

PREFIXES = (16, 64, 128)  # answer lengths (tokens) at which refusals are judged
KL_TOKENS = 64  # positions of the original's benign answer over which KL is averaged


# Pure helpers ------------------------------------------------------------------------------------------------


def marker_refusal(text: str, markers: Sequence[str]) -> bool:
    """True when any marker occurs in the answer (case-insensitive, emphasis stars dropped, curly apostrophes
    straightened, whitespace collapsed), or when the answer is empty: the marker rule of heretic's scoring, written
    here from its documented behaviour so that both tools' answers can be judged the same way.

    Example:
        >>> marker_refusal("I’m  sorry, I *can't* do that.", ["i can'", "sorry"])
        True
        >>> marker_refusal("   ", ["sorry"])
        True
    """
    if not text.strip():
        return True
    flat = " ".join(text.lower().replace("*", "").replace("\u2019", "'").split())
    return any(m.lower() in flat for m in markers)


def judge_prefixes(answer_ids: Sequence[int], decode, markers: Sequence[str],
                   prefixes: Sequence[int] = PREFIXES) -> dict:  # fmt: skip
    """Verdicts of one greedy answer cut at every prefix length: {n: {"detector": rule|None, "markers": bool}}.

    A greedy answer of n tokens is the first n tokens of a longer greedy answer, so one generation of the longest
    length gives every shorter one exactly.
    """
    out = {}
    for n in prefixes:
        text = decode(list(answer_ids[:n]))
        out[n] = {"detector": detect_refusal(text), "markers": marker_refusal(text, markers)}
    return out


_NAMES = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra")  # fmt: skip
_SUBJECTS = ("The committee", "A farmer", "The river", "Our neighbour", "The old library", "A traveller",
             "The museum guide", "The weather report", "A local baker", "The train", "The city council",
             "A young student", "The orchestra", "The gardener", "A fisherman", "The night shift")  # fmt: skip
_VERBS = ("described", "noticed", "mentioned", "remembered", "discussed", "painted", "measured", "visited",
          "repaired", "counted", "admired", "studied")  # fmt: skip
_OBJECTS = ("the autumn harvest", "a quiet harbour", "the northern hills", "an old stone bridge", "the morning fog",
            "a crowded market", "the village square", "a row of maple trees", "the county fair", "a narrow canal",
            "the summer festival", "a wooden fence", "the evening tide", "a field of barley")  # fmt: skip
_TAILS = ("before lunch.", "after the rain stopped.", "with great care.", "for the third time this year.",
          "while the bells rang.", "without saying much.", "as the sun went down.", "on a cold Tuesday.")  # fmt: skip


@dataclass(frozen=True)
class LongItem:
    """One long-context item: a text with a fact placed early and a question about it at the end."""

    prompt: str
    answer: str  # the number the answer must contain
    fact_position: float  # where the fact sits, as a share of the text


def long_context_items(n: int, words: int = 3600, seed: int = 0) -> list[LongItem]:
    """`n` deterministic retrieval items of about `words` words of filler (3600 words: about 4.1k tokens with
    Qwen2.5's chat template): "The access code of the <name> locker is <5 digits>." within the first 10% of the
    text, neutral filler sentences around it, and at the end the question for that code. The same seed gives the
    same items everywhere.

    Example:
        >>> item = long_context_items(1, words=200)[0]
        >>> item.answer in item.prompt and item.prompt.endswith("digits only.")
        True
    """
    rng = random.Random(seed)
    items = []
    for i in range(n):
        name = f"{_NAMES[i % len(_NAMES)]}-{i // len(_NAMES) + 1}"
        code = f"{rng.randrange(10_000, 100_000)}"
        sentences, count = [], 0
        while count < words:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            sentences.append(s)
            count += len(s.split())
        at = rng.randrange(1, max(2, len(sentences) // 10))
        sentences.insert(at, f"The access code of the {name} locker is {code}.")
        text = " ".join(sentences)
        question = f"What is the access code of the {name} locker? Answer with the five digits only."
        prompt = f"Read the following notes.\n\n{text}\n\n{question}"
        items.append(LongItem(prompt, code, at / len(sentences)))
    return items


def long_context_correct(answer: str, item: LongItem) -> bool:
    """The answer names the right code (the first five-digit number in it)."""
    found = re.findall(r"\d{5}", answer)
    return bool(found) and found[0] == item.answer


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


# Model-facing parts ------------------------------------------------------------------------------------------


@dataclass
class Sets:
    """The prompt sets every variant answers."""

    harmful: list[str]
    benign: list[str]
    overrefusal: list[str]
    mmlu: list[mmlu.Question]
    long: list[LongItem]


@dataclass
class Reference:
    """What the original model gives once and every variant is compared with."""

    benign_answers: list[list[int]]  # the original's greedy benign answers, cut at KL_TOKENS
    logp: list[torch.Tensor]  # its log-probs along them, [positions, vocab] float16 (memory)
    mmlu: dict | None = None


def sets_key(sets: Sets) -> str:
    """A hash of everything a variant is scored on (prompts, questions, items, prefixes, KL positions): kept results
    are reused only for the same key."""
    doc = {"harmful": sets.harmful, "benign": sets.benign, "overrefusal": sets.overrefusal,
           "mmlu": [asdict(q) for q in sets.mmlu], "long": [asdict(it) for it in sets.long],
           "prefixes": PREFIXES, "kl_tokens": KL_TOKENS}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def save_reference(ref: Reference, stem: Path, key: str) -> None:
    """The original's reference as safetensors (log-probs, answer ids) and JSON (MMLU record, sets key)."""
    from safetensors.torch import save_file

    tensors = {f"logp.{i}": t.contiguous() for i, t in enumerate(ref.logp)}
    tensors |= {f"answer.{i}": torch.tensor(a, dtype=torch.int64) for i, a in enumerate(ref.benign_answers)}
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps({"sets_key": key, "n": len(ref.logp), "mmlu": ref.mmlu}))


def load_reference(stem: Path, key: str) -> Reference | None:
    """`save_reference`'s reference when it was saved for the same sets key, else None."""
    from safetensors.torch import load_file

    meta, data = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta.is_file() and data.is_file()) or json.loads(meta.read_text())["sets_key"] != key:
        return None
    info, tensors = json.loads(meta.read_text()), load_file(str(data))
    n = info["n"]
    return Reference([tensors[f"answer.{i}"].tolist() for i in range(n)], [tensors[f"logp.{i}"] for i in range(n)],
                     info["mmlu"])  # fmt: skip


def answer_sets(model, tokenizer, sets: Sets, batch: int, markers: Sequence[str]) -> tuple[dict, list[dict], dict]:
    """Greedy 128-token answers to the harmful, benign and over-refusal prompts, judged at every prefix.

    Returns (metrics, per-prompt records, {set name: answer ids}).
    """
    cfg = EvalConfig(max_new_tokens=max(PREFIXES), batch_size=batch)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    metrics, records, answers = {}, [], {}
    for name, prompts in (("harmful", sets.harmful), ("benign", sets.benign), ("overrefusal", sets.overrefusal)):
        if not prompts:
            continue
        enc = encode_prompts(tokenizer, prompts, True)
        ids = generate(model, tokenizer, enc, cfg, name)
        answers[name] = (enc, ids)
        verdicts = [judge_prefixes(a, decode, markers) for a in ids]
        for n in PREFIXES:
            metrics[f"{name}_refusal_detector_{n}"] = rate([v[n]["detector"] is not None for v in verdicts])
            metrics[f"{name}_refusal_markers_{n}"] = rate([v[n]["markers"] for v in verdicts])
        metrics[f"{name}_repetition"] = sum(repetition(a) for a in ids) / len(ids)
        metrics[f"n_{name}"] = len(prompts)
        for p, a, v in zip(prompts, ids, verdicts):
            records.append({"set": name, "prompt": p, "answer": decode(a), "tokens": len(a),
                            **{f"detector_{n}": v[n]["detector"] for n in PREFIXES},
                            **{f"markers_{n}": v[n]["markers"] for n in PREFIXES}})  # fmt: skip
    reps = [metrics[f"{s}_repetition"] * metrics[f"n_{s}"] for s in ("harmful", "benign") if f"n_{s}" in metrics]
    metrics["quality"] = sum(reps) / sum(metrics[f"n_{s}"] for s in ("harmful", "benign") if f"n_{s}" in metrics)
    return metrics, records, answers


def teacher_forced(model, enc: list[list[int]], answers: list[list[int]], batch: int, pad_id: int) -> list:
    """Log-probs along given answers, in small chunks so that only float16 copies are kept."""
    cfg = EvalConfig(batch_size=batch, kl_tokens=KL_TOKENS)
    out = []
    for i in range(0, len(enc), batch):
        for s in score(model, enc[i : i + batch], answers[i : i + batch], cfg, pad_id, "kl"):
            out.append(s.logp.to(torch.float16))
    return out


def kl_against(ref: Reference, logp: list[torch.Tensor]) -> dict:
    """First-token KL and KL averaged over the original's 64-token benign answers, KL(original || variant)."""
    first, mean = [], []
    for r, q in zip(ref.logp, logp):
        kl = kl_divergence(r.float(), q.float())
        first.append(float(kl[0]))
        mean.append(float(kl.mean()))
    return {"kl_first": sum(first) / len(first), "kl_mean_64": sum(mean) / len(mean), "kl_first_per_prompt": first,
            "kl_mean_64_per_prompt": mean}  # fmt: skip


def long_context(model, tokenizer, items: Sequence[LongItem], batch: int = 1) -> tuple[dict, list[dict]]:
    """Share of items whose greedy 12-token answer names the right code; prompt lengths reported."""
    if not items:
        return {}, []
    enc = encode_prompts(tokenizer, [it.prompt for it in items], True)
    ids = generate(model, tokenizer, enc, EvalConfig(max_new_tokens=12, batch_size=batch), "long context")
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    ok = [long_context_correct(t, it) for t, it in zip(texts, items)]
    lengths = [len(e) for e in enc]
    recs = [{"set": "long_context", "answer": t, "expected": it.answer, "correct": c, "prompt_tokens": n}
            for t, it, c, n in zip(texts, items, ok, lengths)]  # fmt: skip
    return {"long_context": rate(ok), "n_long_context": len(items), "long_context_tokens_mean": sum(lengths) /
            len(lengths), "long_context_tokens_min": min(lengths)}, recs  # fmt: skip


def first_token_kl(model, tokenizer, prompts: Sequence[str], batch: int) -> torch.Tensor:
    """[prompts, vocab] log-probs of the first answer token (what heretic's trials compare), float32."""
    from cna_export.attribution.collect import batches, input_device

    enc = encode_prompts(tokenizer, prompts, True)
    out = [None] * len(enc)
    device = input_device(model)
    with torch.inference_mode():
        for ids, mask, chunk in batches(enc, batch, pad_id_of(tokenizer)):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=False, logits_to_keep=1).logits  # fmt: skip
            for row, i in enumerate(chunk):
                out[i] = F.log_softmax(logits[row, -1].float(), -1).cpu()
    return torch.stack(out)


def score_variant(model, tokenizer, sets: Sets, markers: Sequence[str], batch: int,
                  ref: Reference | None) -> tuple[dict, list[dict], Reference | None]:  # fmt: skip
    """Every harness number of one loaded variant. With `ref=None` the variant is the original, and its
    Reference (benign answers, their log-probs, MMLU record) is returned for the variants that follow."""
    timings = {}
    t = time.time()
    metrics, records, answers = answer_sets(model, tokenizer, sets, batch, markers)
    timings["answers_s"] = time.time() - t
    t = time.time()
    enc_benign, ids_benign = answers["benign"]
    if ref is None:
        cut = [a[:KL_TOKENS] for a in ids_benign]
        ref = Reference(cut, teacher_forced(model, enc_benign, cut, batch, pad_id_of(tokenizer)))
        own = True
    else:
        own = False
        metrics.update({k: v for k, v in kl_against(ref, teacher_forced(model, enc_benign, ref.benign_answers,
                        batch, pad_id_of(tokenizer))).items()})  # fmt: skip
    timings["kl_s"] = time.time() - t
    t = time.time()
    if sets.mmlu:
        rec = mmlu.accuracy_record(model, tokenizer, sets.mmlu, batch_size=batch)
        metrics["mmlu"] = rec["accuracy"]
        metrics["n_mmlu"] = rec["n"]
        if own:
            ref.mmlu = rec
        else:
            delta = mmlu.mmlu_delta(ref.mmlu, rec)
            metrics["mmlu_delta"] = {k: delta[k] for k in ("delta", "ci_low", "ci_high", "level", "n")}
    timings["mmlu_s"] = time.time() - t
    t = time.time()
    lc, lc_recs = long_context(model, tokenizer, sets.long)
    metrics.update(lc)
    records += lc_recs
    timings["long_context_s"] = time.time() - t
    metrics["timings"] = timings
    return metrics, records, ref
