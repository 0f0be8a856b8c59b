"""The one exception type for bad input, and the command-line convention that goes with it.

Anything a user can get wrong (a config key, a path, a target that matches nothing, a corrupt file) raises
`InputError` with what was expected and what was found. Entry points turn it into one line
`error: ...` on stderr and exit code 2 (`run_main`); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input from the user: reported as a one-line `error: ...`, exit code 2."""


def run_main(main: Callable[[], object]) -> None:
    """Run a command's main function with the project's exit-code convention (0 ok, 2 bad input)."""
    try:
        main()
    except InputError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors (exit code 2 already) in the project's one-line `error: ...` form."""

    def error(self, message: str) -> None:
        raise InputError(message)
