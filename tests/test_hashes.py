"""Model and LoRA hashes: hashlib's digests, computed once per file and cached by path, size and
modification time."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading

import pytest

from worker import hashes
from worker.hashes import HashCache, hash_cache, hashed_files, model_sha256


def _safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def models(tmp_path):
    (tmp_path / "ckpt.safetensors").write_bytes(os.urandom(3 << 20) + b"end")
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet" * 1000)
    (folder / "vae").mkdir()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae" * 1000)
    return tmp_path


def _read() -> int:
    return hashes.bytes_read


def test_the_hash_is_hashlibs_and_is_computed_once(models):
    checkpoint = models / "ckpt.safetensors"
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    before = _read()
    assert model_sha256(checkpoint, models) == expected
    assert _read() - before == checkpoint.stat().st_size
    assert model_sha256(checkpoint, models) == expected
    assert HashCache(models / ".hashes.json").model_sha256(checkpoint) == expected  # new process
    assert _read() - before == checkpoint.stat().st_size  # not read again
    assert hashes.short_model_hash(expected) == expected[:10]
    cached = json.loads((models / ".hashes.json").read_text())
    assert [entry["digest"] for entry in cached.values()] == [expected]


def test_a_changed_file_is_hashed_again(models):
    checkpoint = models / "ckpt.safetensors"
    first = model_sha256(checkpoint, models)
    checkpoint.write_bytes(b"other bytes")
    os.utime(checkpoint, ns=(1, 1))  # mtime and size change
    assert model_sha256(checkpoint, models) == hashlib.sha256(b"other bytes").hexdigest() != first
    assert HashCache(models / ".hashes.json").cached_model_sha256(checkpoint) == \
        hashlib.sha256(b"other bytes").hexdigest()


def test_a_diffusers_folder_is_hashed_by_its_unet_or_transformer(models):
    folder = models / "folder"
    assert hashed_files(folder) == [folder / "unet" / "diffusion_pytorch_model.safetensors"]
    assert model_sha256(folder, models) == hashlib.sha256(b"unet" * 1000).hexdigest()
    flux = models / "flux"
    (flux / "transformer").mkdir(parents=True)
    shards = [flux / "transformer" / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
              for i in (2, 1)]
    for index, shard in enumerate(shards):
        shard.write_bytes(bytes([index]) * 100)
    assert model_sha256(flux, models) == hashlib.sha256(
        shards[1].read_bytes() + shards[0].read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="no weights to hash"):
        hashed_files(models)


def test_cached_lookup_reads_no_weights(models):
    cache = HashCache(models / "cache.json")
    checkpoint = models / "ckpt.safetensors"
    before = _read()
    assert cache.cached_model_sha256(checkpoint) is None
    assert cache.cached_model_sha256(models / "missing.safetensors") is None
    assert _read() == before
    digest = cache.model_sha256(checkpoint)
    assert HashCache(models / "cache.json").cached_model_sha256(checkpoint) == digest


def test_lora_hashes_full_and_a1111s(tmp_path):
    data = os.urandom(5000)
    lora = _safetensors(tmp_path / "style.safetensors", {"__metadata__": {"a": "1"}}, data)
    assert hashes.file_sha256(lora) == hashlib.sha256(lora.read_bytes()).hexdigest()
    addnet = hashes.addnet_hash(lora)
    assert addnet == hashlib.sha256(data).hexdigest()  # the tensor bytes only
    assert hashes.short_lora_hash(addnet) == addnet[:12]
    # Other metadata, same tensors: the same A1111 hash, another file hash.
    again = _safetensors(tmp_path / "renamed.safetensors", {"__metadata__": {"b": "22"}}, data)
    assert hashes.addnet_hash(again) == addnet
    assert hashes.file_sha256(again) != hashes.file_sha256(lora)


def test_threads_hash_a_file_once(models):
    cache = HashCache(models / "threads.json")
    checkpoint = models / "ckpt.safetensors"
    before = _read()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(cache.model_sha256(checkpoint)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(results)) == 1 and len(results) == 4
    assert _read() - before == checkpoint.stat().st_size


def test_a_read_only_models_dir_caches_elsewhere(models, tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("cache-home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    writable = os.access
    # the models dir reads as not writable (chmod does not stop root, who runs CI containers)
    monkeypatch.setattr(os, "access", lambda path, mode: writable(path, mode)
                        and not (mode & os.W_OK and str(path) == str(models.resolve())))
    hash_cache.cache_clear()
    cache = hash_cache(models)
    assert cache.path.parent == home / "renderfarm" / "hashes"
    assert cache.model_sha256(models / "ckpt.safetensors")
    assert cache.path.is_file() and not (models / ".hashes.json").exists()
    hash_cache.cache_clear()
