"""What the command-line scripts share: quiet library logging, one `error:` line for a user mistake, and
the argparse pieces that make a bad flag such a line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any


class UsageError(Exception):
    """A bad command line: reported as one `error:` line."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing the usage block and exiting."""

    def error(self, message):
        raise UsageError(message)


_KINDS = {int: "an integer", float: "a number"}


def number(kind: type = int, minimum: float = 0, strict: bool = True) -> Callable[[str], Any]:
    """An argparse `type`: `kind` (int or float) above `minimum` (or equal to it when not `strict`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KINDS[kind]}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"expected {_KINDS[kind]} {'>' if strict else '≥'} {minimum}, got {text!r}")
        return value
    return parse


def guarded(parser, work: Callable[[Any], Any], user_errors: tuple[type[BaseException], ...],
            argv: list[str] | None = None) -> tuple[int, Any, Any]:
    """Parse `argv`, run `work(args)`; a user error (UsageError or one of `user_errors`) prints
    `error: ...` (exit code 2), Ctrl-C exit code 130.

    Returns:
        (exit code, parsed args or None, what `work` returned or None).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        args = parser.parse_args(argv)
        return 0, args, work(args)
    except (UsageError, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None, None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, None, None
