"""Errors that map onto evalkit's exit codes (0 pass, 1 regression, 2 bad input; 130/143 stopped by a signal)."""

from contextlib import contextmanager
from typing import Iterator

EXIT_PASS = 0
EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """A config value, file or argument the user must fix. Printed as one line, exit code 2."""


class CapabilityError(RuntimeError):
    """A backend or policy cannot run what it claims on this machine (missing GPU feature or package).

    Raised up front, never swallowed: evalkit does not fall back silently. Exit code 2.
    """


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the command: exit 128 + the signal number (130, 143), one line, no traceback.

    A BaseException like KeyboardInterrupt, so no `except Exception` on the way (a policy-error handler, Hydra's
    error report) turns an interruption into a result. `resume` is the command that continues the run (set by
    evalkit.run once the run dir is known)."""

    def __init__(self, signum: int, resume: str | None = None):
        super().__init__(signum)
        self.signum, self.resume = signum, resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        import signal

        name = signal.Signals(self.signum).name
        if self.resume:
            return f"evalkit: stopped by {name}; finished episodes are in the journal. Resume with: {self.resume}"
        return f"evalkit: stopped by {name}; nothing to resume"


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """While active (main thread only), the first SIGINT/SIGTERM raises Interrupted; later ones are ignored so the
    cleanup (closing env workers, removing temp files) finishes and prints its one line."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be restored from here
                signal.signal(s, h)


def exit_with(main) -> None:
    """Run a command's `main() -> int` and exit with its code; BadInput/CapabilityError become one line + exit 2."""
    import sys

    try:
        code = main()
    except (BadInput, CapabilityError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Interrupted as e:
        print(e.line(), file=sys.stderr)
        code = e.exit_code
    sys.exit(code)
