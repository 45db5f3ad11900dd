"""Bytes → value, and the value checked against the topic's schema or model."""

from .decoder import Decoder, build_decoders
from .display import decode_now, display

__all__ = ["Decoder", "build_decoders", "decode_now", "display"]
