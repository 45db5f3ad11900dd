"""``shunter skip``: the operator's one-record exit from a stuck partition.

The request goes to the group's control topic; the instance that owns the partition
dead-letters that record (or one caller's delivery of it) with reason ``skipped by
operator`` and moves the partition on, and says so. With no instance owning the
partition now, the request stays, and is applied when the record is read.
Exit status: 0 done, 3 recorded but no owner answered within ``--wait``, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
from confluent_kafka import Producer

from ..broker.compacted import read_table
from ..config import load_config
from ..settle.dlqread import ReadError, client_settings
from ..settle.skip import SkipRequest, request_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")
    parser.add_argument("--topic", required=True, help="the record's topic")
    parser.add_argument("--partition", required=True, type=int, help="its partition")
    parser.add_argument("--offset", required=True, type=int, help="its offset")
    parser.add_argument("--caller", default="", help="skip only this caller's delivery")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the owner's answer"
    )
    parser.add_argument("--bootstrap", help="HOST:PORT, overriding kafka.bootstrap_servers")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        request = SkipRequest(args.topic, args.partition, args.offset, args.caller)
        settings = client_settings(config, args.bootstrap)
    except (ValueError, ReadError) as exc:
        print(f"shunter skip: {exc}", file=sys.stderr)
        return 2
    if args.caller and args.caller not in {s.caller for s in config.subscribers}:
        print(f"shunter skip: unknown caller {args.caller!r}", file=sys.stderr)
        return 2
    asked = request_value("shunter skip")
    producer = Producer({**settings, "acks": "all", "enable.idempotence": True})
    producer.produce(config.control_topic, key=request.key.encode(), value=asked)
    if producer.flush(30):
        print(f"shunter skip: not written to {config.control_topic} in 30 s", file=sys.stderr)
        return 2
    asked_ms = orjson.loads(asked)["requested_ms"]
    print(f"asked the group {config.kafka.group_id} to skip {request.key[5:]}")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        table = read_table(settings, config.control_topic, {request.result_key.encode()})
        answer = table.get(request.result_key.encode())
        if answer is not None and orjson.loads(answer).get("requested_ms", 0) >= asked_ms:
            result = orjson.loads(answer)
            print(f"{result.get('instance', '?')}: {result.get('result', '')}")
            return 0
        time.sleep(0.5)
    print(
        f"no instance owning {request.topic}[{request.partition}] answered within "
        f"{args.wait:g}s; the request stays recorded and the record is skipped when it is read"
    )
    return 3
