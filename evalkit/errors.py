"""Errors that map onto evalkit's exit codes (0 pass, 1 regression, 2 bad input)."""

EXIT_PASS = 0
EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """A config value, file or argument the user must fix. Printed as one line, exit code 2."""


class CapabilityError(RuntimeError):
    """A backend or policy cannot run what it claims on this machine (missing GPU feature or package).

    Raised up front, never swallowed: evalkit does not fall back silently. Exit code 2.
    """


def exit_with(main) -> None:
    """Run a command's `main() -> int` and exit with its code; BadInput/CapabilityError become one line + exit 2."""
    import sys

    try:
        code = main()
    except (BadInput, CapabilityError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    sys.exit(code)
