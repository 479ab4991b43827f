"""Errors a user can act on: each names what is wrong, where, and how to fix it."""

from __future__ import annotations


class HarnessError(Exception):
    """A problem with the user's input or machine, reported as one line, exit code 2."""

    exit_code = 2


class ConfigError(HarnessError):
    """A config or catalog file is missing, malformed or names something unknown."""


class SourceError(HarnessError):
    """A model's weights cannot be found, verified or loaded."""


class DataError(HarnessError):
    """A suite's data cannot be found or prepared."""
