"""Decoding and validation: a message either comes out as a value its handlers can trust,
or is refused with the stage and a reason a person can act on — never anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.config import parse_config
from shunter.decode import build_decoders
from shunter.decode.decoder import Decode, Decoder
from shunter.errors import ConfigError, RejectedMessage

SCHEMA = {
    "type": "object",
    "required": ["user_id", "price"],
    "properties": {
        "user_id": {"type": "integer", "minimum": 1},
        "price": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "items": {"type": "string"}},
    },
}


def decoder(tmp_path: Path, schema: object = SCHEMA) -> Decode:
    (tmp_path / "gift.json").write_text(json.dumps(schema))
    config = parse_config(
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g"},
            "topics": {"gift": {"schema": "gift.json"}},
            "categories": {"revenue": {"topics": ["gift"]}},
            "subscribers": [{"caller": "medal", "category": "revenue", "handler": "m:f"}],
            "admin": {"listen": None},
        },
        base_dir=str(tmp_path),
    )
    return build_decoders(config)["gift"]


def refusal(decode: Decoder, raw: bytes | None) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as caught:
        decode(raw)
    return caught.value


def test_a_valid_message_comes_out_decoded(tmp_path: Path) -> None:
    assert decoder(tmp_path)(b'{"user_id": 7, "price": 0}') == {"user_id": 7, "price": 0}


@pytest.mark.parametrize(
    ("raw", "stage", "words"),
    [
        (b'{"user_id": 7', "decode", "invalid JSON"),
        (b"\xff\xfe", "decode", "invalid JSON"),
        (None, "decode", "tombstone"),
        (b'{"user_id": 7}', "validate", '"price" is a required property (at /)'),
        (b'{"user_id": 0, "price": 1}', "validate", "(at /user_id)"),
        (b'{"user_id": 1, "price": 1, "items": ["a", 2]}', "validate", "(at /items/1)"),
        (b'{"user_id": 1.5, "price": 1}', "validate", "is not of type"),
    ],
)
def test_a_bad_message_is_refused_with_its_stage_and_where(
    tmp_path: Path, raw: bytes | None, stage: str, words: str
) -> None:
    rejected = refusal(decoder(tmp_path), raw)
    assert rejected.stage == stage
    assert words in rejected.reason, rejected.reason


def test_integers_beyond_64_bits_stay_exact_and_are_still_integers(tmp_path: Path) -> None:
    """orjson would round them to floats (which would then fail ``type: integer``)."""
    big = 123456789012345678901234567890
    assert decoder(tmp_path)(b'{"user_id": %d, "price": 1}' % big)["user_id"] == big
    digits_in_a_string = b'{"user_id": 1, "price": 1, "items": ["%s"]}' % (b"9" * 25)
    assert decoder(tmp_path)(digits_in_a_string)["items"] == ["9" * 25]
    nineteen = b'{"user_id": %d, "price": 1}' % (2**63 - 1)
    assert decoder(tmp_path)(nineteen)["user_id"] == 2**63 - 1
    # Below -2**63 with only 19 digits: orjson rounds it to a float as well.
    for small in (-(2**63) - 1, -9999999999999999999):
        value = decoder(tmp_path)(b'{"user_id": 1, "price": 1, "n": %d}' % small)["n"]
        assert value == small and isinstance(value, int)


# Integers around and far beyond 64 bits, floats up to the largest, at any depth: what
# orjson alone would round (compiled, the decoded value is walked for such floats; pure
# Python, the bytes are scanned for long digit runs: both must agree with the standard
# library's exact decoding).
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**63 - 4, max_value=2**64 + 4),
    st.integers(min_value=-(2**63) - 4, max_value=-(2**63) + 4),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
)
_JSON = st.recursive(
    st.one_of(_NUMBERS, st.text(max_size=30), st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_any_json_value_decodes_exactly_as_the_standard_library_decodes_it(value: object) -> None:
    raw = json.dumps(value).encode()
    decoded = Decoder("t", True, None)(raw)
    assert decoded == json.loads(raw)
    assert repr(decoded) == repr(json.loads(raw))  # the same types too: 1 is not 1.0


def test_an_unusable_schema_file_is_refused_at_start_with_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        decoder(tmp_path, {"type": "no-such-type"})
    assert "topics.gift.schema: cannot load JSON Schema gift.json" in str(caught.value)


def test_formats_are_checked_and_draft_7_is_the_default(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}}
    assert "(at /at)" in refusal(decoder(tmp_path, schema), b'{"at": "yesterday"}').reason
    assert decoder(tmp_path, schema)(b'{"at": "2026-11-27T10:00:00Z"}')
    # Draft 7 ignores prefixItems; a schema that names 2020-12 gets it
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}]}
    assert decoder(tmp_path, tuple_schema)(b'["x"]') == ["x"]
    named = {"$schema": "https://json-schema.org/draft/2020-12/schema", **tuple_schema}
    assert refusal(decoder(tmp_path, named), b'["x"]').stage == "validate"
