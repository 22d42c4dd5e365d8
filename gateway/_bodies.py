"""What `PaymentMiddleware` holds and bounds: the app's response until its payment is settled (`Held`), the
request body read before payment (`read_body`, `replay_body`) or streamed to the app under a deadline
(`BoundedBody`), and the answers given when a bound is crossed (413, 408, 502)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from starlette.types import Message, Receive, Send

from ._answers import Answer, Headers

__all__ = [
    "HELD_TOO_LARGE",
    "BodyTimeout",
    "BoundedBody",
    "Held",
    "TooLarge",
    "content_length",
    "read_body",
    "replay_body",
    "request_timeout_answer",
    "too_large_answer",
]


class TooLarge(Exception):
    """Raised into the app by `Held.send`: its response outgrew the held-response limit."""


class Held:
    """Holds the app's response until the payment is settled, up to `limit` body bytes."""

    __slots__ = ("body", "head", "limit", "overflowed", "size", "start", "trailing")

    def __init__(self, limit: int, *, head: bool = False) -> None:
        self.start: Message | None = None
        self.body: list[bytes] = []
        self.trailing: list[Message] = []
        self.limit = limit
        # A HEAD response declares the GET body's length but has no body: Starlette still sends the GET
        # body, which the server would drop; it is dropped here, neither held nor counted.
        self.head = head
        self.size = 0
        self.overflowed = False

    async def send(self, message: Message) -> None:
        if self.overflowed:
            raise TooLarge
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            if not self.head and content_length(message.get("headers", ())) > self.limit:
                self._overflow()  # refused before a byte of it is buffered
        elif kind == "http.response.body":
            chunk = b"" if self.head else message.get("body", b"")
            self.size += len(chunk)
            if self.size > self.limit:
                self._overflow()
            self.body.append(chunk)
        else:
            self.trailing.append(message)

    def _overflow(self) -> None:
        # Raised into the app to stop it producing more (an endless stream would never end otherwise); an app
        # that swallows it is still refused, by the flag.
        self.overflowed = True
        self.body.clear()
        raise TooLarge

    @property
    def status(self) -> int:
        return 500 if self.start is None else int(self.start["status"])

    async def flush(self, send: Send, extra: Headers | None = None) -> None:
        assert self.start is not None
        start = self.start
        if extra:
            replaced = {name for name, _ in extra}
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in replaced]
            start = {**start, "headers": [*headers, *extra]}
        await send(start)
        await send({"type": "http.response.body", "body": b"".join(self.body)})
        for message in self.trailing:
            await send(message)


def too_large_answer(limit: int) -> Answer:
    body = (
        b'{"type":"about:blank","title":"Content Too Large","status":413,'
        b'"detail":"the request body exceeds the ' + str(limit).encode() + b' bytes read before payment"}'
    )
    return Answer(status=413, headers=[(b"content-type", b"application/problem+json")], body=body)


HELD_TOO_LARGE = Answer(
    status=502,
    headers=[(b"content-type", b"application/problem+json"), (b"cache-control", b"no-store")],
    body=b'{"type":"about:blank","title":"Bad Gateway","status":502,'
    b'"detail":"the paid response is larger than the gateway holds until payment; nothing was charged"}',
)


def request_timeout_answer(seconds: float) -> Answer:
    detail = f"the request body did not arrive within {seconds:g} s"
    body = (
        b'{"type":"about:blank","title":"Request Timeout","status":408,"detail":"' + detail.encode() + b'"}'
    )
    return Answer(
        status=408,
        headers=[(b"content-type", b"application/problem+json"), (b"connection", b"close")],
        body=body,
    )


class BodyTimeout(Exception):
    """The client did not deliver the request body in time (raised inside the app's `receive`)."""


class BoundedBody:
    """A `receive` that lets the request body take at most `timeout` seconds from the request's start;
    after the last body chunk it passes through unbounded (an app may wait for the disconnect)."""

    def __init__(self, receive: Receive, timeout: float) -> None:
        self._receive = receive
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._complete = False
        self.timed_out = False

    async def __call__(self) -> Message:
        if self._complete:
            return await self._receive()
        left = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(left, 0.0))
        except TimeoutError:
            self.timed_out = True
            raise BodyTimeout("the request body did not arrive in time") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._complete = True
        return message


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The declared `Content-Length`, or 0 when absent or unreadable (the bytes sent are counted anyway)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def read_body(receive: Receive, headers: Iterable[tuple[bytes, bytes]], limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is known to exceed `limit` bytes (declared or sent)."""
    if content_length(headers) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a missing or false Content-Length does not get past the limit either
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields `body` once, then whatever the server sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
