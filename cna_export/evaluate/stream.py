"""Report folders that fill as an evaluation runs, and survive an interruption as a partial report.

An `eval` or `sweep` writes into a staged folder (a temporary sibling of `--out`, `cna_export.io.output.OutputPlan`,
with the same rules as every output: an existing `--out` is replaced only with `--overwrite` and only if
cna-export wrote it, and never inside a model it evaluates): every
variant's per-prompt records are appended to `prompts.jsonl` as soon as the variant finishes. At the end the
results, report and figures are written and the folder is renamed into place. Stopped by Ctrl-C or SIGTERM after
at least the original model was measured, the job writes `results.json` (with a `"partial"` entry) and `report.md`
from what finished, and the folder is still committed whole. Stopped before that, nothing appears.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cna_export.io.output import OutputPlan, write_text_atomic

RESULTS = "results.json"
RECORDS = "prompts.jsonl"
CARRIED = ("judge_cache.jsonl",)  # files of a previous report folder that a new one keeps (the judge's cache)


class PartialReport(KeyboardInterrupt):
    """An interrupted job whose finished variants were written as a partial report (the CLI exits 128 + signal)."""

    def __init__(self, signum: int, folder: Path) -> None:
        super().__init__(signum)
        self.folder = folder
        self.note = f"partial report of what finished written to {folder}"


class ReportStream:
    """The metrics and per-prompt records of an evaluation, variant by variant; records are appended to
    `prompts.jsonl` in `folder` as each variant finishes (the original first).

    Example:
        >>> stream = ReportStream(tmp)
        >>> stream.add(baseline.metrics, baseline.records)  # then one call per variant
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.metrics: list[dict] = []
        self.records: list[dict] = []
        (self.folder / RECORDS).write_text("", encoding="utf-8")

    def add(self, metrics: dict, records: Sequence[dict]) -> None:
        with open(self.folder / RECORDS, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
        self.metrics.append(metrics)
        self.records += records

    def rewrite(self) -> None:
        """Write every record again (after a later step, such as the judge, added fields to them)."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        write_text_atomic(self.folder / RECORDS, text, overwrite=True)


def write_results(folder: Path, results: dict) -> None:
    """results.json in the staged report `folder`, replacing the one written before."""
    write_text_atomic(Path(folder) / RESULTS, json.dumps(results, indent=1), overwrite=True)


def report_outputs(out: Path, overwrite: bool, models: Sequence[str | Path | None]) -> OutputPlan:
    """The outputs of an eval or sweep, checked now, before any work: the report folder `out`, which must not
    exist unless `overwrite` (a folder cna-export wrote), nor lie inside or contain a local model it evaluates (a
    later `apply` would copy the report into its export, and `push` would publish it). The caller may add more
    outputs (eval --update-card: the card) before `staged_report`."""
    local = [Path(m).expanduser() for m in models if m is not None and Path(m).expanduser().exists()]
    outputs = OutputPlan(overwrite, protect=local)
    outputs.folder(out)
    return outputs


@contextlib.contextmanager
def staged_report(outputs: OutputPlan, out: Path, finish_partial: Callable[[Path, str], bool]) -> Iterator[Path]:
    """Yield the staged report folder of `out` (an output of `outputs`); commit the outputs when the block ends,
    and on Ctrl-C / SIGTERM too when `finish_partial(folder, signal name)` wrote a partial report (it returns False
    when nothing had finished). An output the block did not write (the card, when stopped) is left as it was.

    Raises:
        PartialReport: after committing a partial report (a `KeyboardInterrupt`, so the run still stops).
    """
    out = Path(out)
    stopped: int | None = None
    with outputs:
        tmp = outputs.temp(out)
        for name in CARRIED:  # read from the previous report, which --overwrite is replacing
            if (out / name).is_file() and not (out / name).is_symlink():
                shutil.copyfile(out / name, tmp / name)
        try:
            yield tmp
        except KeyboardInterrupt as exc:
            signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else int(signal.SIGINT)
            if not finish_partial(tmp, signal.Signals(signum).name):
                raise
            stopped = signum
    if stopped is not None:
        raise PartialReport(stopped, out)


def mark_partial(results: dict, stopped_by: str, done: int, planned: int | None) -> dict:
    """`results` marked as a partial report: what stopped it, and how many variants of those planned finished."""
    results["partial"] = {"stopped_by": stopped_by, "variants_done": done, "variants_planned": planned}
    return results
