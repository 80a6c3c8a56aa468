"""Command line: the parser (each command in the cli module named after it or its subject) and `main`, which
turns every user error into one line and exit code 2.

Errors the user can fix print as one line and exit 2; set CNA_EXPORT_DEBUG=1 (or --debug) for tracebacks.
Everything a command prints (stdout, log lines, errors) has its control characters escaped
(`cna_export.errors.printable`): circuits, recipes, prompts and GGUF metadata are untrusted text.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import logging.handlers
import os
import signal
import sys
import threading
from collections.abc import Sequence

from cna_export import __version__
from cna_export.attribution import distributed
from cna_export.cli import adapter, chat, circuit, diff, edit, gguf, push, recipe, sweep, tune
from cna_export.cli import eval as evaluate
from cna_export.cli.options import EXAMPLES, Parser
from cna_export.errors import CnaExportError, printable

log = logging.getLogger("cna_export")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cna-export", description="Find the MLP neurons behind a behaviour and ship the edit.")
    parser.add_argument("--version", action="version", version=f"cna-export {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, help: str, parents: list) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            parents=parents,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    # One module per command or subject; the order here is the order `--help` lists the commands in.
    for module in (edit, gguf, recipe, circuit, adapter, evaluate, chat, sweep, push, diff, tune):
        module.register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("CNA_EXPORT_DEBUG"))
    held = _CommandLog.start(args.verbose or debug)
    try:
        with _termination_as_interrupt(), _printable_stdout():
            distributed.init_from_env()
            code = args.func(args)
    except CnaExportError as exc:
        if debug:
            raise
        held.drop()
        print(f"cna-export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        held.drop()
        print(f"cna-export: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        held.drop()
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        # An eval or sweep stopped after the original was measured committed a partial report (evaluate/stream.py).
        what = getattr(exc, "note", "temporary files removed")
        print(f"cna-export: interrupted ({signal.Signals(signum).name}); {what}.", file=sys.stderr)
        return 128 + signum
    finally:
        held.close()
        distributed.shutdown()
    return code or 0


class _CommandLog(logging.handlers.MemoryHandler):
    """The log of one command on stderr (Python warnings included), its control characters escaped. Without -v,
    warnings wait for the command's end: printed after it succeeds, dropped when it fails, so that a failed
    command prints exactly one line, its error. With -v (or --debug) every record is printed as it comes, progress
    details included."""

    def __init__(self, hold: bool) -> None:
        target = logging.StreamHandler(sys.stderr)
        target.setFormatter(_PrintableFormatter("%(message)s"))
        flush = logging.CRITICAL + 1 if hold else logging.NOTSET
        super().__init__(capacity=10_000, flushLevel=flush, target=target, flushOnClose=True)

    @classmethod
    def start(cls, verbose: bool) -> _CommandLog:
        """Attach to the root logger (in place of `logging.basicConfig`, whose handler prints at once)."""
        handler = cls(hold=not verbose)
        root = logging.getLogger()
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        root.addHandler(handler)
        logging.captureWarnings(True)
        return handler

    def drop(self) -> None:
        """Forget the held records (the command failed; its error line is all it prints)."""
        with self.lock:
            self.buffer.clear()

    def close(self) -> None:
        """Print what is held and detach."""
        super().close()
        logging.getLogger().removeHandler(self)
        logging.captureWarnings(False)


# What to do about an operating-system error, by errno; the problem itself is the system's message.
_OS_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write to another disk",
    errno.EROFS: "write to a location that is not on a read-only file system",
    errno.EACCES: "check the permissions of that path or choose another location",
    errno.EPERM: "check the permissions of that path or choose another location",
    errno.ENOENT: "check the path",
    errno.EISDIR: "pass a file, not a folder",
    errno.ENOTDIR: "check the path; a part of it is a file, not a folder",
    errno.EIO: "the disk reported an I/O error; check it and try again",
}


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: the system's message, the path, and a fix that fits the errno."""
    where = f" ({exc.filename})" if exc.filename else ""
    problem = exc.strerror or str(exc) or exc.__class__.__name__
    fix = _OS_FIXES.get(exc.errno, "check the path, its permissions and the free space")
    return printable(" ".join(f"{problem}{where}. Fix: {fix}.".split()))  # a file name can come from a file


class _PrintableFormatter(logging.Formatter):
    """Log lines with their control characters escaped (a warning may quote a tensor name or a prompt)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n\t")


class _PrintableStream:
    """A text stream that escapes control characters before they reach the terminal (everything else passes)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(printable(text, keep="\n\t"))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _printable_stdout():
    """What commands print (a circuit's summary, chat transcripts, diff tables) goes to stdout through
    `printable`: one place for every print, so an untrusted string cannot reach the terminal raw."""
    original = sys.stdout
    sys.stdout = _PrintableStream(original)
    try:
        yield
    finally:
        sys.stdout = original


@contextlib.contextmanager
def _termination_as_interrupt():
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so a killed-politely run removes its temporaries too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
