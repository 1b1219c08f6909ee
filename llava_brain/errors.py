"""Bad input is reported as one line naming the file and what was expected; scripts exit with 2."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_BAD_INPUT = 2


class BadInputError(Exception):
    """An input file is missing or does not have the expected format.

    `str(err)` is a single line: "<path>: <what was expected> (<what was found>)".
    """

    def __init__(self, path: str | Path, expectation: str):
        self.path = Path(path)
        self.expectation = " ".join(str(expectation).split())  # keep the message on one line
        super().__init__(f"{self.path}: {self.expectation}")


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` if it is a file, else raise BadInputError describing `what` should be there."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"missing; expected {what}")
    return path


def exits_on_bad_input(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a script's `main(argv)`: BadInputError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except BadInputError as err:
            logging.getLogger(main.__module__).debug("bad input", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper
