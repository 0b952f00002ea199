"""Shared plumbing for the thin CLIs: logging set-up and turning user errors into one line."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from runtime.errors import SgexError

USER_ERRORS = (SgexError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KeyError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body; a user error becomes `prog: error: <one line>` on stderr and exit 2."""
    try:
        return body()
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
