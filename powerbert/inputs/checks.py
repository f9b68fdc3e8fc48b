"""The argument checks every command and API shares: one wording for a number out of range.

No torch here: the CLI's parse-time checks (``powerbert --help``, argparse types) use these too.
"""
from __future__ import annotations

import math
import numbers


def interval(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> str:
    """``[low, high]`` with ``(``/``)`` for open ends; no ``high`` is ``[low, inf)``."""
    right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    return f"{'(' if low_open else '['}{low:g}, {right}"


def in_range(value: float, low: float, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> bool:
    """True if ``low <= value <= high`` with the open ends excluded (no ``high``: unbounded above)."""
    if value < low or (low_open and value == low):
        return False
    return high is None or not (value > high or (high_open and value == high))


def check_int(name: str, value, low: int, high: int | None = None, *, optional: bool = False) -> None:
    """Raise ``ValueError("<name> must be an int >= low[ and <= high], got ...")`` unless ``value`` is
    such an int (bools are not ints here); None passes when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not in_range(value, low, high):
        raise ValueError(f"{name} must be an int >= {low}{f' and <= {high}' if high is not None else ''}, "
                         f"got {value!r}")


def check_number(name: str, value, low: float, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False) -> None:
    """Raise ``ValueError("<name> must be in [low, high], got ...")`` unless ``value`` is a finite
    real number in that interval (``low_open``/``high_open`` exclude the ends); None passes when
    ``optional``."""
    if value is None and optional:
        return
    bounds = interval(low, high, low_open=low_open, high_open=high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    if not in_range(value, low, high, low_open=low_open, high_open=high_open):
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
