"""Lists and values as people read them in one log line or error: a config with 5,000 labels, or a data URI
as an image address, must not make a line of hundreds of kilobytes."""

from __future__ import annotations

from collections.abc import Iterable


def shortlist(items: Iterable[object], most: int = 12, sep: str = ", ") -> str:
    """The first `most` items joined, then "… and N more" (N counted, not guessed)."""
    items = [str(i) for i in items]
    shown = sep.join(items[:most])
    return shown if len(items) <= most else f"{shown}{sep}… and {len(items) - most} more"


def clip(text: object, limit: int = 300) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"
