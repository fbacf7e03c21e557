"""Which models a models directory holds. Imports neither torch nor diffusers.

The producer calls :func:`list_models` on machines without torch, so keep this module light.
"""

from __future__ import annotations

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
