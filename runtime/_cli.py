"""Shared plumbing for the thin CLIs: logging set-up, termination signals, and turning user errors
into one line.

Signals: SIGTERM and SIGHUP are handled like SIGINT. Each raises `Terminated` (a KeyboardInterrupt)
in the main thread, so every `with` block and `finally` unwinds: temp outputs, export staging
folders and open files are removed or closed exactly as for Ctrl-C. The exit status is 128 + the
signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP). Once one signal is being handled, further
SIGTERM/SIGHUP are ignored so the clean-up itself is not cut short (SIGKILL still ends the process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from runtime.errors import SgexError

USER_ERRORS = (SgexError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KeyError)
TERMINATION_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

__all__ = ["USER_ERRORS", "TERMINATION_SIGNALS", "Terminated", "Parser", "setup_logging", "quiet_native_libraries",
           "terminate_raises",
           "one_line", "run_main"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM/SIGHUP while `terminate_raises` is active."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`prog: error: ...`), exit 2, like every other sgex user error."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def setup_logging(verbose: bool = False) -> None:
    """sgex's log lines on stderr (DEBUG with -v); native libraries quiet unless -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        quiet_native_libraries()


def quiet_native_libraries() -> None:
    """Keep OpenCV's own warnings (truncated PNG, codec probing) and its FFmpeg's messages off
    stderr: a bad input must produce exactly one line, sgex's. Set before they load, through
    their environment variables (a value the user set wins), and on an already-imported cv2."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and os.environ["OPENCV_LOG_LEVEL"] == "SILENT":
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise `Terminated` in the main thread (see the module doc).
    The previous handlers are restored on exit. Outside the main thread (where Python cannot set
    handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if fired:  # already unwinding: let the clean-up finish
            return
        fired = True
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def one_line(e: BaseException) -> str:
    """The message of a user error collapsed to one line (KeyError's repr quotes dropped)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body; a user error becomes `prog: error: <one line>` on stderr and exit 2; SIGINT,
    SIGTERM and SIGHUP unwind it (clean-up runs) and exit 128 + the signal number."""
    try:
        with terminate_raises():
            return body()
    except USER_ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"{prog}: terminated ({e.name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
