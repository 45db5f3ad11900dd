"""What every command shares when it prints: a console as wide as asked, message bytes made
safe for a terminal, and commands that can be copied whole.

Tables follow one rule: an identifier, a coordinate or a command is never cut. At the
terminal's width (80 columns when output is piped) secondary columns are dropped or
folded into a neighbour; ``--wide`` prints every column at its natural width and
``--json`` prints the same rows as JSON lines.
"""

from __future__ import annotations

import argparse
import re
import shlex

from rich.console import Console

WIDE = 1_000  # a --wide console: every table at its natural width

# C0 and C1 control characters, DEL, and the bidirectional overrides that reorder text.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--wide`` and ``--json``, for a command that prints a table."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--wide", action="store_true", help="every column, however wide the terminal"
    )
    group.add_argument("--json", action="store_true", help="one JSON object per line")


def console(args: argparse.Namespace | None = None, stderr: bool = False) -> Console:
    """A console at the terminal's width, or unbounded with ``--wide``."""
    if args is not None and getattr(args, "wide", False):
        return Console(width=WIDE, stderr=stderr)
    return Console(stderr=stderr)


def is_wide(out: Console) -> bool:
    return out.width >= WIDE


def safe(text: str, keep_lines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``), so bytes
    from a message cannot move the cursor, recolour or retitle the operator's terminal.
    ``keep_lines`` keeps newlines and tabs (tracebacks, pretty-printed JSON)."""
    pattern = _CONTROL if keep_lines else _CONTROL_OR_LINE
    return pattern.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_bytes(value: bytes | None) -> str:
    """Message bytes for a terminal: UTF-8 text with control characters escaped, or the
    ``repr`` of bytes that are not UTF-8."""
    if value is None:
        return "(none)"
    try:
        return safe(value.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(value)


def command_lines(words: list[str], width: int, indent: str = "  ") -> str:
    """A shell command that can be copied: quoted words, continued with `` \\`` between
    words (never inside one, nor between an option and its value) when it does not fit
    ``width``."""
    quoted = [shlex.quote(w) for w in words]
    units: list[str] = []
    for word in quoted:  # "--offset 0" stays on one line
        option = bool(units) and units[-1].startswith("-") and " " not in units[-1]
        together = f"{units[-1]} {word}" if units else word
        if option and not word.startswith("-") and len(indent + together) + 2 <= width:
            units[-1] = together
        else:
            units.append(word)
    lines: list[str] = []
    line = ""
    for word in units:
        candidate = f"{line} {word}" if line else word
        if line and len(candidate) + 2 > width:
            lines.append(line + " \\")
            line = indent + word
        else:
            line = candidate
    lines.append(line)
    return "\n".join(lines)
