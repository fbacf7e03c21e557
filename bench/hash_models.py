"""What model hashing costs a worker: the first SHA-256 of a checkpoint, then the cached look-up.

    .venv/bin/python bench/hash_models.py --size-mib 2048 --runs 3

Writes a file of random bytes of ``--size-mib`` MiB (an SD 1.5 fp16 checkpoint is ~2 GiB, an
SDXL one ~6.5 GiB) in a temporary models directory, then per run: hashes it with an empty
cache (worker/hashes.py: what a worker does once per file, in the background at start) and
reads it back from a fresh process's view of the cache (what every later start does). The file
was just written, so it is read from the page cache: a cold disk adds its read time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from worker.hashes import CACHE_NAME, HashCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        checkpoint = models / "model.safetensors"
        with open(checkpoint, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        first, cached = [], []
        for _ in range(args.runs):
            (models / CACHE_NAME).unlink(missing_ok=True)
            start = time.perf_counter()
            digest = HashCache(models / CACHE_NAME).model_sha256(checkpoint)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert HashCache(models / CACHE_NAME).model_sha256(checkpoint) == digest
            cached.append(time.perf_counter() - start)
        median = statistics.median(first)
        print(f"{args.size_mib} MiB: first hash median {median:.2f} s "
              f"({args.size_mib / median:.0f} MiB/s; runs {', '.join(f'{t:.2f}' for t in first)})"
              f"; cached look-up median {statistics.median(cached) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
