"""The farm's exceptions: short, and each says what went wrong with which value."""

from __future__ import annotations

import math


class RenderFarmError(Exception):
    """Base class of the farm's errors."""


class InvalidJob(RenderFarmError, ValueError):
    """A job field has a bad value. Nothing was enqueued."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class FieldError:
    """One bad field: ``width must be a multiple of 8, got 500``."""

    def __init__(self, field: str, message: str, value: object = None, index: int | None = None):
        self.field = field
        self.message = message
        self.value = value
        self.index = index

    def __str__(self) -> str:
        where = f"job {self.index}: " if self.index is not None else ""
        return f"{where}{self.field} {self.message}, got {_short_repr(self.value)}"

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message, "value": _jsonable(self.value),
                "index": self.index, "error": str(self)}


class FarmUnavailable(RenderFarmError):
    """The farm's Redis cannot be reached."""


class JobNotFound(RenderFarmError, KeyError):
    """No job or batch has this id."""

    def __str__(self) -> str:
        return f"no job or batch with id {self.args[0]!r}"


class BadRecord(RenderFarmError):
    """A job's record in Redis cannot be read (written by an older version, edited by hand).

    It fails alone: whoever meets it (a worker, the reaper, a page) reports it with its reason
    and goes on with the other jobs."""

    def __init__(self, job_id: str, reason: str):
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"the record of job {job_id!r} is unreadable: {reason}")


class JobFailed(RenderFarmError):
    """A job ended failed or cancelled when its result was asked for."""


class Cancelled(RenderFarmError):
    """Raised inside a render when the job was cancelled."""


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no NaN (browsers' JSON.parse refuses it)
    if value is None or isinstance(value, (str, int, float, bool)):
        if isinstance(value, str) and len(value) > 200:
            return value[:200] + "…"
        return value
    return repr(value)[:200]
