"""Sizes as people read them, in the worker's reasons and logs (one rule for every layer)."""

from __future__ import annotations

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(count: int, *, exact: bool = False) -> str:
    """``2147483648`` -> ``"2.0 GiB"``: a measured amount, one decimal of the largest unit
    it reaches (``"512 B"`` below a KiB).

    ``exact``: for a configured bound, where rounding would misstate it — ``"2 GiB"`` when
    the count is a whole number of a unit, else ``"1000000 bytes"``."""
    if exact:
        for unit, scale in _UNITS:
            if count >= scale and count % scale == 0:
                return f"{count // scale} {unit}"
        return f"{count} bytes"
    for unit, scale in _UNITS:
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
