"""The one error type users see, and the CLI edge that turns it into one line and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class SprinterError(ValueError):
    """Bad input or an unusable artifact. The message names the value and what was expected."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main`, printing a SprinterError as one line (no traceback) with exit code 2."""
    try:
        main(argv)
    except SprinterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun with --resume where the stage offers it", file=sys.stderr)
        return 130
    return 0
