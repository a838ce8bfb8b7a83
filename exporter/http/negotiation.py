"""Content negotiation: pick one of the offered media types for an Accept header (RFC 9110)."""

import re
from collections.abc import Sequence

# RFC 9110 §12.4.2. float() would also take nan, inf, 1e9 and 1_0: a weight that is not a
# qvalue counts as 0 (not acceptable), as in Accept-Encoding (compression.py).
_QVALUE = re.compile(r"[01](?:\.[0-9]{0,3})?", re.ASCII)


def _parse(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(",")[:50]:
        fields = [f.strip() for f in part.split(";")]
        media_range = fields[0].lower()
        if "/" not in media_range:
            continue
        quality = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = min(float(value), 1.0) if _QVALUE.fullmatch(value) else 0.0
        ranges.append((media_range, quality))
    return ranges


def _specificity(media_range: str, offer: str) -> int | None:
    if media_range == offer:
        return 2
    main, _, sub = media_range.partition("/")
    if sub == "*" and (main == "*" or offer.startswith(main + "/")):
        return 0 if main == "*" else 1
    return None


def negotiate(accept: str | None, offers: Sequence[str]) -> str | None:
    """The offer the client prefers most; ties go to the earlier offer. None: nothing fits."""
    if not accept or not accept.strip():
        return offers[0]
    ranges = _parse(accept)
    best: tuple[float, int, str] | None = None
    for index, offer in enumerate(offers):
        # The most specific matching range decides an offer's quality.
        matches = [
            (spec, quality)
            for media_range, quality in ranges
            if (spec := _specificity(media_range, offer)) is not None
        ]
        if not matches:
            continue
        quality = max(matches)[1]
        if quality > 0 and (best is None or quality > best[0]):
            best = (quality, index, offer)
    return best[2] if best else None
