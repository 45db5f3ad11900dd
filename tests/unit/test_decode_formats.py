"""Avro and Protobuf topics: plain payloads and the Confluent wire format with a registry.

Given a topic's declared format, when its bytes are decoded, then: a well-formed payload
becomes a dict (Avro) or the generated message (Protobuf); every malformed payload (wrong
magic byte, truncated, unknown schema ID, bytes left over) is a RejectedMessage at stage
``decode`` with a reason; and a registry that cannot be reached is DecodeUnavailable
(transient, with a backoff) — never a rejection — until it answers again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from formatdata import (
    GIFT_AVSC,
    GUARD_MESSAGE,
    decode_when_ready,
    free_port,
    gift,
    plain_avro,
    registry_url,
    stub_registry,
    wire_avro,
    wire_protobuf,
)
from formatdata.events_pb2 import Buyer, GuardPurchase
from shunter.classify.filters import compile_filter, message_to_map
from shunter.config import parse_config
from shunter.decode import build_decoders, decode_now, display
from shunter.decode.registry import fetcher_for
from shunter.errors import ConfigError, DecodeUnavailable, RejectedMessage
from shunter.testing import make_message


def config(**topics: dict[str, Any]) -> Any:
    return parse_config({"topics": topics}, base_dir="/")


def rejected(decode: Any, raw: bytes | None) -> str:
    with pytest.raises(RejectedMessage) as caught:
        decode_when_ready(decode, raw)  # type: ignore[arg-type]
    assert caught.value.stage == "decode"
    return caught.value.reason


def registry_client(cfg: Any, topic: str) -> Any:
    return fetcher_for(cfg.topics[topic].schema_registry, "test").table.client


# -- plain payloads ---------------------------------------------------------------------------


def test_plain_avro_is_a_dict_and_malformed_payloads_are_rejected() -> None:
    decode = build_decoders(config(g={"format": "avro", "schema": str(GIFT_AVSC)}))["g"]
    raw = plain_avro(gift(7))
    assert decode(raw) == gift(7)
    assert "not an Avro shunter.test.Gift record: EOFError" in rejected(decode, raw[:6])
    assert "2 bytes left over after the Avro shunter.test.Gift record" in rejected(
        decode, raw + b"zz"
    )
    assert "tombstone" in rejected(decode, None)


def test_plain_avro_with_a_model_validates_the_dict() -> None:
    cfg = config(
        g={"format": "avro", "schema": str(GIFT_AVSC), "model": "formatdata.models:BigGift"}
    )
    decode = build_decoders(cfg)["g"]
    assert decode(plain_avro(gift(500))).amount == 500
    with pytest.raises(RejectedMessage) as caught:
        decode(plain_avro(gift(5)))
    assert caught.value.stage == "validate"


def test_plain_protobuf_is_the_generated_message() -> None:
    decode = build_decoders(config(p={"format": "protobuf", "message": GUARD_MESSAGE}))["p"]
    sent = GuardPurchase(user_id="u1", amount=2**40, kind=GuardPurchase.BUY, tags=["vip"])
    value = decode(sent.SerializeToString())
    assert isinstance(value, GuardPurchase)
    assert value == sent
    reason = rejected(decode, b"\x0a\xff")
    assert reason.startswith("not a Protobuf shunter.test.GuardPurchase: DecodeError")


# -- the Confluent wire format with a registry (confluent-kafka's mock://) -------------------


def test_registry_avro_fetches_once_without_blocking_then_decodes() -> None:
    cfg = config(g={"format": "avro", "schema_registry": {"url": registry_url()}})
    decode = build_decoders(cfg)["g"]
    raw = wire_avro(registry_client(cfg, "g"), "g", gift(3))
    with pytest.raises(DecodeUnavailable) as caught:  # not fetched yet: the loop never waits
        decode(raw)
    assert caught.value.transient
    assert caught.value.retry_after <= 0.1
    assert "fetching schema id" in caught.value.reason
    assert decode_when_ready(decode, raw) == gift(3)
    assert decode(raw) == gift(3)  # from the table now, synchronously


def test_registry_protobuf_is_the_generated_message() -> None:
    url = registry_url()
    cfg = config(
        p={"format": "protobuf", "message": GUARD_MESSAGE, "schema_registry": {"url": url}}
    )
    decode = build_decoders(cfg)["p"]
    sent = GuardPurchase(user_id="u", amount=9, buyer=Buyer(name="b", level=3))
    value = decode_when_ready(decode, wire_protobuf(registry_client(cfg, "p"), "p", sent))
    assert isinstance(value, GuardPurchase)
    assert value == sent


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_registry_malformed_payloads_are_rejected_with_reasons(fmt: str) -> None:
    topic: dict[str, Any] = {"format": fmt, "schema_registry": {"url": registry_url()}}
    if fmt == "protobuf":
        topic["message"] = GUARD_MESSAGE
    cfg = config(t=topic)
    decode = build_decoders(cfg)["t"]
    client = registry_client(cfg, "t")
    if fmt == "avro":
        good = wire_avro(client, "t", gift(1))
    else:
        good = wire_protobuf(client, "t", GuardPurchase(user_id="u", amount=1))
    decode_when_ready(decode, good)
    assert rejected(decode, b"{" + good[1:]).startswith("wrong magic byte 0x7b")
    assert rejected(decode, good[:3]).startswith("truncated payload: 3 bytes")
    assert rejected(decode, good[:5]).startswith("truncated payload: 5 bytes")
    unknown = b"\x00" + (4242).to_bytes(4, "big") + good[5:]
    assert rejected(decode, unknown).startswith("unknown schema id 4242")
    guid = b"\x01" + bytes(range(16)) + good[5:]  # the newer framing: a schema GUID
    assert rejected(decode, guid).startswith("unknown schema guid 000102030405")
    assert "tombstone" in rejected(decode, None)
    if fmt == "avro":
        assert "cannot decode the body: EOFError" in rejected(decode, good[:7])


def test_registry_json_validates_against_the_registered_schema() -> None:
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    cfg = config(j={"format": "json", "schema_registry": {"url": registry_url()}})
    decode = build_decoders(cfg)["j"]
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    serializer = JSONSerializer(schema, registry_client(cfg, "j"))
    raw = serializer({"n": 4}, SerializationContext("j", MessageField.VALUE))
    assert decode_when_ready(decode, raw) == {"n": 4}
    body = b'{"n": "four"}'
    assert "cannot decode the body" in rejected(decode, raw[:5] + body)


# -- an unreachable registry is transient, and recovers -------------------------------------


def test_unreachable_registry_holds_with_backoff_then_recovers() -> None:
    """A real HTTP client against a closed port, then a registry appears on that port."""
    port = free_port()
    cfg = config(g={"format": "avro", "schema_registry": {"url": f"http://127.0.0.1:{port}"}})
    decode = build_decoders(cfg)["g"]
    raw = b"\x00\x00\x00\x00\x01" + plain_avro(gift(5))
    waits = []
    deadline = time.monotonic() + 10
    while len(waits) < 3 and time.monotonic() < deadline:
        try:
            decode(raw)
        except DecodeUnavailable as exc:  # never a RejectedMessage
            if "cannot reach the schema registry" in exc.reason:
                waits.append(exc.retry_after)
            time.sleep(min(exc.retry_after, 0.05))
    assert len(waits) >= 3, "the connection failure was never reported"
    with pytest.raises(DecodeUnavailable) as caught:
        decode(raw)
    assert "cannot reach the schema registry" in caught.value.reason
    assert caught.value.retry_after > 0.05  # backing off, not hammering
    with stub_registry(port, {1: GIFT_AVSC.read_text()}) as asked:
        assert decode_when_ready(decode, raw, timeout=20) == gift(5)
    assert asked[0].startswith("/schemas/ids/1")


def test_registry_errors_are_transient_but_unknown_ids_are_rejected() -> None:
    port = free_port()
    cfg = config(g={"format": "avro", "schema_registry": {"url": f"http://127.0.0.1:{port}"}})
    decode = build_decoders(cfg)["g"]
    raw = b"\x00\x00\x00\x00\x02" + plain_avro(gift(1))
    with stub_registry(port, {}, status=503):
        with pytest.raises(DecodeUnavailable) as caught:
            decode_when_ready(decode, raw, timeout=1.5)
        assert "the registry answered an error" in caught.value.reason
    with stub_registry(port, {}):  # now it answers: it has no schema 2
        reason = rejected(decode, raw)
    assert reason.startswith("unknown schema id 2: the registry has no such schema")


def test_registry_credentials_never_appear_in_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SR_AUTH", "alice:s3cr3t-pw")
    port = free_port()
    cfg = parse_config(
        {
            "topics": {
                "g": {
                    "format": "avro",
                    "schema_registry": {
                        "url": f"http://127.0.0.1:{port}",
                        "basic_auth": "${SR_AUTH}",
                    },
                }
            }
        }
    )
    decode = build_decoders(cfg)["g"]
    with pytest.raises(DecodeUnavailable) as caught:
        decode_when_ready(decode, b"\x00\x00\x00\x00\x01\x02", timeout=1)
    assert "s3cr3t" not in caught.value.reason


# -- display (shunter dlq show, replay) --------------------------------------------------------


def test_display_decodes_every_format_and_explains_what_it_cannot() -> None:
    url = registry_url()
    cfg = config(
        g={"format": "avro", "schema_registry": {"url": url}},
        p={"format": "protobuf", "message": GUARD_MESSAGE},
        a={"format": "avro", "schema": str(GIFT_AVSC)},
    )
    raw = wire_avro(registry_client(cfg, "g"), "g", gift(2))
    assert '"user_id": "u2"' in display(cfg, "g", raw)  # waits for the registry
    assert decode_now(cfg, "a", plain_avro(gift(4)))["amount"] == 4
    text = display(cfg, "p", GuardPurchase(user_id="x", amount=5).SerializeToString())
    assert '"user_id": "x"' in text and '"amount": "5"' in text  # the proto JSON mapping
    bad = display(cfg, "g", b"\x07junk")
    assert bad.startswith("(not decodable as avro: decode: wrong magic byte 0x07")
    assert "junk" in bad


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ({"format": "protobuf"}, "topics.t.message: a protobuf topic needs"),
        ({"format": "avro"}, "topics.t: an avro topic needs schema"),
        ({"format": "raw", "schema_registry": {"url": "mock://x"}}, "topics.t: a raw topic"),
        ({"format": "json", "message": GUARD_MESSAGE}, "topics.t.message: only a protobuf"),
        ({"format": "avro", "schema_registry": {"url": "ftp://x"}}, "topics.t.schema_registry.url"),
        ({"format": "xml"}, "topics.t.format"),
        (
            {"format": "avro", "schema_registry": {"url": "mock://x", "basic_auth": "nopass"}},
            "topics.t.schema_registry.basic_auth",
        ),
    ],
)
def test_bad_format_settings_are_refused_with_their_key_path(
    topic: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"topics": {"t": topic}})
    assert problem in str(caught.value)


def test_unloadable_schemas_and_classes_are_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "bad.avsc").write_text('{"type": "record", "name": "X", "fields": [{"name": 1}]}')
    with pytest.raises(ConfigError) as caught:
        build_decoders(config(t={"format": "avro", "schema": str(tmp_path / "bad.avsc")}))
    assert "topics.t.schema: cannot load Avro schema" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        build_decoders(config(t={"format": "protobuf", "message": "formatdata:GIFT_AVSC"}))
    assert "topics.t.message: formatdata:GIFT_AVSC is not a generated Protobuf" in str(caught.value)


# -- filters and HTTP bodies see protobuf values as maps ---------------------------------------


def test_cel_filters_see_a_protobuf_message_as_a_map() -> None:
    value = GuardPurchase(
        user_id="u", amount=2**40, kind=GuardPurchase.BUY, tags=["vip"], counters={"a": 2**35}
    )
    msg = make_message(value, raw=value.SerializeToString())
    assert compile_filter("value.kind == 'BUY' && value.amount > 1000000000000")(msg._record)
    assert compile_filter("'vip' in value.tags && value.counters['a'] == 34359738368")(msg._record)
    assert not compile_filter("has(value.buyer)")(msg._record)  # unset: absent
    assert compile_filter("value.user_id == 'u' && value.anchor_id == ''")(msg._record)
    value.buyer.level = 3
    as_map = message_to_map(value)
    assert as_map["buyer"] == {"name": "", "level": 3}
    assert as_map["note"] == b""
