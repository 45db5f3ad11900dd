"""The headers shunter puts on retry and dead-letter records, and reads back.

The payload and key are the source record's own bytes, unchanged; everything shunter
knows about the failure travels in these headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "shunter-"
CALLER = PREFIX + "caller"
CATEGORY = PREFIX + "category"
ATTEMPT = PREFIX + "attempt"  # the attempt this record will be delivered as
STAGE = PREFIX + "stage"  # decode | validate | classify | deliver | crash | internal
ERROR_TYPE = PREFIX + "error-type"
ERROR = PREFIX + "error"
TRACEBACK = PREFIX + "traceback"
FIRST_FAILURE = PREFIX + "first-failure-ms"
NOT_BEFORE = PREFIX + "not-before-ms"
ORIGIN_TOPIC = PREFIX + "origin-topic"
ORIGIN_PARTITION = PREFIX + "origin-partition"
ORIGIN_OFFSET = PREFIX + "origin-offset"
ORIGIN_TIMESTAMP = PREFIX + "origin-timestamp-ms"
ORIGIN_KEY = PREFIX + "origin-key"
TIER = PREFIX + "tier"  # fast | slow | dlq
SIGNAL = PREFIX + "signal"
PAYLOAD_OMITTED = PREFIX + "payload-omitted"  # bytes of a payload too large to keep
# When a retry due far later than its tier's rhythm was last written to the back of the
# slow tier (ms since the epoch): it is written again at most once per horizon.
REQUEUED = PREFIX + "requeued-ms"

MAX_TRACEBACK = 8_192
MAX_ERROR = 2_048
# The record's key is the source key already; a copy in a header only for a short one
# (a dead-letter stub drops the key itself, and then this copy is what names it).
MAX_ORIGIN_KEY = 1_024


def bounded(text: str, limit: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``limit``, keeping the end (where the failing line is)."""
    data = str(text).encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return b"..." + data[-(limit - 3) :]


# Built for every failure. Not frozen: a frozen dataclass's __init__ sets each field
# through object.__setattr__; nothing changes one after it is built all the same
# (``dataclasses.replace`` makes a changed copy). Its __init__ is written out: the one
# ``@dataclass`` generates is interpreted even when this module is compiled, and took
# ~15,000 instructions of a failure's ~117,000 (called with keywords from compiled code,
# its 17 fields set one by one through descriptors); the compiled one ~1,000
# (``scripts/pipeline-cost --failing``). repr, eq and ``replace`` still come from the
# dataclass, which keeps an __init__ the class defines.
@dataclass(slots=True)
class FailureInfo:
    """What the headers of a retry or dead-letter record say."""

    caller: str
    category: str
    attempt: int
    stage: str
    error_type: str
    error: str
    traceback: str
    first_failure_ms: int
    not_before_ms: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    origin_timestamp_ms: int
    tier: str
    origin_key: bytes | None = None
    signal: str = ""
    requeued_ms: int = 0  # see REQUEUED; 0: never requeued

    def __init__(
        self,
        caller: str,
        category: str,
        attempt: int,
        stage: str,
        error_type: str,
        error: str,
        traceback: str,
        first_failure_ms: int,
        not_before_ms: int,
        origin_topic: str,
        origin_partition: int,
        origin_offset: int,
        origin_timestamp_ms: int,
        tier: str,
        origin_key: bytes | None = None,
        signal: str = "",
        requeued_ms: int = 0,
    ) -> None:
        self.caller = caller
        self.category = category
        self.attempt = attempt
        self.stage = stage
        self.error_type = error_type
        self.error = error
        self.traceback = traceback
        self.first_failure_ms = first_failure_ms
        self.not_before_ms = not_before_ms
        self.origin_topic = origin_topic
        self.origin_partition = origin_partition
        self.origin_offset = origin_offset
        self.origin_timestamp_ms = origin_timestamp_ms
        self.tier = tier
        self.origin_key = origin_key
        self.signal = signal
        self.requeued_ms = requeued_ms


def encode(info: FailureInfo) -> list[tuple[str, bytes]]:
    headers = [
        (CALLER, info.caller.encode()),
        (CATEGORY, info.category.encode()),
        (ATTEMPT, str(info.attempt).encode()),
        (STAGE, info.stage.encode()),
        (ERROR_TYPE, info.error_type.encode()),
        (ERROR, bounded(info.error, MAX_ERROR)),
        (TRACEBACK, bounded(info.traceback, MAX_TRACEBACK)),
        (FIRST_FAILURE, str(info.first_failure_ms).encode()),
        (NOT_BEFORE, str(info.not_before_ms).encode()),
        (ORIGIN_TOPIC, info.origin_topic.encode()),
        (ORIGIN_PARTITION, str(info.origin_partition).encode()),
        (ORIGIN_OFFSET, str(info.origin_offset).encode()),
        (ORIGIN_TIMESTAMP, str(info.origin_timestamp_ms).encode()),
        (TIER, info.tier.encode()),
    ]
    if info.origin_key is not None and len(info.origin_key) <= MAX_ORIGIN_KEY:
        headers.append((ORIGIN_KEY, info.origin_key))
    if info.signal:
        headers.append((SIGNAL, info.signal.encode()))
    if info.requeued_ms:
        headers.append((REQUEUED, str(info.requeued_ms).encode()))
    return headers


def decode(headers: Sequence[tuple[str, bytes | None]] | None) -> FailureInfo:
    """Read the failure headers back; KeyError/ValueError when they are incomplete."""
    found = {k: v for k, v in headers or [] if k.startswith(PREFIX) and v is not None}

    def text(name: str, default: str | None = None) -> str:
        value = found.get(name)
        if value is None:
            if default is None:
                raise KeyError(name)
            return default
        return value.decode("utf-8", "replace")

    return FailureInfo(
        caller=text(CALLER),
        category=text(CATEGORY, ""),
        attempt=max(1, int(text(ATTEMPT))),  # never below the first: a negative one
        # would retry on the fast tier for ever, never reaching the dead-letter topic
        stage=text(STAGE, "deliver"),
        error_type=text(ERROR_TYPE, ""),
        error=text(ERROR, ""),
        traceback=text(TRACEBACK, ""),
        first_failure_ms=int(text(FIRST_FAILURE, "0")),
        not_before_ms=int(text(NOT_BEFORE, "0")),
        origin_topic=text(ORIGIN_TOPIC),
        origin_partition=int(text(ORIGIN_PARTITION)),
        origin_offset=int(text(ORIGIN_OFFSET)),
        origin_timestamp_ms=int(text(ORIGIN_TIMESTAMP, "0")),
        tier=text(TIER, ""),
        origin_key=found.get(ORIGIN_KEY),
        signal=text(SIGNAL, ""),
        requeued_ms=int(text(REQUEUED, "0")),
    )
