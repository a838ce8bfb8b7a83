"""The formats an export can be written in: one module per format, each an Encoder
(base.py), registered here by its format name."""

from exporter.pipeline.encoders.base import Encoder, Rendering, RenderOptions, parse_flag
from exporter.pipeline.encoders.csv import CsvEncoder
from exporter.pipeline.encoders.ndjson import NdjsonEncoder

__all__ = [
    "ENCODERS",
    "Encoder",
    "RenderOptions",
    "Rendering",
    "encoder_for_media_type",
    "parse_flag",
]

ENCODERS: dict[str, type[Encoder]] = {
    encoder.format: encoder for encoder in (CsvEncoder, NdjsonEncoder)
}


def encoder_for_media_type(media_type: str) -> type[Encoder] | None:
    for encoder in ENCODERS.values():
        if encoder.media_type == media_type:
            return encoder
    return None
