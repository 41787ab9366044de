"""Errors caused by the user's input: reported as one line, never with a traceback
(:func:`utils.config.cli` turns them into a message and an exit code)."""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: reported as one line, never with a traceback."""

    exit_code = 1


class ConfigError(UserError):
    """A bad configuration key or value (exit code 2)."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C (SIGINT) stopped a run: exit code 130, as a shell reports an interrupted command."""

    exit_code = 130
