"""Reading prompt files, for the CLI and the dashboard alike.

``.txt``: one prompt a line (blank lines and ``#`` comments skipped); ``.jsonl``: one job
object a line; ``.csv``: with a header row naming job fields (``prompt,seed,negative_prompt``;
empty cells keep the default), one job a row; a column that is not a job field is refused,
naming it. A ``.csv`` without a ``prompt`` header is one prompt a row, from its first column.

Every job comes with its line number (1-based, as an editor shows it), so an error about a job
can say where in the file it is.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


def parse_jobs(name: str, data: bytes) -> list[dict]:
    """Jobs from a file's name and bytes; ``ValueError`` says which line is wrong and why."""
    return [job for _, job in numbered_jobs(name, data)]


def numbered_jobs(name: str, data: bytes) -> list[tuple[int, dict]]:
    """``(line, job)`` of every job in the file: see the module's doc."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("must be UTF-8 text") from None
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        jobs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(job, dict):
                raise ValueError(f"line {n} must be a JSON object")
            jobs.append((n, job))
        return jobs
    if suffix == ".csv":
        return _csv_jobs(text)
    return [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _csv_jobs(text: str) -> list[tuple[int, dict]]:
    from renderfarm.schema import JobRequest

    reader = csv.reader(io.StringIO(text))
    rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    if "prompt" not in header:  # no header: one prompt a row
        return [(n, {"prompt": r[0].strip()}) for n, r in rows if r[0].strip()]
    unknown = [c for c in header if c not in JobRequest.model_fields or c == "init_image"]
    if unknown:
        raise ValueError(f"line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"columns are job fields, e.g. prompt, negative_prompt, seed, steps, "
                         "width, height, model, guidance_scale, scheduler")
    jobs = []
    for n, row in rows[1:]:
        if len(row) > len(header):
            raise ValueError(f"line {n} has {len(row)} cells, the header {len(header)}")
        jobs.append((n, {c: _cell(c, v.strip()) for c, v in zip(header, row, strict=False)
                         if v.strip()}))
    return jobs


#: CSV cells of these fields are read as numbers, so an error shows ``got 500``; a cell that is
#: not a number stays text, and validation names it.
_NUMBERS = {"width": int, "height": int, "steps": int, "seed": int, "num_images": int,
            "priority": int, "guidance_scale": float, "strength": float}


def _cell(column: str, value: str) -> object:
    kind = _NUMBERS.get(column)
    if kind is None:
        return value
    try:
        return kind(value)
    except ValueError:
        return value


def read_jobs(path: Path) -> list[tuple[int, dict]]:
    """``(line, job)`` from a file on disk; ``ValueError`` names the file and the line."""
    try:
        return numbered_jobs(str(path), Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
