"""The crash guard step's subscribers, run by ``shunter run`` in a worker process.

``on_guard_effect`` is the handler of the night in shunter's story, as it really failed:
the entrance effect is rendered by a C extension that dereferences the nested ``effect``
object without checking it, so a guard purchase without one kills the interpreter — no
exception, no traceback. ``ctypes.string_at(0)`` stands in for that extension.

Each delivery that completes appends ``caller,event_id,offset`` to the ledger file named
by ``SHUNTER_DEMO_LEDGER``: the demo counts the deliveries there, from outside.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ..message import Message

LEDGER_ENV = "SHUNTER_DEMO_LEDGER"


def _receipt(msg: Message) -> None:
    line = f"{msg.caller},{msg.value['event_id']},{msg.offset}\n"
    with open(os.environ[LEDGER_ENV], "a") as ledger:  # one short append: one write
        ledger.write(line)


def render_entrance(effect: dict[str, Any] | None) -> bytes:
    """Stands in for the C extension: it takes the entrance's name as a C string, and a
    missing effect reaches it as a NULL pointer, which it reads unchecked."""
    name = None if effect is None else str(effect["entrance"]).encode()
    return ctypes.string_at(ctypes.c_char_p(name))  # strlen(NULL): SIGSEGV


async def on_anchor_task(msg: Message) -> None:
    """anchor-task (guard, async): guard revenue counts towards the anchor's task."""
    _receipt(msg)


def on_guard_effect(msg: Message) -> None:
    """guard-effect (guard, sync, inline): plays the new guard's entrance effect."""
    render_entrance(msg.value.get("effect"))
    _receipt(msg)
