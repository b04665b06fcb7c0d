"""Helpers shared by the subcommands of ``cnn-codes``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


positive_int.__name__ = "int"  # argparse: "invalid int value: 'x'"


def report_error(message: str) -> None:
    """Write a failed command's one-line message to stderr (its output, not a log record)."""
    print(message, file=sys.stderr)
