"""Domain errors, raised by services and mapped to HTTP statuses once, in app/api/errors.py."""

from __future__ import annotations

from collections.abc import Sequence


class DomainError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """The thing does not exist or belongs to another owner (never say which)."""


class Conflict(DomainError):
    """The request does not apply in the current state."""


class InvalidInput(DomainError):
    """Well-formed but breaks a rule; loc names the field. `more` holds the other rules the same request
    breaks, so that a client hears of every one at once."""

    def __init__(self, loc: tuple[str | int, ...], message: str, *, more: Sequence[InvalidInput] = ()) -> None:
        super().__init__(message)
        self.loc = loc
        self.more = list(more)

    @classmethod
    def every(cls, errors: Sequence[InvalidInput]) -> InvalidInput:
        """One error carrying all of `errors` (at least one)."""
        first, *rest = errors
        return cls(first.loc, first.message, more=rest)

    @property
    def all(self) -> list[InvalidInput]:
        return [self, *self.more]


class TooLarge(DomainError):
    pass


class UnsupportedMedia(DomainError):
    pass


class Unauthorized(DomainError):
    pass


class RateLimited(DomainError):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("rate limit exceeded")
        self.retry_after_s = retry_after_s
