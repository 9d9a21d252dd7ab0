"""The project's errors: each CLI turns these into one line on stderr and exit status 2."""

from __future__ import annotations


class CutError(ValueError):
    """Bad input or options, found before (or instead of) any expensive work."""


class ConfigError(CutError):
    """An option, or a combination of options, that cannot make a valid run."""


class DataError(CutError):
    """A data file or record that cannot be used; the message names file, record and field."""


class EngineError(RuntimeError):
    """The requested engine cannot run here (e.g. vllm is not installed)."""


class ParseError(ValueError):
    """A judge's reply that gives no usable answer; str(err) is the short reason recorded. Not a
    CutError: one unreadable reply is recorded (or asked again) for its record, not a failed run."""
