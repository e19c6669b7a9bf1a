"""One exception type for bad user input, turned into a one-line message by the CLIs."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input or an impossible request: printed as ``error: <msg>``, exit code 2."""


def cli_errors(fn):
    """Decorator for typer commands: UserError (and a few predictable IO/parse errors) become
    one line on stderr and a non-zero exit, never a traceback. Set DF_DEBUG=1 for tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("DF_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except (OSError, ValueError) as e:  # permission denied, disk full, bad numbers
            if os.environ.get("DF_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
            sys.exit(1)

    return wrapper
