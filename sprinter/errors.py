"""The one error type users see, and the CLI edge that turns it into one line and a non-zero exit."""

from __future__ import annotations

import errno
import sys
import warnings
from typing import Callable, Sequence

# What a path should have been, by what the operating system said went wrong with it.
EXPECTED = {
    errno.ENOENT: "an existing path",
    errno.EEXIST: "a folder, or a path where one can be made",
    errno.ENOTDIR: "a path whose parents are folders, not files",
    errno.EISDIR: "a file, not a folder",
    errno.EACCES: "a path this user may read (inputs) and write (outputs)",
    errno.EPERM: "a path this user may read (inputs) and write (outputs)",
    errno.EROFS: "an output path on a writable file system",
    errno.ENOSPC: "free space on that disk (finished work is kept; rerun with --resume where the stage offers it)",
    errno.ENAMETOOLONG: "a shorter path",
}


class SprinterError(ValueError):
    """Bad input or an unusable artifact. The message names the value and what was expected."""


class SprinterWarning(UserWarning):
    """Something that works but should not be trusted blindly (a degenerate verifier, a decode-time false-accept
    rate far from the promised one). Shown once per message; at the CLI as one `warning:` line."""


def warn(message: str) -> None:
    warnings.warn(message, SprinterWarning, stacklevel=3)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the CLI: a SprinterWarning as one `warning:` line, others as Python shows them."""
    if issubclass(category, SprinterWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _show(message, category, filename, lineno, file, line)


_show = warnings.showwarning


def os_error_line(err: OSError) -> str:
    """An operating-system error about a path in one line: the path, what went wrong, what was expected."""
    if err.filename is None:  # a library's own OSError (e.g. a model folder it cannot use): its first line
        first = str(err).strip().splitlines()
        return f"{first[0] if first else type(err).__name__}; expected {EXPECTED.get(err.errno, 'a usable path')}"
    other = f" (and {err.filename2!r})" if err.filename2 is not None else ""
    return f"{err.filename!r}{other}: {err.strerror or type(err).__name__}; expected " \
           f"{EXPECTED.get(err.errno, 'a usable path')}"


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
            interrupted: str = "finished work is kept; rerun with --resume where the stage offers it") -> int:
    """Run a script's `main`, printing a SprinterError, or an operating system's error about a path the user
    gave, as one line (no traceback) with exit code 2; Ctrl-C is one `interrupted:` line and exit 130."""
    shown, warnings.showwarning = warnings.showwarning, _one_line
    try:
        main(argv)
    except SprinterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written: the user's to fix, not a bug to trace
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a stage may raise it with its own advice
        print(f"interrupted: {str(err) or interrupted}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
    return 0
