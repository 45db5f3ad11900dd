"""Failure fingerprints: grouped by (caller, error type, failing line in the caller's code),
bounded per caller, a new one logged once."""

from __future__ import annotations

import logging
import os
import sysconfig

import pytest

import shunter
from shunter.deliver.failure import failure
from shunter.observe.fingerprints import (
    OTHER,
    Fingerprints,
    failing_line,
    group_dead_letters,
)
from shunter.outcome import DeadLettered, Failed
from shunter.settle import headers as h
from shunter.settle.dlqread import DeadLetterRecord, KafkaRecord
from shunter.testing import make_message

SHUNTER = os.path.dirname(shunter.__file__)
STDLIB = sysconfig.get_paths()["stdlib"]


def stack(*frames: tuple[str, int, str], error: str = "KeyError: 'gift'") -> str:
    lines = ["Traceback (most recent call last):"]
    for path, line, func in frames:
        lines += [f'  File "{path}", line {line}, in {func}', "    code()"]
    return "\n".join([*lines, error, ""])


def test_the_failing_line_is_the_innermost_frame_of_the_callers_own_code() -> None:
    text = stack(
        (f"{SHUNTER}/deliver/runtime.py", 200, "_run"),
        ("/srv/app/myapp/medal.py", 12, "on_revenue"),
        ("/srv/app/myapp/util.py", 40, "level_of"),
        (f"{STDLIB}/json/decoder.py", 337, "decode"),
    )
    assert failing_line(text) == "myapp/util.py:40 in level_of"


def test_third_party_frames_count_only_when_nothing_else_is_left() -> None:
    lib = "/venv/lib/python3.11/site-packages/requests/models.py"
    mine = stack(("/srv/app/hooks.py", 7, "call"), (lib, 1021, "raise_for_status"))
    assert failing_line(mine) == "app/hooks.py:7 in call"
    # the caller's code installed as a package lives in site-packages too
    installed = stack(("/venv/lib/python3.11/site-packages/myapp/medal.py", 12, "on_revenue"))
    assert failing_line(installed) == "myapp/medal.py:12 in on_revenue"
    assert failing_line("") == ""  # a timeout has no stack


def test_a_real_handler_failure_names_the_handlers_line() -> None:
    def on_revenue(value: dict[str, int]) -> int:
        return value["missing"]

    try:
        on_revenue({})
    except KeyError as exc:
        outcome = failure(exc)
    line = failing_line(outcome.traceback)
    assert line.startswith("unit/test_fingerprints.py:")
    assert line.endswith(" in on_revenue")


def test_the_failing_line_is_read_from_the_stack_not_the_exception_message() -> None:
    # A message may span lines and look like a frame (a hostile or careless one): the
    # failing line is still the stack's, and repeats differing only in their message
    # share it (the lookup is by the stack alone).
    frames = (("/srv/app/myapp/medal.py", 12, "on_revenue"),)
    spoof = 'ValueError: bad gift\n  File "/srv/app/myapp/other.py", line 99, in elsewhere'
    assert failing_line(stack(*frames, error=spoof)) == "myapp/medal.py:12 in on_revenue"
    for offset in range(3):
        text = stack(*frames, error=f"ValueError: bad gift at offset {offset}")
        assert failing_line(text) == "myapp/medal.py:12 in on_revenue"
    # a chained failure: its last message's frame-like line is not read as a frame either
    chained = stack(("/srv/app/myapp/util.py", 3, "parse"), error="KeyError: 'x'") + (
        "\nDuring handling of the above exception, another exception occurred:\n\n"
        + stack(*frames, error='RuntimeError: wrapped\n  File "/x/y.py", line 1, in z')
    )
    assert failing_line(chained) == "myapp/medal.py:12 in on_revenue"
    # a crash pill's dump has no Python header: read whole, as before
    assert failing_line('  File "/srv/app/myapp/pill.py", line 9 in on_gift\n') == (
        "myapp/pill.py:9 in on_gift"
    )


def test_failures_are_counted_by_fingerprint_and_a_new_one_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prints = Fingerprints()
    tb = stack(("/srv/app/myapp/medal.py", 12, "on_revenue"))
    other_line = stack(("/srv/app/myapp/medal.py", 30, "on_revenue"))
    caplog.set_level(logging.ERROR, "shunter.fingerprints")
    for offset in range(5):
        msg = make_message({}, topic="gift", offset=offset, caller="medal")
        prints.observe("medal", Failed("KeyError", "'gift'", tb), msg._record)
    prints.observe("medal", Failed("KeyError", "'gift'", other_line), msg._record)
    prints.observe("task", DeadLettered("bad", "DeadLetter", tb), msg._record)
    prints.observe("medal", Failed("RetryLater", "later", "", counts=False), msg._record)
    rows = prints.rows()
    assert [(r.caller, r.label, r.count) for r in rows] == [
        ("medal", "KeyError at myapp/medal.py:12 in on_revenue", 5),
        ("medal", "KeyError at myapp/medal.py:30 in on_revenue", 1),
        ("task", "DeadLetter at myapp/medal.py:12 in on_revenue", 1),
    ]
    assert rows[0].example["offset"] == 0  # the first record is the example
    assert rows[0].first_seen <= rows[0].last_seen
    announced = [r for r in caplog.records if "new failure fingerprint" in r.getMessage()]
    assert len(announced) == 3  # one per fingerprint, not one per failure


def test_fingerprints_per_caller_are_capped_and_overflow_to_other() -> None:
    prints = Fingerprints(max_per_caller=3)
    example = {"topic": "t", "partition": 0, "offset": 1}
    for line in range(10):
        prints.add("medal", "KeyError", stack(("/srv/a.py", line, "f")), example)
    prints.add("task", "KeyError", stack(("/srv/a.py", 99, "f")), example)
    medal = [r for r in prints.rows() if r.caller == "medal"]
    assert len(medal) == 4  # 3 fingerprints and "other"
    other = next(r for r in medal if r.label == OTHER)
    assert other.count == 7
    assert [r.label for r in prints.rows() if r.caller == "task"] != [OTHER]


def test_dead_letters_group_by_fingerprint_from_their_headers() -> None:
    def dead(offset: int, caller: str, error_type: str, tb: str, ts: int) -> DeadLetterRecord:
        info = h.FailureInfo(
            caller=caller, category="c", attempt=3, stage="deliver", error_type=error_type,
            error="boom", traceback=tb, first_failure_ms=0, not_before_ms=0,
            origin_topic="gift", origin_partition=0, origin_offset=offset,
            origin_timestamp_ms=0, tier="dlq",
        )  # fmt: skip
        return DeadLetterRecord.of(KafkaRecord("g.dlq", 0, offset, ts, None, b"{}", h.encode(info)))

    tb = stack(("/srv/app/myapp/medal.py", 12, "on_revenue"))
    found = [
        dead(0, "medal", "KeyError", tb, 2000),
        dead(1, "medal", "KeyError", tb, 1000),
        dead(2, "", "crash", "", 3000),  # a crash quarantine: no caller, no stack caught
    ]
    groups = group_dead_letters(found)
    assert [(g.caller, g.label, g.count) for g in groups] == [
        ("medal", "KeyError at myapp/medal.py:12 in on_revenue", 2),
        ("", "crash", 1),
    ]
    assert (groups[0].first_seen, groups[0].last_seen) == (1.0, 2.0)
    assert groups[0].example["id"] == "0:0"


def test_a_crash_pills_dying_stack_names_its_line() -> None:
    """faulthandler's dump: the dying thread first, innermost frame first, no comma."""
    dump = "\n".join(
        [
            "Fatal Python error: Segmentation fault",
            "",
            "Current thread 0x00007f0000000001 (most recent call first):",
            f'  File "{STDLIB}/ctypes/__init__.py", line 500 in string_at',
            '  File "/srv/app/myapp/pill.py", line 9 in on_gift',
            f'  File "{SHUNTER}/deliver/invoke.py", line 30 in call',
            "",
            "Thread 0x00007f0000000002 (most recent call first):",
            '  File "/srv/app/myapp/other.py", line 77 in idle',
            "",
        ]
    )
    assert failing_line(dump) == "myapp/pill.py:9 in on_gift"
