"""Helpers for tests that run a dispatcher with its admin API on a free loopback port."""

from __future__ import annotations

import importlib
import socket
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import urllib3

from kafkatools import Broker, config

TOKEN = "test-admin-token"

# medal fails on a gift without a user, every time; rank takes everything
HANDLERS = """
import asyncio

import shunter

MEDAL = []
RANK = []
GATE = {"open": True}

def on_medal(msg: shunter.Message) -> None:
    user_id = msg.value["user"]["id"]  # fails when the gift has no user
    MEDAL.append((msg.value["n"], user_id))

async def on_rank(msg: shunter.Message) -> None:
    while msg.value.get("hold") and not GATE["open"]:
        await asyncio.sleep(0.02)
    RANK.append(msg.value["n"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def handlers_module(tmp_path: Path, unique: str) -> tuple[str, ModuleType]:
    name = f"admin_handlers_{unique}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HANDLERS))
    sys.path.insert(0, str(tmp_path))
    return name, importlib.import_module(name)


def admin_config(
    broker: Broker, unique: str, module: str, port: int, partitions: int = 2, **extra: Any
) -> dict[str, Any]:
    """gift-<unique> → revenue → medal (fails without a user) and rank (holds on "hold")."""
    gift = f"gift-{unique}"
    broker.create({gift: partitions})
    return config(
        broker,
        f"g-{unique}",
        topics={gift: {}},
        categories={"revenue": {"topics": [gift]}},
        subscribers=[
            {"caller": "medal", "category": "revenue", "handler": f"{module}:on_medal"},
            {"caller": "rank", "category": "revenue", "handler": f"{module}:on_rank"},
        ],
        admin={"listen": f"127.0.0.1:{port}"},
        **extra,
    )


class Api:
    """A small blocking client for the admin API (tests run the dispatcher on a thread)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = urllib3.PoolManager(timeout=30.0, retries=False)

    def get(self, path: str, **headers: str) -> tuple[int, Any]:
        resp = self.http.request("GET", self.base + path, headers=headers)
        return resp.status, _body(resp)

    def post(self, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = orjson.dumps(body) if body is not None else b""
        resp = self.http.request("POST", self.base + path, body=data, headers=headers)
        return resp.status, _body(resp)

    def text(self, path: str) -> str:
        return str(self.http.request("GET", self.base + path).data.decode())


def _body(resp: Any) -> Any:
    try:
        return orjson.loads(resp.data)
    except orjson.JSONDecodeError:
        return resp.data.decode("utf-8", "replace")
