"""Reading prompt files: ``.txt`` (one prompt a line) or ``.jsonl`` (one job object a line)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jobs(path: Path) -> list[dict]:
    """Jobs from a file. Blank lines and ``#`` comments in .txt are skipped."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".jsonl":
        jobs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(job, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            jobs.append(job)
        return jobs
    return [{"prompt": line.strip()} for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
