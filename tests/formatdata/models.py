"""A pydantic model checking decoded Avro values (``topics.<t>.model``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BigGift(BaseModel):
    user_id: str
    amount: int = Field(ge=100)
