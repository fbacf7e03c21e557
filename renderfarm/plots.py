"""X/Y/Z plots and prompt matrices: one base job and up to three axes, expanded into cells.

A plot is A1111's X/Y/Z plot (``scripts/xyz_grid.py``) spread over the fleet: each cell is an
ordinary job of the plot's batch (its own record, infotext and retry), and a worker draws the
grid once every cell has ended (worker/gridbuilder.py, renderfarm/grids.py).

An axis is a field and its values:

- ``seed``, ``steps``, ``guidance_scale``, ``scheduler``, ``model``, ``width``, ``height``:
  the job's field takes each value;
- ``size``: ``"WxH"`` values set width and height together;
- ``lora:<name>``: the weight of LoRA ``<name>`` (added to the job's LoRAs where it is not
  there yet);
- ``prompt_sr``: A1111's Prompt S/R: the first value is searched in the prompt and the negative
  prompt and replaced by each value in turn (the first cell keeps the prompt as it is);
  refused when the first value is in neither;
- ``prompt_matrix``: A1111's prompt matrix as an axis: the values are the optional parts, the
  cells every combination of them (2^n), each part appended to the prompt with ``", "`` in
  order. With no values, the parts come from the job's prompt (``"a cat|in the snow|at
  night"``: the text before the first ``|`` is the prompt, the others are the parts).

Cells are numbered x fastest, then y, then z (A1111's order): cell ``x + nx * (y + ny * z)``.
Pure data: no Redis, no torch. :meth:`producer.client.FarmClient.submit_plot` validates the
values against the farm and submits the cells.
"""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

from renderfarm.errors import FieldError, InvalidJob
from renderfarm.plotranges import expand, is_range

AXES = ("x", "y", "z")
#: Fields an axis may vary, and what they take (``lora:<name>`` is the weight of a LoRA).
FIELDS = ("seed", "steps", "guidance_scale", "scheduler", "model", "width", "height", "size",
          "prompt_sr", "prompt_matrix", "lora:<name>")
_INT_FIELDS = ("seed", "steps", "width", "height")
_FLOAT_FIELDS = ("guidance_scale",)
_STR_FIELDS = ("scheduler", "model", "prompt_sr", "prompt_matrix")
#: A1111's axis names and other spellings users type: the farm's field for each.
ALIASES = {"cfg_scale": "guidance_scale", "cfg": "guidance_scale", "sampler": "scheduler",
           "sampler_name": "scheduler", "checkpoint": "model", "prompt s/r": "prompt_sr",
           "prompt_s/r": "prompt_sr", "sr": "prompt_sr"}
#: What an axis changes in the job, where that is not its own field.
_VARIES = {"prompt_sr": ("prompt",), "prompt_matrix": ("prompt",), "size": ("width", "height")}
MAX_MATRIX_PARTS = 12  # 4,096 combinations, far over any cell cap: refused before expanding


@dataclass
class Axis:
    """One axis: the field it varies, its values (as the job takes them: a prompt matrix's are
    the combinations, tuples of part numbers) and each value's label (``field: value``)."""

    name: str  #: x, y or z
    field: str
    values: list[Any]
    labels: list[str]
    parts: list[str] = field(default_factory=list)  #: a prompt matrix's optional parts
    #: per value, the index of the value given and, for one of a range (``1-5``), its text
    origins: list[tuple[int, str]] = field(default_factory=list)

    def origin(self, index: int) -> tuple[int, str]:
        """Where value ``index`` came from, for errors: the index of the value given, and
        ``', from the range "1-5"'`` for a value of a range (else "")."""
        if index >= len(self.origins):
            return index, ""
        given, text = self.origins[index]
        return given, (f', from the range "{text}"' if text else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "values": _jsonable(self.values),
                               "labels": self.labels}
        if self.parts:
            out["parts"] = self.parts
        return out


@dataclass
class Plot:
    """A validated plot's axes, in x, y, z order (absent axes left out)."""

    axes: list[Axis]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(nx, ny, nz): values per axis, 1 for an absent one."""
        sizes = {a.name: len(a.values) for a in self.axes}
        return sizes.get("x", 1), sizes.get("y", 1), sizes.get("z", 1)

    @property
    def cell_count(self) -> int:
        nx, ny, nz = self.shape
        return nx * ny * nz

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def coordinates(self) -> list[tuple[int, int, int]]:
        """(x, y, z) of every cell, in cell order (x fastest)."""
        nx, ny, nz = self.shape
        return [(x, y, z) for z in range(nz) for y in range(ny) for x in range(nx)]

    def cells(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The job of every cell, in cell order: ``job`` with each axis' value applied."""
        out = []
        for coords in self.coordinates():
            cell = dict(job)
            for axis, index in zip(self._by_name(), coords, strict=True):
                if axis is not None:
                    cell = apply(cell, axis, index)
            out.append(cell)
        return out

    def probes(self, job: dict[str, Any]) -> list[tuple[Axis, int, dict[str, Any]]]:
        """One job per axis value (the base job with only that value applied), to check each
        value on its own and name it when it is refused."""
        return [(axis, i, apply(dict(job), axis, i))
                for axis in self.axes for i in range(len(axis.values))]

    def describe(self, coords: tuple[int, int, int]) -> str:
        """``x=seed: 1, y=steps: 10``: where a cell is, for error messages."""
        return ", ".join(f"{axis.name}={axis.labels[i]}" for axis, i in
                         zip(self._by_name(), coords, strict=True) if axis is not None)

    def to_dict(self) -> dict[str, Any]:
        return {a.name: a.to_dict() for a in self.axes}

    def _by_name(self) -> list[Axis | None]:
        return [self.axis(name) for name in AXES]


def parse_plot(axes: Any, job: dict[str, Any], max_cells: int) -> Plot:
    """Check the axes of a plot of ``job`` (their fields, the values' types and ranges, S/R
    and matrix rules, the cell cap) and build it. :class:`InvalidJob` names the axis, the field
    and the value of each problem. Whether each value suits the farm (a model it has, a step
    count in bounds) is checked afterwards with the farm's own job validation (``probes``)."""
    if not isinstance(axes, dict) or not axes:
        raise InvalidJob([FieldError("axes", "must be an object with axes x, y and/or z", axes)])
    errors: list[FieldError] = []
    parsed: list[Axis] = []
    for name in axes:
        if name not in AXES:
            errors.append(FieldError(f"axes.{name}", "is not an axis (x, y, z)", axes[name]))
    seen: dict[str, str] = {}
    for name in AXES:
        if name not in axes:
            continue
        try:
            axis = _parse_axis(name, axes[name], job, max_cells)
        except InvalidJob as exc:
            errors.extend(exc.errors)
            continue
        varied = _VARIES.get(axis.field, (axis.field,))
        other = next((seen[k] for k in varied if k in seen), None)
        if other is not None:
            errors.append(FieldError(f"axes.{name}.field", f"varies what axis {other} varies: "
                                     "one axis per field", axis.field))
        seen.update({k: name for k in varied})
        parsed.append(axis)
    if errors:
        raise InvalidJob(errors)
    plot = Plot(parsed)
    if plot.cell_count > max_cells:
        nx, ny, nz = plot.shape
        raise InvalidJob([FieldError("axes", f"make {plot.cell_count} cells ({nx} x {ny} x {nz}); "
                                     f"at most {max_cells} (RENDERFARM_MAX_PLOT_CELLS)",
                                     f"{nx}x{ny}x{nz}")])
    return plot


def _parse_axis(name: str, body: Any, job: dict[str, Any], max_cells: int) -> Axis:
    where = f"axes.{name}"
    if not isinstance(body, dict):
        raise InvalidJob([FieldError(where, 'must be an object {"field": ..., "values": [...]}',
                                     body)])
    extra = [k for k in body if k not in ("field", "values")]
    if extra:
        raise InvalidJob([FieldError(f"{where}.{extra[0]}", "is not a known field of an axis "
                                     "(field, values)", body[extra[0]])])
    raw_field = body.get("field")
    if not isinstance(raw_field, str) or not raw_field.strip():
        raise InvalidJob([FieldError(f"{where}.field", "must name a field: "
                                     + ", ".join(FIELDS), raw_field)])
    fname = canonical_field(raw_field)
    if fname is None:
        raise InvalidJob([FieldError(f"{where}.field", "is not a field a plot can vary ("
                                     + ", ".join(FIELDS) + ")", raw_field)])
    values = body.get("values")
    if fname == "prompt_matrix" and values in (None, []):
        values = _matrix_parts_of(job, where)
    if not isinstance(values, list) or not values:
        raise InvalidJob([FieldError(f"{where}.values", f"must be a non-empty list of {fname} "
                                     "values", values)])
    # Counted as read: an axis of more values than the cap makes more cells than the cap, and
    # many small ranges would otherwise be expanded (hundreds of millions of values) first.
    too_many = [FieldError(f"{where}.values", f"({fname}) give more than {max_cells} values "
                           f"(RENDERFARM_MAX_PLOT_CELLS: cells of the whole plot)", len(values))]
    if len(values) > max_cells:
        raise InvalidJob(too_many)
    errors, coerced, origins = [], [], []
    kind = _number_kind(fname)
    for i, value in enumerate(values):
        if len(coerced) > max_cells:
            raise InvalidJob(too_many)
        if kind is not None and isinstance(value, str) and is_range(value, kind):
            try:
                expanded = expand(value, kind, max_cells)
            except ValueError as exc:
                errors.append(FieldError(f"{where}.values.{i}", f"({fname}): the range {exc}",
                                         value))
                continue
            coerced.extend(expanded)
            origins.extend((i, value.strip()) for _ in expanded)
            continue
        try:
            coerced.append(_coerce(fname, value))
            origins.append((i, ""))
        except ValueError as exc:
            errors.append(FieldError(f"{where}.values.{i}", f"is not a valid {fname}: {exc}",
                                     value))
    if len(coerced) > max_cells:
        raise InvalidJob(too_many)
    if errors:
        raise InvalidJob(errors)
    if fname == "prompt_sr":
        return _sr_axis(name, coerced, job, where)
    if fname == "prompt_matrix":
        return _matrix_axis(name, coerced, where)
    labels = [f"{fname}: {_label(fname, v)}" for v in coerced]
    return Axis(name, fname, coerced, labels, origins=origins)


def _number_kind(fname: str) -> type | None:
    """int or float for an axis of whole numbers or numbers (which take ranges), else None."""
    if fname in _INT_FIELDS:
        return int
    if fname in _FLOAT_FIELDS or fname.startswith("lora:"):
        return float
    return None


def varied_fields(fname: str) -> tuple[str, ...]:
    """The job fields an axis of ``fname`` changes."""
    if fname.startswith("lora:"):
        return ("loras",)
    if fname == "prompt_sr":
        return ("prompt", "negative_prompt")
    return _VARIES.get(fname, (fname,))


def canonical_field(raw: str) -> str | None:
    """The farm's name of an axis field (``cfg_scale`` -> ``guidance_scale``), or None."""
    text = raw.strip()
    lowered = ALIASES.get(text.lower(), text.lower())
    if lowered.startswith("lora:"):
        name = text.split(":", 1)[1].strip()
        return f"lora:{name}" if name else None
    return lowered if lowered in FIELDS else None


def _number(value: Any, cast: type, message: str) -> Any:
    """``value`` (a number or its text) as ``cast``; an int from a float only if it is whole."""
    if isinstance(value, int) or (isinstance(value, float)
                                  and (cast is float or value.is_integer())):
        return cast(value)
    if isinstance(value, str):
        try:
            return cast(value.strip())
        except ValueError:
            pass
    raise ValueError(message)


def _coerce(fname: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must not be a boolean")
    if fname in _INT_FIELDS:
        return _number(value, int, "must be a whole number or a range (1-5, 1-9 (+2), "
                       "1-10 [4])")
    if fname in _FLOAT_FIELDS or fname.startswith("lora:"):
        return _number(value, float, "must be a number or a range (5-7.5 (+0.5), 0-1 [5])")
    if fname == "size":
        if isinstance(value, str):
            w, sep, h = value.strip().lower().partition("x")
            if sep and w.strip().isdigit() and h.strip().isdigit():
                return f"{int(w)}x{int(h)}"
        raise ValueError('must be "WIDTHxHEIGHT", e.g. "512x768"')
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip() if fname in ("scheduler", "model") else value


def _sr_axis(name: str, values: list[str], job: dict[str, Any], where: str) -> Axis:
    search = values[0]
    prompt, negative = str(job.get("prompt") or ""), str(job.get("negative_prompt") or "")
    if search not in prompt and search not in negative:
        raise InvalidJob([FieldError(f"{where}.values.0", "(prompt_sr: the text searched) is "
                                     "in neither the prompt nor the negative prompt", search)])
    return Axis(name, "prompt_sr", values, [f"prompt_sr: {v}" for v in values])


def _matrix_parts_of(job: dict[str, Any], where: str) -> list[str]:
    prompt = job.get("prompt")
    if not isinstance(prompt, str) or "|" not in prompt:
        raise InvalidJob([FieldError(f"{where}.values", "must list the optional parts, or the "
                                     "job's prompt must hold them after '|' (a|b|c)", None)])
    return [p.strip() for p in prompt.split("|")[1:]]


def _matrix_axis(name: str, parts: list[str], where: str) -> Axis:
    if len(parts) > MAX_MATRIX_PARTS:
        raise InvalidJob([FieldError(f"{where}.values", f"(prompt_matrix) has {len(parts)} parts,"
                                     f" 2^{len(parts)} cells; at most {MAX_MATRIX_PARTS} parts",
                                     parts)])
    combos = matrix_combinations(len(parts))
    labels = ["prompt_matrix: " + (" + ".join(parts[i] for i in combo) or "-")
              for combo in combos]
    return Axis(name, "prompt_matrix", combos, labels, parts=list(parts))


def matrix_combinations(n: int) -> list[tuple[int, ...]]:
    """A1111's prompt matrix order: combination ``k`` holds part ``i`` when bit ``i`` of ``k``
    is set (k = 0 .. 2^n - 1), so the first cell is the bare prompt and the last has them all."""
    return [tuple(i for i in range(n) if k & (1 << i)) for k in range(2 ** n)]


def apply(job: dict[str, Any], axis: Axis, index: int) -> dict[str, Any]:
    """``job`` with value ``index`` of ``axis`` applied (a new dict)."""
    value = axis.values[index]
    out = dict(job)
    if axis.field == "size":
        w, h = value.split("x")
        out["width"], out["height"] = int(w), int(h)
    elif axis.field == "prompt_sr":
        search = axis.values[0]
        for key in ("prompt", "negative_prompt"):
            if isinstance(out.get(key), str):
                out[key] = out[key].replace(search, value)
    elif axis.field == "prompt_matrix":
        base = str(out.get("prompt", "")).split("|")[0].strip()
        out["prompt"] = ", ".join([base, *(axis.parts[i] for i in value)])
    elif axis.field.startswith("lora:"):
        lora_name = axis.field.split(":", 1)[1]
        loras = [dict(lora) if isinstance(lora, dict) else lora
                 for lora in (out.get("loras") or [])]
        for lora in loras:
            if isinstance(lora, dict) and lora.get("name") == lora_name:
                lora["weight"] = value
                break
        else:
            loras.append({"name": lora_name, "weight": value})
        out["loras"] = loras
    else:
        out[axis.field] = value
    return out


def parse_cli_axis(text: str) -> dict[str, Any]:
    """``seed=1,2,3`` -> ``{"field": "seed", "values": ["1", "2", "3"]}``; values are split as
    CSV, as A1111 reads its axis values (``"a, b",c`` is two values), and
    ``prompt=S/R:barn,house`` is the Prompt S/R axis."""
    fname, sep, rest = text.partition("=")
    if not sep or not fname.strip():
        raise InvalidJob([FieldError("axis", "must be FIELD=VALUE,VALUE,... (e.g. seed=1,2,3)",
                                     text)])
    fname = fname.strip()
    if fname.lower() == "prompt":
        if rest.upper().startswith("S/R:"):
            fname, rest = "prompt_sr", rest[4:]
        elif rest.lower().startswith("matrix:"):
            fname, rest = "prompt_matrix", rest[7:]
        else:
            raise InvalidJob([FieldError("axis", "varies the prompt as prompt=S/R:find,replace,"
                                         "... or prompt=matrix:part,part,...", text)])
    rows = list(csv.reader(io.StringIO(rest), skipinitialspace=True))
    values = [v.strip() for v in itertools.chain.from_iterable(rows) if v.strip()]
    if fname.lower() == "prompt_matrix" and not values:
        return {"field": fname, "values": []}
    return {"field": fname, "values": values}


def _label(fname: str, value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _jsonable(values: list[Any]) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in values]
