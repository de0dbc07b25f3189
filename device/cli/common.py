"""Helpers shared by the subcommands: one-line errors and exit codes."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def fail(message: str) -> int:
    """Print one clear error line and return the bad-input exit code."""
    print(f"edgeftl: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
