"""Outputs: every path a command writes is checked before anything is written, staged, and committed at the end.

One rule for every writing command (`OutputPlan`):

* An output path that exists is refused unless the user passed `--overwrite`.
* `--overwrite` replaces only what cna-export wrote: a plain file for a file output, a folder holding
  `OUTPUT_MARKER` (which every folder cna-export writes holds) or an empty folder for a folder output. A folder
  the user made, a folder where a file goes, a file where a folder goes, and a symbolic link are never replaced.
* No output may overlap a protected input (the source model, an edited model under evaluation).
* A command with several outputs (a GGUF and its Modelfile, a patched GGUF and its sidecar, an evaluation folder
  and a model card) checks all of them before writing any, writes each into a hidden temporary sibling,
  `.NAME.cna-tmp-HOST-PID-RANDOM`, and renames them into place together at the very end. A failure, Ctrl-C or
  SIGTERM before that leaves nothing; a failure during the renames puts back what was already renamed.
* Nothing is deleted but this process's own temporaries (which, after a replacement, hold the previous output),
  and temporaries of killed runs on this machine (`remove_stale_temps`).

A run killed with SIGKILL while writing leaves either the previous state or the complete new output at `NAME`,
never a half-written one; what it may leave is its clearly temporary sibling, which the next run writing `NAME`
removes. Replacing an existing output swaps the two atomically where Linux allows it (`renameat2(RENAME_EXCHANGE)`);
the temporaries and renames live in `cna_export.io.temps`.

Every output's name is checked by `cna_export.io.names.check_name` (it may be written into a Modelfile, a card's
YAML or Markdown).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cna_export import __version__
from cna_export.errors import OutputError
from cna_export.io.names import check_name
from cna_export.io.temps import remove_stale_temps, remove_temp, rename_new, swap, temp_sibling

# Every folder cna-export writes holds this file; `--overwrite` replaces no other non-empty folder. It is hidden,
# so the card does not list it and `push` does not upload it (both skip hidden files).
OUTPUT_MARKER = ".cna-export"
MARKER_TEXT = f"Written by cna-export {__version__}. `cna-export ... --overwrite` may replace this folder.\n"
# Errors that mean "this location cannot take the output", as opposed to a bad input.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# Checks --------------------------------------------------------------------------------------------------------


@dataclass
class _Output:
    path: Path  # absolute
    folder: bool
    overwrite: bool
    written_with: Path | None  # a file that must exist beside `path` for --overwrite to replace it
    temp: Path | None = None


def _check_overlap(out: Path, protect: Sequence[Path]) -> None:
    out_r = out.resolve()
    for source in protect:
        src_r = Path(source).resolve()
        src_dir = src_r if src_r.is_dir() else src_r.parent
        if out_r == src_r or src_r.is_relative_to(out_r) or (src_r.is_dir() and out_r.is_relative_to(src_dir)):
            raise OutputError(
                f"Output {out} overlaps the source model {source}.",
                "write it to a separate folder; cna-export never writes into a model it reads.",
            )


def _check_existing(o: _Output) -> None:
    """Refuse an existing path that this output may not replace (see the module docstring)."""
    out = o.path
    if not (out.exists() or out.is_symlink()):
        return
    never = "choose another path, or delete it yourself if it is really to be replaced."
    if out.is_symlink():
        raise OutputError(f"Output {out} is a symbolic link, which cna-export never replaces.", never)
    if o.folder and not out.is_dir():
        raise OutputError(f"Output {out} is an existing file, and this output is a folder.", never)
    if not o.folder and out.is_dir():
        raise OutputError(f"Output {out} is an existing folder, and this output is a file.", never)
    if not o.folder and not out.is_file():
        raise OutputError(f"Output {out} exists and is not a regular file.", never)
    if o.folder and not (out / OUTPUT_MARKER).is_file() and any(out.iterdir()):
        raise OutputError(
            f"Output {out} is an existing folder that was not written by cna-export (it has no {OUTPUT_MARKER} "
            "marker), so --overwrite will not replace it.",
            never,
        )
    if not o.overwrite:
        raise OutputError(f"Output {out} already exists.", "pass --overwrite to replace it, or choose another path.")
    if o.written_with is not None and not o.written_with.is_file():
        raise OutputError(
            f"Output {out} exists but was not written by cna-export (it has no {o.written_with.name} beside it), "
            "so --overwrite will not replace it.",
            never,
        )


def _check_parent(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.exists():
        raise OutputError(f"Output folder {parent} does not exist.", "create it first or choose another path.")
    if not parent.is_dir():
        raise OutputError(f"Output folder {parent} is a file, not a folder.", "choose another path.")
    # os.access also reports a read-only file system (EROFS), which permission bits do not show for root.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Output folder {parent} is not writable.", "choose a writable location.")


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the file system of `folder` has less than `needed` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < needed:
        raise OutputError(
            f"Not enough free space in {folder}: the output needs {_size(needed)} and {_size(free)} are free.",
            "free some space or choose an --out location on another disk.",
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# The plan --------------------------------------------------------------------------------------------------------


class OutputPlan:
    """The outputs of one command: all checked when added, staged together, committed together.

    Args:
        overwrite: the user's `--overwrite`, for every output unless one says otherwise.
        protect: inputs no output may overlap (the source model), for every output unless one says otherwise.

    Example:
        >>> plan = OutputPlan(overwrite=False, protect=[model_dir])
        >>> plan.file(Path("m.gguf")); plan.file(Path("Modelfile"))   # refused here if either cannot be written
        >>> with plan:                                                 # long work below; nothing visible yet
        ...     write_gguf(plan.temp(Path("m.gguf"))); write_modelfile(plan.temp(Path("Modelfile")))
        >>> # both renamed into place together; on any failure, neither
    """

    def __init__(self, overwrite: bool = False, protect: Sequence[Path | None] = ()) -> None:
        self.overwrite = overwrite
        self.protect = [Path(p) for p in protect if p is not None]
        self.outputs: dict[Path, _Output] = {}
        self._active = False

    def file(
        self,
        path: Path,
        *,
        overwrite: bool | None = None,
        written_with: Path | None = None,
        protect: Sequence[Path | None] | None = None,
    ) -> Path:
        """Add a file output and check it now; `written_with`: a file that must exist beside an existing `path`
        for `--overwrite` to replace it (patch-gguf's sidecar). Returns `path`."""
        return self._add(path, False, overwrite, written_with, protect)

    def folder(
        self, path: Path, *, overwrite: bool | None = None, protect: Sequence[Path | None] | None = None
    ) -> Path:
        """Add a folder output and check it now. Its temporary is created holding `OUTPUT_MARKER`. Returns `path`."""
        return self._add(path, True, overwrite, None, protect)

    def _add(
        self,
        path: Path,
        folder: bool,
        overwrite: bool | None,
        written_with: Path | None,
        protect: Sequence[Path | None] | None,
    ) -> Path:
        if self._active:
            raise RuntimeError("outputs are added to a plan before it is entered")
        path = Path(path)
        o = _Output(
            path.absolute(),
            folder,
            self.overwrite if overwrite is None else overwrite,
            Path(written_with).absolute() if written_with is not None else None,
        )
        check_name(o.path.name)
        _check_overlap(o.path, self.protect if protect is None else [Path(p) for p in protect if p is not None])
        _check_existing(o)
        _check_parent(o.path)
        self.outputs[o.path] = o
        return path

    def temp(self, path: Path) -> Path:
        """Where to write the output `path` while the plan is active (a folder exists already, a file does not)."""
        o = self.outputs[Path(path).absolute()]
        if o.temp is None:
            raise RuntimeError("a plan's temporaries exist only inside `with plan:`")
        return o.temp

    def __enter__(self) -> OutputPlan:
        self._active = True
        try:
            for o in self.outputs.values():
                remove_stale_temps(o.path)
                o.temp = temp_sibling(o.path)
                if o.folder:
                    o.temp.mkdir()
                    (o.temp / OUTPUT_MARKER).write_text(MARKER_TEXT)
        except BaseException as exc:
            self._discard()
            if (located := self._located(exc)) is None:
                raise
            raise located from exc
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if exc is None:
                self._commit()
        except BaseException as err:
            self._discard()
            if (located := self._located(err)) is None:
                raise
            raise located from err
        self._discard()
        if exc is not None and (located := self._located(exc)) is not None:
            raise located from exc

    def _located(self, exc: BaseException) -> OutputError | None:
        """Running out of space or a read-only file system as a one-line error naming the output; else None."""
        out = ", ".join(str(p) for p in self.outputs)
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return OutputError(
                f"No space left on the device while writing {out} ({exc.strerror}); the partial output was removed.",
                "free some space or choose an --out location on another disk.",
            )
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:
            return OutputError(f"Cannot write {out}: the file system is read-only.", "choose a writable location.")
        return None

    def _commit(self) -> None:
        """Rename every temporary into place; if one rename fails, undo the ones done before it."""
        # An output the command did not write (eval's card when a partial report is committed) stays as it was.
        written = [o for o in self.outputs.values() if o.temp is not None and (o.temp.exists() or o.temp.is_symlink())]
        for o in written:
            _check_existing(o)  # again: something may have appeared there while this command ran
        done: list[tuple[_Output, bool]] = []
        try:
            for o in written:
                replaced = o.path.exists()
                if replaced:
                    swap(o.temp, o.path)  # the temporary now holds the previous output
                else:
                    rename_new(o.temp, o.path)
                done.append((o, replaced))
        except BaseException:
            for o, replaced in reversed(done):  # put back what was already renamed
                with contextlib.suppress(OSError):
                    if replaced:
                        swap(o.temp, o.path)
                    else:
                        os.rename(o.path, o.temp)
            raise

    def _discard(self) -> None:
        """Remove this plan's temporaries (after a commit, the previous outputs that were replaced)."""
        for o in self.outputs.values():
            if o.temp is not None:
                remove_temp(o.temp)
                o.temp = None
        self._active = False


def check_output_path(out: Path, source: Path | None = None, overwrite: bool = False, *, folder: bool) -> None:
    """Check one output now, before long work whose writer makes its own `OutputPlan` later (same rules)."""
    plan = OutputPlan(overwrite, [source])
    plan.folder(out) if folder else plan.file(out)


@contextlib.contextmanager
def staged_output(
    out: Path, overwrite: bool = False, is_dir: bool = True, protect: Sequence[Path | None] = ()
) -> Iterator[Path]:
    """A one-output `OutputPlan`: yield the temporary of `out`; on success it is renamed to `out`, else removed.

    Example:
        >>> with staged_output(Path("edited"), overwrite=True) as tmp:
        ...     write_everything_into(tmp)
    """
    plan = OutputPlan(overwrite, protect)
    plan.folder(out) if is_dir else plan.file(out)
    with plan:
        yield plan.temp(out)


def write_text_atomic(path: Path, text: str, overwrite: bool = False) -> Path:
    """Write a small text file through a one-output plan: an existing `path` is replaced only with `overwrite`
    (and only if it is a file)."""
    with staged_output(Path(path), overwrite, is_dir=False) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
