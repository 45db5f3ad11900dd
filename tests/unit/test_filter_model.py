"""A category filter on a topic validated into a pydantic model (the spec's own example:
guard_purchase with ``model:``, guard with ``where: value.type == 'buy'``) reads the
model's fields. Found by running examples/live-revenue: every guard purchase used to be
dead-lettered with "Failed to convert Python object of type GuardPurchase to Value"."""

from __future__ import annotations

from pydantic import BaseModel

from shunter.classify.filters import compile_filter
from shunter.commit.tracker import PartitionTracker
from shunter.message import Record


class Effect(BaseModel):
    level: int


class Purchase(BaseModel):
    type: str
    effect: Effect | None = None


def record(value: BaseModel) -> Record:
    rec = Record("guard", 0, 0, None, b"{}", 0, None, PartitionTracker(("guard", 0)), 0)
    rec.value = value
    return rec


def test_a_filter_reads_the_fields_of_a_model_value() -> None:
    where = compile_filter("value.type == 'buy'")
    assert where(record(Purchase(type="buy"))) is True
    assert where(record(Purchase(type="renew"))) is False


def test_a_filter_reads_nested_and_absent_fields_of_a_model_value() -> None:
    where = compile_filter("has(value.effect) && value.effect != null && value.effect.level > 1")
    assert where(record(Purchase(type="buy", effect=Effect(level=2)))) is True
    assert where(record(Purchase(type="buy"))) is False
