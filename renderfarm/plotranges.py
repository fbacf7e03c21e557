"""A1111's range shorthands in the values of a plot's number axes (``scripts/xyz_grid.py``).

A value of a whole-number axis (``seed``, ``steps``, ``width``, ``height``) or a number axis
(``guidance_scale``, a LoRA's weight) written as text may stand for several values:

- ``1-5``: 1, 2, 3, 4, 5 (step 1);
- ``1-10 (+2)``: 1, 3, 5, 7, 9; ``10-1 (-3)``: 10, 7, 4, 1 (the step in round brackets,
  its ``+`` optional here);
- ``1-10 [5]``: 5 values evenly spread from 1 to 10, both ends included (1, 3, 5, 7, 10 on
  a whole-number axis: A1111's ``int(numpy.linspace(...))``, which drops the fraction);
- on a number axis the same with decimals: ``5-7.5 (+0.5)``, ``0.5-1 [3]``.

Spaces around the parts are allowed and a leading sign on the ends (``-2 - 2``), as A1111's
``re_range``, ``re_range_float``, ``re_range_count`` and ``re_range_count_float`` take them.
Where A1111's code differs from what its wiki promises, the farm keeps to the range written
and says so instead of guessing: a range's values never pass its end (A1111's float ranges,
``numpy.arange(start, end + step, step)``, can overshoot: ``1-2 (+0.3)`` gives 2.2 there, here
1, 1.3, 1.6, 1.9), a counting-down range includes its end (A1111's ``range(10, 1 + 1, -3)``
drops 1), and a range that gives no value (``5-1`` with the default step +1, a step of 0,
``[0]``) or more than the plot may have is refused with the reason instead of giving an empty
or endless axis. Pure functions: no Redis, no torch.
"""

from __future__ import annotations

import math
import re

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_STEP_INT = r"[+-]?\d+"
_STEP_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
# A1111's four patterns, with the float ones' dot escaped (A1111's `.` matches any character)
# and the step's sign optional (A1111 wants it: `1-9 (2)` is not a range there)
_STEPPED = {int: re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*({_STEP_INT})\s*\))?\s*"),
            float: re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})"
                              rf"(?:\s*\(\s*({_STEP_FLOAT})\s*\))?\s*")}
_COUNTED = {int: re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*]\s*"),
            float: re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*]\s*")}
_DIGITS = 10  # float range values are rounded to this many decimals (0.1 * 3 is 0.3)


def is_range(text: str, kind: type) -> bool:
    """Whether ``text`` is written as a range of ``kind`` (int or float) values."""
    return bool(_STEPPED[kind].fullmatch(text) or _COUNTED[kind].fullmatch(text))


def expand(text: str, kind: type, limit: int) -> list[int] | list[float]:
    """The values of range ``text`` on an axis of ``kind`` (int or float), in order.
    ValueError says why a range gives none or more than ``limit``; a text that is not a range
    is ValueError too (check :func:`is_range` first)."""
    stepped = _STEPPED[kind].fullmatch(text)
    if stepped:
        start, end = _num(stepped.group(1), kind), _num(stepped.group(2), kind)
        step = _num(stepped.group(3), kind) if stepped.group(3) else kind(1)
        return _stepped(start, end, step, kind, limit, text)
    counted = _COUNTED[kind].fullmatch(text)
    if counted:
        start, end = _num(counted.group(1), kind), _num(counted.group(2), kind)
        return _counted(start, end, int(counted.group(3)), kind, limit)
    raise ValueError("is not a range (START-END, START-END (+STEP), START-END [COUNT])")


def _num(text: str, kind: type) -> int | float:
    return kind(text.replace(" ", ""))


def _stepped(start, end, step, kind: type, limit: int, text: str) -> list:
    if step == 0:
        raise ValueError("has a step of 0, which never moves")
    if (end - start) * step < 0:
        hint = "a negative step, e.g. (-1)" if end < start else "a positive step, e.g. (+1)"
        raise ValueError(f"goes from {_show(start)} to {_show(end)}, which a step of "
                         f"{_show(step, sign=True)} never reaches: give {hint}")
    # the values start + k * step that do not pass the end (a small tolerance for floats)
    count = math.floor((end - start) / step + (1e-9 if kind is float else 0)) + 1
    _check_count(count, limit)
    if kind is int:
        return [start + k * step for k in range(count)]
    return [round(start + k * step, _DIGITS) for k in range(count)]


def _counted(start, end, count: int, kind: type, limit: int) -> list:
    if count < 1:
        raise ValueError(f"has a count of {count}: a count [N] must be at least 1")
    _check_count(count, limit)
    if count == 1:
        return [start]
    values = [start + (end - start) * k / (count - 1) for k in range(count)]
    values[-1] = end  # exactly the end, as numpy.linspace gives it
    if kind is int:
        return [int(v) for v in values]  # A1111: int() of numpy.linspace, fraction dropped
    return [round(v, _DIGITS) for v in values]


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise ValueError(f"gives {count} values; a plot has at most {limit} cells "
                         "(RENDERFARM_MAX_PLOT_CELLS)")


def _show(value: int | float, sign: bool = False) -> str:
    return f"{value:+g}" if sign else f"{value:g}"
