"""Bytes → value, and the value checked against the topic's schema or model."""

from .decoder import Decoder, build_decoders

__all__ = ["Decoder", "build_decoders"]
