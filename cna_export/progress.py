"""Progress on stderr: bars that stay quiet for no or short work, and one overall bar across the phases of a job.

An evaluation runs many short loops (the original's answers, its scores, then the same for every variant); a bar
per loop tells a user little about when the whole job ends. Inside `overall(total)`, every loop wrapped by `track`
advances one bar instead, by its work units, so tqdm's estimate covers every phase. A unit is one decode step of
one prompt: a generated answer costs `max_new_tokens` units and a teacher-forced pass `SCORE_UNITS`, rough weights
that keep the estimate from jumping between generating and scoring phases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# A bar appears only after this many seconds, so work that ends sooner leaves no line on stderr.
QUIET_SECONDS = 2.0
# Work units of one prompt's teacher-forced pass (a prompt + answer forward) against the `max_new_tokens` units of
# generating its answer: a rough weight for the overall estimate, not a measurement.
SCORE_UNITS = 4

_current: list[tqdm] = []  # the active overall bar, if any (one per process: jobs do not nest)


def bar(iterable: Iterable | None = None, total: float | None = None, **kwargs) -> tqdm:
    """A tqdm bar that shows nothing for zero work (no `hashing: 0.00B` line) and appears only after
    `QUIET_SECONDS`, so short work leaves stderr clean.

    Example:
        >>> with bar(total=sum(sizes), unit="B", unit_scale=True, desc="hashing", leave=False) as b:
        ...     b.update(n)
    """
    kwargs.setdefault("delay", QUIET_SECONDS)
    if total == 0:
        kwargs["disable"] = True  # otherwise left to tqdm, which also reads TQDM_DISABLE from the environment
    return tqdm(iterable, total=total, **kwargs)


@contextlib.contextmanager
def overall(total: int, desc: str) -> Iterator[tqdm]:
    """One bar for a whole job: loops wrapped by `track` inside it advance this bar instead of showing their own."""
    with bar(total=total, desc=desc, unit="step", dynamic_ncols=True) as b:
        _current.append(b)
        try:
            yield b
        finally:
            _current.remove(b)


def track(items: Iterable[T], desc: str, units: Callable[[T], int]) -> Iterator[T]:
    """Iterate `items` (batches); inside `overall`, advance the overall bar by `units(item)` after each and show
    `desc` as the current phase, else show a quiet bar of its own.

    Example:
        >>> for ids, mask, chunk in track(batches(encoded, 8, pad), "original: benign", lambda b: len(b[2]) * 32):
        ...     ...
    """
    if not _current:
        yield from bar(items, desc=desc, unit="batch", leave=False)
        return
    top = _current[-1]
    top.set_postfix_str(desc, refresh=False)
    for item in items:
        yield item
        top.update(units(item))
