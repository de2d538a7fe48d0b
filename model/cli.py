"""One clear line for the errors an operator can fix, shared by every command-line tool of the repository.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)              # parser built with cli.add_debug_flag(parser)
        return cli.run_cli(lambda: _run(args), debug=args.debug, disk=[args.out])

`run_cli` calls the tool and turns what the user can fix into `error: <what>: <problem>` on stderr and an exit code:

* exit 2 (`EXIT_USAGE`), usage errors: a `CliError`; a file or folder the user named that is missing, is a file where
  a folder is wanted (or the other way round), already exists, cannot be read or created (permission denied,
  read-only file system): FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
  FileExistsError, or an OSError with one of those errno values; and the exception types the tool lists in
  `user_errors` (e.g. the ValueError a config loader raises for a bad name).
* exit 4 (`EXIT_DISK_FULL`), a full disk: ENOSPC / EDQUOT anywhere in the exception chain, the words of a full
  disk (SQLite's "database or disk is full"), or torch.save's C++ writer failing a short write ("unexpected pos
  N vs M", "PytorchStreamWriter failed writing file ...: file write failed"), which carries no errno. The line
  names the file (when known) and the free space of the folders the tool writes to (`disk`).

Anything else is a bug or an outage nobody planned for: it keeps its traceback. `--debug` prints the traceback
of a handled error too, before its one line; the exit code stays the same.

Standard library only (`model/` imports nothing of training/ or data_pipeline/); training.lifecycle reuses
`write_failure` and `free_space` for the trainer's own full-disk line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

EXIT_USAGE = 2
EXIT_DISK_FULL = 4

# errno values of a path the user named (or a folder the tool was told to create) that is not usable as given
USAGE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP}
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
PROBLEMS = {
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}
# Words of a full disk in exceptions that carry no errno (SQLite, wrapped OSErrors)
FULL_WORDS = ("no space left on device", "disk quota exceeded", "database or disk is full")
# torch.save's C++ zip writer on a short write: no errno, just these words (a full disk, a quota, a file size limit)
WRITE_FAILED_WORDS = ("unexpected pos", "pytorchstreamwriter failed writing", "file write failed")
_ENFORCE = re.compile(r"\[enforce fail at [^\]]*\]\s*\.?\s*")


class CliError(Exception):
    """A failure the operator can fix, with its one-line message (naming the path) and its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error too (for bug reports)")
    return parser


def one_line(text: str) -> str:
    """`text` on one line: newlines and runs of blanks become one space; torch's '[enforce fail at ...]' dropped."""
    return " ".join(_ENFORCE.sub("", str(text)).split())


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _existing(path: str | os.PathLike) -> Path:
    q = Path(path)
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def free_space(path: str | os.PathLike) -> str | None:
    """'X GiB free of Y GiB' on the file system of `path` (its nearest existing folder); None if unknown."""
    try:
        usage = shutil.disk_usage(_existing(path))
    except OSError:
        return None
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def free_space_of(paths: Iterable[str | os.PathLike]) -> str:
    """'A: X free of Y; B: ...' for each path on a file system not already listed, or 'free space unknown'."""
    parts, devices = [], set()
    for p in dict.fromkeys(os.fspath(p) for p in paths):
        try:
            device = _existing(p).stat().st_dev
        except OSError:
            device = None
        free = free_space(p)
        if free is None or (device is not None and device in devices):
            continue
        devices.add(device)
        parts.append(f"{p}: {free}")
    return "; ".join(parts) or "free space unknown"


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def write_failure(exc: BaseException) -> tuple[str, BaseException] | None:
    """('full', the exception saying so) when the chain of `exc` holds a full disk or quota (an errno or its
    words); ('write_failed', ...) when it holds torch.save's short write, which has no errno; else None."""
    failed = None
    for e in chain(exc):
        text = str(e).lower()
        if (isinstance(e, OSError) and e.errno in FULL_ERRNOS) or any(w in text for w in FULL_WORDS):
            return "full", e
        if failed is None and any(w in text for w in WRITE_FAILED_WORDS):
            failed = e
    return ("write_failed", failed) if failed is not None else None


def _not_a_folder(path: str) -> str | None:
    """The first component of `path` that exists and is not a folder (why ENOTDIR)."""
    p = Path(path)
    for q in [*reversed(p.parents), p]:
        if q.exists() and not q.is_dir():
            return str(q)
        if not q.exists():
            return None
    return None


def describe(exc: OSError) -> str:
    """'<path>: <problem>' for an OSError from the system (errno and file name); the message itself for one the
    code raised with its own words (they name the path)."""
    if exc.filename is None or exc.errno is None:
        text = str(exc)
        if exc.errno is not None and exc.strerror and text.startswith("[Errno"):
            text = PROBLEMS.get(exc.errno, exc.strerror.lower())  # bare '[Errno 28] No space left on device'
        return one_line(text)
    path = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        path = f"{path} -> {os.fsdecode(exc.filename2)}"
    return f"{path}: {problem(exc)}"


def problem(exc: OSError) -> str:
    """What is wrong, in words, for a system OSError: 'permission denied', '/a/b is a file, not a folder', ..."""
    words = PROBLEMS.get(exc.errno) or one_line(exc.strerror or str(exc)).lower()
    if exc.errno == errno.ENOTDIR and exc.filename is not None:
        blocker = _not_a_folder(os.fsdecode(exc.filename))
        if blocker is not None:
            words = f"{blocker} is a file, not a folder"
    return words


def is_usage_oserror(exc: BaseException) -> bool:
    """A missing / wrong-kind / unwritable path: the OSError subclasses for it, or their errno values."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError |
                  FileExistsError):
        return True
    return isinstance(exc, OSError) and exc.errno in USAGE_ERRNOS


def classify(exc: BaseException, user_errors: tuple[type[BaseException], ...] = (),
             disk: Iterable[str | os.PathLike] = ()) -> tuple[int, str] | None:
    """(exit code, one-line message) for what the operator can fix; None for a bug (it keeps its traceback)."""
    if isinstance(exc, CliError):
        return exc.code, one_line(str(exc))
    disk = list(disk)
    found = write_failure(exc)
    if found is not None:
        kind, cause = found
        where = [os.fsdecode(cause.filename)] if isinstance(cause, OSError) and cause.filename else []
        space = free_space_of(disk or [os.path.dirname(w) for w in where])
        if kind == "full":
            if where or exc is cause:  # the file, or the bare system error
                what = describe(cause) if isinstance(cause, OSError) else one_line(str(cause))
            else:  # the outer message says what was being written
                what = one_line(str(exc))
            return EXIT_DISK_FULL, f"disk full: {what} ({space})"
        what, why = one_line(str(exc)), one_line(str(cause))
        if why not in what:  # the writer's own words ('unexpected pos N vs M') under an outer message
            what = f"{what} ({why})"
        return EXIT_DISK_FULL, f"a file write failed, most likely a full disk or quota: {what} ({space})"
    if is_usage_oserror(exc):
        return EXIT_USAGE, describe(exc)  # type: ignore[arg-type]
    if user_errors and isinstance(exc, user_errors):
        if isinstance(exc, KeyError) and len(exc.args) == 1:
            return EXIT_USAGE, one_line(str(exc.args[0]))  # str(KeyError) quotes its message
        return EXIT_USAGE, describe(exc) if isinstance(exc, OSError) else one_line(str(exc))
    return None


def report(exc: BaseException, code: int, message: str, debug: bool = False) -> int:
    """Print the one line (after the traceback under --debug); returns `code`."""
    if debug:
        traceback.print_exception(exc)
    sys.stderr.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run_cli(main: Callable[[], int | None], *, debug: bool = False,
            user_errors: tuple[type[BaseException], ...] = (), disk: Iterable[str | os.PathLike] = ()) -> int:
    """Run `main()` and return its exit code (None = 0); an error the operator can fix (module docstring) is
    printed as one line `error: ...` and returns 2 (usage) or 4 (disk full); any other exception propagates."""
    try:
        return int(main() or 0)
    except Exception as exc:  # noqa: BLE001 (what classify does not know is re-raised as it was)
        found = classify(exc, user_errors, list(disk))
        if found is None:
            raise
        return report(exc, *found, debug=debug)


@contextlib.contextmanager
def about(label: str, path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Re-raise a system OSError inside the block as a CliError naming the argument, its path and what was being
    done: `with about("--out", out, "cannot create the results folder"): ...` → 'error: --out /x: cannot create
    the results folder: permission denied' (the file, when another one failed). Exit 2; a full disk keeps exit 4.
    Messages the code wrote itself (no errno) pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        code = EXIT_DISK_FULL if exc.errno in FULL_ERRNOS else EXIT_USAGE
        if code == EXIT_USAGE and not is_usage_oserror(exc):
            raise
        same = exc.filename is not None and exc.filename2 is None and \
            os.path.abspath(os.fsdecode(exc.filename)) == os.path.abspath(os.fspath(path))
        detail = problem(exc) if same or exc.filename is None else describe(exc)
        if code == EXIT_DISK_FULL:
            detail += f" ({free_space_of([exc.filename or path])})"
        raise CliError(f"{label} {os.fspath(path)}: {doing}: {detail}", code) from exc
