"""SHA-256 hashes of models and LoRAs, computed once per file and cached. Imports neither
torch nor diffusers (the producer reads the cache too).

What is hashed:

- a single-file checkpoint (``.safetensors`` / ``.ckpt``): the whole file. AUTOMATIC1111
  writes its first 10 hex digits as ``Model hash:`` (:func:`short_model_hash`); civitai calls
  that "AutoV2" and the full digest "SHA256".
- a diffusers folder: its denoiser's weights, ``unet/`` (SD 1.x, SDXL) or ``transformer/``
  (Flux): the file ``diffusion_pytorch_model.safetensors`` (else ``.bin``, else the fp16
  variant). Sharded weights (``diffusion_pytorch_model-00001-of-0000N.safetensors``) are hashed
  as one stream, the shards in name order. The denoiser is what tells fine-tunes apart; the
  same UNet saved as a single file does not give the same hash (that file holds the VAE and
  text encoder too, under other names).
- a LoRA: the whole file (:func:`file_sha256`), and A1111's own LoRA hash (:func:`addnet_hash`):
  for ``.safetensors``, the SHA-256 of the bytes after the header (so editing the metadata does
  not change it); A1111 writes its first 12 hex digits in ``Lora hashes:``
  (:func:`short_lora_hash`), civitai calls it "AutoV3".

The cache. Hashing a 7 GB checkpoint takes seconds to a minute, so each digest is kept in a
JSON file keyed by the file's absolute path, size and modification time (a changed file is
hashed again): ``<dir>/.hashes.json`` in the directory given (the models directory: hidden,
never a model), or ``$XDG_CACHE_HOME/renderfarm/hashes/<id>.json`` where that directory is not
writable. Workers sharing a models directory share the cache; each writes it whole by rename,
so a reader never sees half a file (two writers at once may lose an entry: it is computed
again later). Within a process, a file is hashed by one thread at a time; the others wait for
its result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("renderfarm.worker")

CACHE_NAME = ".hashes.json"
CHUNK = 1 << 20
DENOISERS = ("unet", "transformer")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
#: Bytes read to hash, for tests and the log (a counter, not a measure of time).
bytes_read = 0


def short_model_hash(sha256: str) -> str:
    """A1111's ``Model hash:``: the first 10 hex digits of the SHA-256."""
    return sha256[:10]


def short_lora_hash(addnet: str) -> str:
    """A1111's ``Lora hashes:`` entry: the first 12 hex digits of :func:`addnet_hash`."""
    return addnet[:12]


def hashed_files(model: Path) -> list[Path]:
    """The file(s) whose bytes make ``model``'s hash (see the module docstring)."""
    model = Path(model)
    if model.is_file():
        return [model]
    for part in DENOISERS:
        folder = model / part
        if not folder.is_dir():
            continue
        for name in WEIGHT_NAMES:
            if (folder / name).is_file():
                return [folder / name]
        for suffix in (".safetensors", ".bin"):
            shards = sorted(folder.glob(f"diffusion_pytorch_model-*-of-*{suffix}"))
            if shards:
                return shards
    raise FileNotFoundError(f"{model}: no weights to hash (a model file, or a diffusers folder "
                            f"with {' or '.join(DENOISERS)}/diffusion_pytorch_model.*)")


def _stamp(paths: Iterable[Path]) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _sha256(paths: Iterable[Path], skip_header: bool = False) -> str:
    """SHA-256 of the files' bytes, one stream; ``skip_header``: a safetensors file's tensor
    bytes only (after its 8-byte length and JSON header), as kohya's and A1111's addnet hash."""
    global bytes_read
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            if skip_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            while chunk := f.read(CHUNK):
                bytes_read += len(chunk)
                digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """Digests of files, kept in the JSON file ``path`` (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        self._memory: dict[str, dict] = {}

    # -- public --------------------------------------------------------------------------
    def model_sha256(self, model: Path) -> str:
        """SHA-256 of a model: a checkpoint file or a diffusers folder."""
        return self._digest("sha256", hashed_files(model))

    def file_sha256(self, path: Path) -> str:
        """SHA-256 of the whole file."""
        return self._digest("sha256", [Path(path)])

    def addnet_hash(self, path: Path) -> str:
        """A1111's LoRA hash: SHA-256 of a ``.safetensors`` file's tensor bytes (after the
        header); of the whole file for other formats."""
        path = Path(path)
        kind = "addnet" if path.suffix.lower() == ".safetensors" else "sha256"
        return self._digest(kind, [path])

    def cached_model_sha256(self, model: Path) -> str | None:
        """The model's SHA-256 if it is in the cache and the file has not changed since, else
        None. Reads no weights: for web requests."""
        try:
            files = hashed_files(model)
            key, stamp = self._key("sha256", files)
        except OSError:
            return None
        entry = self._memory.get(key) or self._load().get(key)
        return entry["digest"] if entry and entry["stamp"] == stamp else None

    # -- internals -----------------------------------------------------------------------
    @staticmethod
    def _key(kind: str, files: list[Path]) -> tuple[str, list[list]]:
        stamp = _stamp(files)
        return f"{kind}:{stamp[0][0]}", stamp

    def _digest(self, kind: str, files: list[Path]) -> str:
        key, stamp = self._key(kind, files)
        with self._lock:
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:  # one thread hashes a file; the others wait and read the result
            entry = self._memory.get(key)
            if entry is None or entry["stamp"] != stamp:
                entry = self._load().get(key)
            if entry is None or entry["stamp"] != stamp:
                log.info("hashing %s (%s)", stamp[0][0], kind)
                entry = {"stamp": stamp, "digest": _sha256(files, skip_header=kind == "addnet")}
                self._store(key, entry)
            self._memory[key] = entry
            return entry["digest"]

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _store(self, key: str, entry: dict) -> None:
        with self._lock:
            data = self._load()
            data[key] = entry
            temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
                os.replace(temporary, self.path)
            except OSError as exc:  # kept in memory: hashed again by the next process
                log.warning("cannot write the hash cache %s: %s", self.path, exc)
                temporary.unlink(missing_ok=True)


@lru_cache(maxsize=32)
def hash_cache(directory: Path) -> HashCache:
    """The cache of files under ``directory`` (the models directory): ``<directory>/.hashes.json``,
    or one under ``$XDG_CACHE_HOME/renderfarm/hashes/`` where ``directory`` is not writable."""
    directory = Path(directory).resolve()
    if os.access(directory, os.W_OK):
        return HashCache(directory / CACHE_NAME)
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    name = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return HashCache(Path(home) / "renderfarm" / "hashes" / f"{name}.json")


def model_sha256(model: Path, models_dir: Path | None = None) -> str:
    """SHA-256 of ``model`` (a checkpoint file or diffusers folder), cached in
    ``models_dir``'s cache (default: the model's parent directory)."""
    model = Path(model)
    return hash_cache(Path(models_dir) if models_dir else model.parent).model_sha256(model)


def file_sha256(path: Path, directory: Path | None = None) -> str:
    """SHA-256 of a whole file (a LoRA, say), cached in ``directory``'s cache (default: the
    file's directory)."""
    path = Path(path)
    return hash_cache(Path(directory) if directory else path.parent).file_sha256(path)


def addnet_hash(path: Path, directory: Path | None = None) -> str:
    """A1111's LoRA hash of ``path`` (see :meth:`HashCache.addnet_hash`), cached."""
    path = Path(path)
    return hash_cache(Path(directory) if directory else path.parent).addnet_hash(path)
