"""Best first, the one order both schedulers rank by: a non-finite value last, ties to the lower number."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar


class Numbered(Protocol):
    @property
    def number(self) -> int: ...


T = TypeVar("T", bound=Numbered)


def ranked(items: Iterable[T], value: Callable[[T], float], *, maximize: bool) -> list[T]:
    sign = -1.0 if maximize else 1.0

    def key(item: T) -> tuple[bool, float, int]:
        v = value(item)
        finite = math.isfinite(v)
        return (not finite, sign * v if finite else 0.0, item.number)

    return sorted(items, key=key)
