"""Typed errors a user can cause. The CLI turns each into one line and a non-zero exit."""

from __future__ import annotations


class SctdError(Exception):
    """Base class: a problem the user can fix (bad path, bad data, unreachable store)."""

    exit_code = 2


class StoreError(SctdError):
    """A store (local folder or S3) could not be read or written."""


class StoreUnreachable(StoreError):
    """The S3 endpoint does not answer (connection refused, DNS, timeout)."""


class StoreAuthError(StoreError):
    """The S3 endpoint refused the credentials (missing, wrong key or signature)."""


class NotFound(StoreError):
    """A key or file that should exist is missing."""


class BucketNotFound(NotFound):
    """The S3 bucket itself is missing (a typo in s3://BUCKET/...), not only the key."""


class ZooError(SctdError):
    """A zoo as a whole is unusable (no teachers, bad manifest, bad id)."""


class TeacherError(SctdError):
    """One teacher cannot be used. Always names the teacher and the problem."""

    def __init__(self, teacher_id: str, reason: str):
        self.teacher_id = teacher_id
        self.reason = reason
        super().__init__(f"teacher {teacher_id!r}: {reason}")


class TargetError(SctdError):
    """A target task is malformed (missing split, unknown label, undecodable image...)."""


class FatalScanError(SctdError):
    """The whole scan must stop (the store is unreachable or refuses the credentials)."""


class ScoreInputError(SctdError, ValueError):
    """Inputs to a score are invalid (labels out of range, empty class, NaN/inf)."""
