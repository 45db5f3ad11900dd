"""Schemas and generated code for the Avro and Protobuf tests, and helpers to write
payloads the way producers do (plain, or in the Confluent wire format)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIFT_AVSC = HERE / "gift.avsc"
GUARD_MESSAGE = "formatdata.events_pb2:GuardPurchase"


def registry_url() -> str:
    """A fresh in-memory registry (confluent-kafka's ``mock://``)."""
    return f"mock://shunter-test-{uuid.uuid4().hex[:8]}"


def gift(n: int = 0, **fields: Any) -> dict[str, Any]:
    value = {
        "user_id": f"u{n}",
        "anchor_id": "a1",
        "gift": "rose",
        "amount": n,
        "kind": "BUY",
        "note": None,
    }
    value.update(fields)
    return value


def plain_avro(value: dict[str, Any]) -> bytes:
    from fastavro import parse_schema, schemaless_writer

    out = io.BytesIO()
    schemaless_writer(out, parse_schema(json.loads(GIFT_AVSC.read_text())), value)
    return out.getvalue()


def wire_avro(client: Any, topic: str, value: dict[str, Any]) -> bytes:
    """``value`` as confluent-kafka's AvroSerializer writes it (registering the schema)."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    serializer = AvroSerializer(client, GIFT_AVSC.read_text())
    return serializer(value, SerializationContext(topic, MessageField.VALUE))  # type: ignore[no-any-return]


def wire_protobuf(client: Any, topic: str, message: Any) -> bytes:
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    serializer = ProtobufSerializer(type(message), client, {"use.deprecated.format": False})
    return serializer(message, SerializationContext(topic, MessageField.VALUE))  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def stub_registry(port: int, schemas: dict[int, str], status: int = 200) -> Iterator[list[str]]:
    """A stand-in Schema Registry on 127.0.0.1:``port`` answering ``GET /schemas/ids/N``
    (the one call a deserializer makes); yields the paths asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            schema_id = int(self.path.split("?")[0].rsplit("/", 1)[-1])
            if status != 200:
                body, code = {"error_code": status * 100, "message": "broken"}, status
            elif schema_id in schemas:
                body, code = {"schema": schemas[schema_id]}, 200
            else:
                body, code = {"error_code": 40403, "message": "Schema not found"}, 404
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def decode_when_ready(decode: Callable[[bytes], Any], raw: bytes, timeout: float = 10.0) -> Any:
    """Decode as the pipeline does: on DecodeUnavailable, wait ``retry_after`` and again."""
    from shunter.errors import DecodeUnavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            return decode(raw)
        except DecodeUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            time.sleep(exc.retry_after)
