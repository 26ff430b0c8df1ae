"""What the command-line scripts share: quiet library logging, and one `error:` line for a user mistake."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any


def guarded(parser, work: Callable[[Any], Any], user_errors: tuple[type[BaseException], ...],
            argv: list[str] | None = None) -> tuple[int, Any, Any]:
    """Parse `argv`, run `work(args)`; a user error prints `error: ...` (exit code 2), Ctrl-C exit code 130.

    Returns:
        (exit code, parsed args or None, what `work` returned or None).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        args = parser.parse_args(argv)
        return 0, args, work(args)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None, None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, None, None
