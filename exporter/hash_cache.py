"""sha256 of engine files, remembered per file identity so that verifying an engine on every open is cheap.

A result is keyed by (device, inode, size, mtime, ctime) of the file: any write to the file changes its ctime,
which no user-level call can set back, so an edited file (even one of the same size with its mtime restored) is
hashed again. The cache is a small JSON file in `$PKV_EXPORT_CACHE_DIR` (default `$XDG_CACHE_HOME/pkv-export`
or `~/.cache/pkv-export`); if it cannot be written, files are simply hashed every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

MAX_ENTRIES = 4096


def cache_dir() -> Path:
    if os.environ.get("PKV_EXPORT_CACHE_DIR"):
        return Path(os.environ["PKV_EXPORT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pkv-export"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    def __init__(self, directory: Path | None = None):
        self.path = (directory or cache_dir()) / "sha256.json"
        self._entries: dict[str, str] | None = None
        self._dirty = False

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when the file is provably unchanged since it was hashed."""
        key = _key(os.stat(path))
        entries = self._load()
        if key in entries:
            return entries[key]
        digest = sha256_file(path)
        self.remember(path, digest, key)
        return digest

    def remember(self, path: Path, digest: str, key: str | None = None) -> None:
        """Record a digest computed elsewhere (the build hashes what it writes)."""
        entries = self._load()
        entries[key or _key(os.stat(path))] = digest
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; a cache that cannot be written is not an error."""
        if not self._dirty or self._entries is None:
            return
        entries = dict(list(self._entries.items())[-MAX_ENTRIES:])
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(entries))
            tmp.replace(self.path)
        self._dirty = False
