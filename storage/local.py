"""Images in a local directory; each object is one file, written atomically, first writer wins."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from storage import check_key, check_prefix

_TMP_PREFIX = ".rf-tmp-"


class LocalStorage:
    """Objects under ``root``: key ``"batch/job-0.png"`` is the file ``root/batch/job-0.png``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.describe = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def object_key(self, key: str) -> str:
        return check_key(key)

    def put(self, key: str, data: bytes, content_type: str,
            metadata: Mapping[str, str] | None = None) -> bool:
        """Write a temp file beside the target, then hard-link it into place (never overwrites).
        Files carry no ``metadata``: the job's JSON sidecar beside them holds the same."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.is_dir():
                    raise IsADirectoryError(f"storage key {key!r} is a directory of keys") from None
                return False
            return True
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def transient(self, exc: BaseException) -> bool:
        """A local disk's errors (full, read-only, permissions) do not pass by waiting."""
        return False

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return str(self._path(key))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            pass

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Walk only the directory the prefix points into, then filter by the full prefix.
        start = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def __repr__(self) -> str:
        return f"LocalStorage({self.describe!r})"
