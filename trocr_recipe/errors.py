"""One error policy for every command-line tool: bad input is one line on stderr,
`error: <what, where, what to do>`, and exit status 2 (docs/reliability.md)."""

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

BAD_INPUT = 2


class BadInput(SystemExit):
    """Input a tool cannot work on; the message names the file, flag or key, what is wrong and
    what to do. A SystemExit, so that a script that does not catch it still stops with it."""

    def __init__(self, message: str):
        super().__init__(message)


def one_line(message) -> str:
    """The message on one line: a library's multi-line text joined, cut at 600 characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= 600 else text[:597] + "..."


FOUND = 1  # the exit status of a report of mistakes found (the preflight's, check_loop's)


def run_cli(main, argv=None) -> int:
    """Runs a tool's `main(argv)` and returns its exit status: `main`'s own (an int, else 0);
    2 after printing `error: ...` on one line when it stops on bad input (a BadInput, or a
    SystemExit carrying a one-line message); 1 after printing a report of several lines that
    stopped it (the preflight's findings: a mistake found, not bad input)."""
    try:
        code = main(argv)
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # --help, or a status the tool chose
            raise
        if "\n" in stop.code.strip() and not isinstance(stop, BadInput):
            print(stop.code, file=sys.stderr)
            return FOUND
        print(f"error: {one_line(stop.code)}", file=sys.stderr)
        return BAD_INPUT
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error as one BadInput line instead of the usage text and exit 2."""

    def error(self, message):
        raise BadInput(f"{self.prog}: {message} (--help lists every argument)")


def finite(name: str, value: float, minimum: float | None = None) -> float:
    """`value` if it is a finite number no smaller than `minimum`; else BadInput naming `name`."""
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" at least {minimum:g}" if minimum is not None else ""
        raise BadInput(f"{name} {value}: must be a finite number{bound}")
    return value


def at_least(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise BadInput(f"{name} {value}: must be at least {minimum}")
    return value


def atomic_write_text(path, text: str) -> None:
    """Writes `path` whole or not at all: a temporary file in the same folder, then renamed
    over it, so that a run killed while writing leaves the old file (or none), never half a file."""
    path = Path(path)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def read_json_object(path, fix: str = "") -> dict:
    """A JSON object from `path`; anything else (unreadable, not UTF-8, not JSON, another JSON
    value) is a BadInput naming the file, the line, what is wrong and `fix`."""
    fix = f"; {fix}" if fix else ""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BadInput(f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}){fix}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text{fix}") from None
    except (ValueError, RecursionError) as error:  # a number of 5,000 digits, a value nested thousands deep
        raise BadInput(f"{path}: not valid JSON ({str(error).split(';')[0]}){fix}") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror or error}){fix}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object, found {type(data).__name__}{fix}")
    return data
