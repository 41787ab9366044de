"""Errors caused by the user's input, and the command-line wrapper that reports them as one line
and an exit code, never with a traceback (:func:`cli`)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence


class UserError(Exception):
    """An error caused by the user's input: reported as one line, never with a traceback."""

    exit_code = 1


class ConfigError(UserError):
    """A bad configuration key or value (exit code 2)."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C (SIGINT) stopped a run: exit code 130, as a shell reports an interrupted command."""

    exit_code = 130


def cli(main: Callable[[Sequence[str]], Any]) -> None:
    """Run ``main(argv)``; report a :class:`UserError` as one line and exit with its code."""
    logging.basicConfig(force=True, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which says more: utils.training.run_training)
        print("\nerror: interrupted", file=sys.stderr)
        raise SystemExit(Interrupted.exit_code) from None
