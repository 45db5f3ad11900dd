"""``shunter replay -c FILE --topic T --partition P --offset O [--caller C] [--pdb]``: fetch one
message and run one caller's handler on it in the foreground, with the full traceback.

The one-command answer to "which line fails on this message?". The record may be on a
source topic, a retry tier or the dead-letter topic: a retry or dead-letter record is
delivered as the dispatcher would deliver it, with its origin coordinates and attempt,
to the caller its headers name unless ``--caller`` says otherwise. Nothing is written to
Kafka and nothing is committed. The handler runs in this process, whatever the subscriber's
isolation; the subscriber's timeout is reported, not enforced. For an HTTP subscriber the
one POST the dispatcher would make is made, and its answer judged by the same contract.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import inspect
import os
import pdb
import time
import traceback
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.text import Text
from yarl import URL

from ..app import Dispatcher
from ..classify import Router
from ..config import Config, SubscriberConfig, did_you_mean, load_config
from ..decode import decode_now
from ..deliver.failure import failure
from ..errors import DecodeUnavailable, RejectedMessage
from ..loader import make_importable
from ..message import Message
from ..observe.logs import setup_logging
from ..observe.stats import Stats
from ..settle import headers as h
from ..settle.dlqread import KafkaRecord, ReadError, TopicReader, client_settings
from ..settle.route import route
from ..testing.messages import make_message
from .output import safe

# Exit codes: 0 the handler succeeded; 1 it raised; 2 nothing was run (usage, config,
# record not found); 3 the message is rejected at decode or validate.
HANDLER_FAILED, NOT_RUN, REJECTED = 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")
    parser.add_argument("--topic", required=True, help="a source, retry or dead-letter topic")
    parser.add_argument("--partition", type=int, required=True)
    parser.add_argument("--offset", type=int, required=True)
    parser.add_argument(
        "--caller", help="whose handler runs (default: the caller a retry/DLQ record names)"
    )
    parser.add_argument("--pdb", action="store_true", help="post-mortem pdb on the exception")
    parser.add_argument(
        "--bootstrap", metavar="HOST:PORT", help="Kafka address (default: kafka.bootstrap_servers)"
    )


@dataclass(frozen=True)
class Delivery:
    """The message to run and whose handler runs it."""

    message: Message
    note: str = ""


def run(args: argparse.Namespace) -> int:
    make_importable(args.config)
    secrets: set[str] = set()
    config = load_config(args.config, secrets=secrets)
    setup_logging(config.log.format, config.log.level, secrets)  # the handler's own logs
    console = Console(soft_wrap=True)  # tracebacks and paths stay unbroken
    try:
        delivery = _delivery(config, args)
    except (ReadError, DecodeUnavailable) as exc:
        Console(stderr=True).print(Text(f"shunter replay: {safe(str(exc))}", style="red"))
        return NOT_RUN
    except RejectedMessage as exc:
        console.print(
            Text(
                f"rejected at {exc.stage}: {safe(exc.reason)}\nThe dispatcher dead-letters this "
                "message before any handler sees it.",
                style="red",
            )
        )
        return REJECTED
    return _run_handler(console, config, delivery, args.pdb)


def _delivery(config: Config, args: argparse.Namespace) -> Delivery:
    retry_topics = {config.fast_topic, config.slow_topic, config.dlq_topic}
    if args.topic not in retry_topics and args.topic not in config.topics:
        raise ReadError(
            f"{args.topic!r} is neither a source topic of this configuration nor one of its "
            f"retry or dead-letter topics ({', '.join(sorted(retry_topics))})"
        )
    with TopicReader(client_settings(config, args.bootstrap)) as reader:
        record = reader.fetch(args.topic, args.partition, args.offset)
    if record.topic in retry_topics:
        return _from_failure_record(config, record, args.caller)
    coordinates = (record.topic, record.partition, record.offset, record.timestamp_ms)
    return _build(config, record, coordinates, args.caller, attempt=1)


def _from_failure_record(config: Config, record: KafkaRecord, caller: str | None) -> Delivery:
    try:
        info = h.decode(record.headers)
    except (KeyError, ValueError) as exc:
        raise ReadError(f"the record has no usable shunter headers ({exc})") from None
    note = ""
    if caller and info.caller and caller != info.caller:
        note = f"the record is for caller {info.caller!r}; running {caller!r}'s handler as asked"
    coordinates = (
        info.origin_topic,
        info.origin_partition,
        info.origin_offset,
        info.origin_timestamp_ms,
    )
    delivery = _build(config, record, coordinates, caller or info.caller, info.attempt)
    return Delivery(delivery.message, note or delivery.note)


def _build(
    config: Config,
    record: KafkaRecord,
    coordinates: tuple[str, int, int, int],
    caller: str | None,
    attempt: int,
) -> Delivery:
    topic, partition, offset, timestamp = coordinates
    topic_config = config.topics.get(topic)
    if topic_config is None:
        raise ReadError(f"origin topic {topic!r} is not in this configuration")
    value = decode_now(config, topic, record.value)  # may raise Rejected (waits for a registry)
    message = make_message(
        value,
        topic=topic,
        partition=partition,
        offset=offset,
        key=record.key,
        attempt=attempt,
        headers=record.headers,
        timestamp=timestamp,
        raw=record.value,
    )
    routes, _ = Router(config).routes(message._record)
    if not caller:
        takers = ", ".join(sorted({r.caller for r in routes})) or "none"
        raise ReadError(
            f"pass --caller: whose handler should run? (subscribers taking it: {takers})"
        )
    try:
        sub = config.subscriber(caller)
    except KeyError:
        callers = [s.caller for s in config.subscribers]
        known = ", ".join(callers) or "none"
        hint = did_you_mean(caller, callers)
        raise ReadError(f"unknown caller {caller!r} (callers: {known}){hint}") from None
    message = Message(message._record, caller, sub.category, message.attempt)
    note = ""
    if all(r.caller != caller for r in routes):
        note = f"the dispatcher would not deliver this message to {caller!r} (category or filter)"
    return Delivery(message, note)


def _run_handler(console: Console, config: Config, delivery: Delivery, post_mortem: bool) -> int:
    msg = delivery.message
    sub = config.subscriber(msg.caller)
    handler: Any
    if sub.http is not None:  # one real POST, through the dispatcher's own HTTP delivery
        from ..deliver.http_guard import safe_url  # the URL without its credentials

        handler, target = _http_post(config, sub), f"POST {safe_url(URL(sub.http.url))}"
    else:
        handler = Dispatcher(config).handlers()[msg.caller]
        target = sub.handler or str(getattr(handler, "__qualname__", handler))
    if delivery.note:
        console.print(Text(f"note: {delivery.note}", style="yellow"))
    console.print(Text(f"running {msg.caller} ({target}) on {msg!r}", style="bold"))
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a crash in C code still prints the Python stack
    started = time.perf_counter()
    try:
        if sub.isolation == "inline":  # on the event loop, as the dispatcher runs it
            asyncio.run(_inline(handler, msg))
        else:
            _call(handler, msg)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        elapsed = time.perf_counter() - started
        console.print(Text(safe(_traceback(exc), keep_lines=True), style="red"))  # message bytes
        _explain(console, config, msg, exc, elapsed, sub.timeout)
        if post_mortem:
            pdb.post_mortem(exc.__traceback__)
        return HANDLER_FAILED
    elapsed = time.perf_counter() - started
    console.print(Text(f"OK: {msg.caller} handled it in {elapsed:.3f}s", style="green"))
    if elapsed > sub.timeout:
        console.print(
            Text(
                f"but over the subscriber's timeout of {sub.timeout:g}s: the dispatcher would "
                "have cancelled it (DeliveryTimeout)",
                style="yellow",
            )
        )
    return 0


def _http_post(config: Config, sub: SubscriberConfig) -> Any:
    """An async handler making the one request the dispatcher would make (same body,
    headers, address policy and response contract; the idempotency key is the same as the
    dispatcher's for this delivery, so the endpoint can tell a repeat)."""
    from ..deliver.http import http_invoke

    where = f"subscribers[{config.subscribers.index(sub)}]"

    async def post(msg: Message) -> None:
        invoke, close = http_invoke(sub, where, Stats({sub.caller: sub.category}))
        try:
            await invoke(msg)
        finally:
            await close()

    return post


def _traceback(exc: BaseException) -> str:
    """The traceback from the handler's call down: this command's and asyncio's frames
    above it are noise."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _harness(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


def _harness(filename: str) -> bool:
    return filename == __file__ or f"{os.sep}asyncio{os.sep}" in filename


def _call(handler: Any, msg: Message) -> None:
    result = handler(msg)
    if inspect.isawaitable(result):
        asyncio.run(_wait(result))


async def _wait(awaitable: Any) -> None:
    await awaitable


async def _inline(handler: Any, msg: Message) -> None:
    result = handler(msg)
    if inspect.isawaitable(result):
        await result


def _explain(
    console: Console,
    config: Config,
    msg: Message,
    exc: BaseException,
    elapsed: float,
    timeout: float,
) -> None:
    """Where the dispatcher would send this delivery next."""
    if isinstance(exc, KeyboardInterrupt):
        console.print(Text(f"interrupted after {elapsed:.1f}s (timeout {timeout:g}s)"))
        return
    dest = route(config.retry, msg.attempt, failure(exc))
    where = {
        "fast": f"the fast retry tier as attempt {dest.next_attempt}",
        "slow": f"the slow retry tier as attempt {dest.next_attempt}",
        "dlq": "the dead-letter topic",
    }[dest.tier]
    name = type(exc).__name__
    console.print(
        Text(f"FAILED: {name} in attempt {msg.attempt}; the dispatcher sends it to {where}")
    )
