"""One exception type per domain.

Every error a user can cause is raised as a subclass of :class:`QadpipeError` with a
message that names the field or file and what was expected.  The CLI prints such an
error as a single line and exits with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class QadpipeError(Exception):
    """Base class: a user-facing problem, printed as one line by the CLI."""


class ConfigError(QadpipeError):
    """A config value is unknown, of the wrong type, out of range or names a missing file."""


class ModelError(QadpipeError):
    """A model or tokenizer cannot be found, loaded or prepared."""


class DataError(QadpipeError):
    """A data source is missing, unreadable or lacks the configured field."""


class CacheError(QadpipeError):
    """A logit cache is missing, corrupt, or does not match what reads it."""


class QuantError(QadpipeError):
    """A quantization recipe or format cannot be applied as asked."""


class TeacherError(QadpipeError):
    """The teacher backend cannot run as configured."""


class DistillError(QadpipeError):
    """Training cannot start or continue (bad resume state, NaN loss, empty rank)."""


class ExportError(QadpipeError):
    """A checkpoint cannot be exported in the requested format."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name when it has none): library
    messages run to many lines, and a user error is one."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def folded(exc: BaseException) -> str:
    """All of an exception's message on one line (or its type name when it has none): for
    library messages whose later lines matter, e.g. Arrow's, where the file offset follows."""
    return " ".join(str(exc).split()) or type(exc).__name__
