"""The guard purchase, validated by pydantic before any handler sees it (``model:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Effect(BaseModel):
    entrance: str
    level: int


class GuardPurchase(BaseModel):
    event_id: int
    user_id: str
    room_id: str
    anchor_id: str
    type: Literal["buy", "renew"]
    level: int
    price: int
    effect: Effect | None = None  # some clients send none: handlers must cope
    ts: int
