"""The response contract of an HTTP subscriber: what an answer means for the delivery.

| answer                                          | outcome                             |
| ----------------------------------------------- | ----------------------------------- |
| 2xx                                             | succeeded                           |
| 408, 429, 5xx, timeout, connection error, TLS   | ``HttpFailure`` → retry tiers       |
| 429 or 503 with Retry-After                     | the same, after that delay (capped) |
| 3xx (redirects are never followed), other 4xx   | ``DeadLetter`` with status and body |
| address refused by the policy                   | ``DeadLetter``                      |

Reasons carry the status, the endpoint without credentials or query values, and a bounded
excerpt of the body, with every configured header value masked: they end up in logs and
in the headers of retry and dead-letter records.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import ClientResponse

from ..errors import DeadLetter, RetryLater

MAX_EXCERPT = 1024  # bytes of response body quoted in a reason
TRANSIENT_4XX = frozenset({408, 429})
RETRY_AFTER = frozenset({429, 503})


class HttpFailure(RetryLater):
    """A transient failure of an HTTP subscriber's endpoint: retried through the tiers."""


class CircuitOpen(RetryLater):
    """The subscriber's circuit is open: retried after the cool-down, no request was made."""


class Redactor:
    """Masks secret values (configured header values, URL credentials) in text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


async def read_bounded(resp: ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body; a longer body is cut off and its connection
    dropped rather than read to the end."""
    chunks: list[bytes] = []
    size = 0
    content = resp.content
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if not content.at_eof():
        resp.close()  # the rest is never read: this connection cannot be reused
    return b"".join(chunks)


def retry_after(value: str | None, cap: float, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most ``cap``;
    None for anything else (the endpoint's header is anyone's text: never raises)."""
    if not value:
        return None
    value = value.strip()
    try:
        if value.isascii() and value.isdigit():  # "²".isdigit() too, which float refuses
            return min(float(value), cap)
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        now = time.time() if now is None else now
        return min(max(0.0, when.timestamp() - now), cap)
    except (TypeError, ValueError, IndexError, OverflowError):  # e.g. the year 99999999999
        return None


def excerpt(body: bytes, redact: Redactor) -> str:
    if not body:
        return ""
    text = body[:MAX_EXCERPT].decode("utf-8", "replace").strip()
    return redact(text) + (" [cut]" if len(body) > MAX_EXCERPT else "")


def status_error(
    status: int,
    phrase: str | None,
    endpoint: str,
    body: bytes,
    retry_after_header: str | None,
    cap: float,
    redact: Redactor,
) -> Exception:
    """The exception a non-2xx answer turns into (returned, for the caller to raise)."""
    phrase = phrase or _phrase(status)
    text = excerpt(body, redact)
    reason = f"HTTP {status} {phrase} from {endpoint}" + (f"; body: {text}" if text else "")
    if status in TRANSIENT_4XX or 500 <= status <= 599:
        delay = retry_after(retry_after_header, cap) if status in RETRY_AFTER else None
        if delay is not None:
            reason += f"; Retry-After {delay:g}s"
        return HttpFailure(delay=delay, reason=reason)
    if 300 <= status <= 399:
        return DeadLetter(f"{reason}; redirects are not followed")
    return DeadLetter(reason)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
