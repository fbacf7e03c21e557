"""Reading prompt files, for the CLI and the dashboard alike.

``.txt``: one prompt a line (blank lines and ``#`` comments skipped); ``.csv``: the ``prompt``
column (or the first); ``.jsonl``: one job object a line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


def parse_jobs(name: str, data: bytes) -> list[dict]:
    """Jobs from a file's name and bytes; ``ValueError`` says which line is wrong and why."""
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
            jobs.append(job)
        return jobs
    if suffix == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip()]
        header = [c.strip().lower() for c in rows[0]] if rows else []
        column = 0
        if "prompt" in header:
            column, rows = header.index("prompt"), rows[1:]
        return [{"prompt": r[column].strip()} for r in rows if len(r) > column]
    return [{"prompt": line.strip()} for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def read_jobs(path: Path) -> list[dict]:
    """Jobs from a file on disk; ``ValueError`` names the file and the line."""
    try:
        return parse_jobs(str(path), Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
