"""A limit on the event streams each API key holds open at once.

An open SSE stream holds a connection and polls the database for up to its maximum life; without a limit
one key could open thousands. Beyond the limit a stream is refused with 429 and a Retry-After; the slot
comes back when a stream ends for any reason (study ended, client gone, server stopping).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.services.errors import RateLimited

STREAM_RETRY_AFTER_S = 5.0  # a stream of the same key may end by then; clients reconnect anyway


class StreamLimiter:
    """At most `limit` open streams per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> Callable[[], None]:
        """Take a slot for key, or raise RateLimited; returns the release, which may be called many times."""
        with self._lock:
            if self._open.get(key, 0) >= self.limit:
                raise RateLimited(STREAM_RETRY_AFTER_S)
            self._open[key] = self._open.get(key, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open.get(key, 1) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)

        return release

    def open_streams(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)


class HeldStreamingResponse(StreamingResponse):
    """A streaming response that gives its stream slot back however it ends (done, disconnect, error)."""

    def __init__(self, *args: object, release: Callable[[], None], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
