"""An append-only JSON-lines store that survives a kill mid-write."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_brain.errors import BadInputError
from llava_brain.io.files import _json_default, remove_stale_temps, write_text


class JsonlStore:
    """Append-only JSON-lines file that survives a kill mid-write.

    Each record is written as one `json.dumps(...) + "\\n"` and flushed, so the only damage a
    kill can do is a torn *last* line (no trailing newline). Opening the store drops such a line
    (truncating the file back to the last complete record) instead of failing; a malformed line
    anywhere else is real corruption and raises BadInputError naming the file and line.
    Appends are thread-safe.
    """

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._records: list[Any] = []
        self.dropped_torn_line = False
        self._load()

    def _load(self) -> None:
        remove_stale_temps(self.path)  # a compaction killed mid-write leaves one behind
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if complete_end < len(data):
            # A torn final record: cut it off so the next append starts on a clean line.
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
            self.dropped_torn_line = True
        for lineno, line in enumerate(data[:complete_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                self._records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BadInputError(self.path, f"line {lineno} is not valid JSON ({err.msg})") from None

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._records))

    @property
    def records(self) -> list[Any]:
        return list(self._records)

    def append(self, record: Any) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            self._records.append(json.loads(line))

    def compact(self, key=None) -> None:
        """Rewrite the file atomically, sorted by `key` (deterministic order after concurrent appends)."""
        with self._lock:
            records = sorted(self._records, key=key) if key else list(self._records)
            text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
            write_text(self.path, text)
            self._records = records
