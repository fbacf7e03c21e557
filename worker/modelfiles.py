"""Which models a models directory holds. Imports neither torch nor diffusers.

The producer calls :func:`list_models` on machines without torch, so keep this module light.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Single-file checkpoints a worker can load with ``from_single_file``.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: ``<name>.config/``: the diffusers config of single-file checkpoint ``<name>``.
CONFIG_SUFFIX = ".config"


def list_models(models_dir: Path) -> dict[str, Path]:
    """Model name -> path, sorted by name.

    A model is a diffusers folder (it has ``model_index.json``; name = folder name) or a single
    ``.safetensors`` / ``.ckpt`` file (name = file stem). A folder wins over a file of the same
    name. A folder named ``<name>.config`` is the config of checkpoint ``<name>`` (see
    :mod:`worker.singlefile`), never a model of its own. Hidden entries (``.name``) are
    skipped, so a model being written under a hidden name does not show up half-made. A
    missing directory holds no models.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return {}
    folders: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for entry in models_dir.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(CONFIG_SUFFIX):
            continue
        if entry.is_dir() and (entry / "model_index.json").is_file():
            folders[entry.name] = entry
        elif entry.is_file() and entry.suffix.lower() in SINGLE_FILE_SUFFIXES:
            files.setdefault(entry.stem, entry)
    models = {**files, **folders}
    return dict(sorted(models.items()))


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``.safetensors`` file, from its JSON header alone (no torch):
    8 bytes of little-endian header length, then the header. ``ValueError`` if it is not one."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        size = int.from_bytes(head, "little")
        if size > 100 * 2**20 or size > path.stat().st_size:
            raise ValueError(f"{path}: header length {size} is not a safetensors header's")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not an object")
    ends = [entry["data_offsets"][1] for entry in header.values()
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    expected = 8 + size + max(ends, default=0)
    actual = path.stat().st_size
    if actual < expected:  # a download or copy cut short
        raise ValueError(f"{path}: truncated: its header describes {expected} bytes, the file "
                         f"holds {actual}")
    return {key: tuple(entry.get("shape", ())) for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)}
