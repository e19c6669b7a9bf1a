"""One exception type for bad user input, turned into a one-line message by the CLIs."""
from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input or an impossible request: printed as ``error: <msg>``, exit code 2."""


def shorten(text, limit: int = 200) -> str:
    """Any text (or object) on one line: whitespace runs collapsed, cut to ``limit`` with ``...``."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def one_line(e: BaseException, limit: int = 80) -> str:
    """``Type: first line of the message`` (library messages often span lines), shortened."""
    msg = (str(e).strip().splitlines() or [""])[0].strip()
    msg = "".join(c if c.isprintable() else "?" for c in msg)  # binary junk from a corrupt file
    msg = msg if len(msg) <= limit else msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# errors of the machine rather than of the input: disk full, read-only disk, permissions
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error_message(e: OSError) -> str:
    """``cannot write PATH: No space left on device`` style text for an OSError (one line)."""
    where = f" {e.filename}" if e.filename else ""
    reason = os.strerror(e.errno) if e.errno else (str(e).strip().splitlines() or [type(e).__name__])[0]
    if e.errno in _WRITE_ERRNOS:
        msg = f"cannot write{where}: {reason}"
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            msg += " (finished outputs were kept; free space and rerun the same command to resume)"
        return msg
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{':' if where else ''}{where}"
    if e.errno == errno.ENOENT and where:
        return f"not found:{where}"
    return f"{reason}{':' if where else ''}{where}"


# what a command may leave in a fresh output folder before it has finished anything
_SCAFFOLD = {"config.json", "fit_config.json", "sft_config.json", "metrics.jsonl"}


def _remove_if_unfinished(out: Path) -> None:
    """Remove ``out`` (created by the failed command) if it holds nothing but scaffolding:
    config files, an empty or partial metrics log, and temp files of those. Anything else
    (a finished shard, a checkpoint, another worker's file) keeps the folder as it is."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return
    for p in entries:
        name = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
        if not p.is_file() or name not in _SCAFFOLD:
            return
    shutil.rmtree(out, ignore_errors=True)


def cli_errors(fn):
    """Decorator for typer commands: UserError (and predictable IO/parse errors) become one
    line on stderr and a non-zero exit, never a traceback. Set DF_DEBUG=1 for tracebacks.

    A failing command whose ``out`` folder did not exist before it started removes that
    folder again when it holds no finished work (see ``_remove_if_unfinished``), so a refused
    input leaves no partial output; finished shards and checkpoints are always kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        fresh = isinstance(out, (str, Path)) and not os.path.lexists(out)
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if fresh and not isinstance(e, SystemExit) and Path(out).is_dir():
                _remove_if_unfinished(Path(out))
            if os.environ.get("DF_DEBUG") or not isinstance(e, (UserError, KeyboardInterrupt, OSError, ValueError)):
                raise
            if isinstance(e, UserError):
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            if isinstance(e, KeyboardInterrupt):
                print("error: interrupted", file=sys.stderr)
                sys.exit(130)
            if isinstance(e, OSError):  # disk full, read-only disk, permission denied
                print(f"error: {os_error_message(e)}", file=sys.stderr)
                sys.exit(1)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # bad numbers
            print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def run_app(app) -> None:
    """Run a typer app as a command line: a bad option (an unknown choice, a missing or mistyped
    value, an unknown command) is one ``error:`` line on stderr and exit 2, as every other bad
    input, instead of a usage block."""
    import typer
    from typer.exceptions import TyperException  # typer's own click errors (usage, bad parameter) derive from it

    try:
        code = app(standalone_mode=False)
    except TyperException as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # a bare command: its help
            print(ctx.get_help(), file=sys.stderr)
            sys.exit(2)
        msg = " ".join((e.format_message() if hasattr(e, "format_message") else str(e)).split())
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
