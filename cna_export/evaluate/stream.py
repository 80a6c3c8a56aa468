"""Report folders that fill as an evaluation runs, and survive an interruption as a partial report.

An `eval` or `sweep` writes into a staged folder (a temporary sibling of `--out`, `cna_export.io.output`): every
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

from cna_export.io.output import check_output_path, staged_output, write_text_atomic

REPORT_MARKER = "results.json"  # what marks a folder as a report of cna-export (so a new one may replace it)
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
        write_text_atomic(self.folder / RECORDS, text)


def write_results(folder: Path, results: dict) -> None:
    write_text_atomic(Path(folder) / REPORT_MARKER, json.dumps(results, indent=1))


def check_report_folder(out: Path) -> None:
    """Refuse, before any work, an `--out` that is an existing folder of other files: a report folder replaces
    only an earlier report (it holds results.json) or an empty folder."""
    check_output_path(Path(out), None, overwrite=True, marker=REPORT_MARKER)


@contextlib.contextmanager
def staged_report(out: Path, finish_partial: Callable[[Path, str], bool]) -> Iterator[Path]:
    """Yield the staged report folder of `out`; commit it when the block ends, and on Ctrl-C / SIGTERM too when
    `finish_partial(folder, signal name)` wrote a partial report (it returns False when nothing had finished).

    Raises:
        PartialReport: after committing a partial report (a `KeyboardInterrupt`, so the run still stops).
    """
    out = Path(out)
    check_report_folder(out)
    stopped: int | None = None
    with staged_output(out, overwrite=True, marker=REPORT_MARKER) as tmp:
        for name in CARRIED:
            if (out / name).is_file():
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
