"""The local JSONL log a tracker falls back to when the MLflow store cannot be reached.

One JSON object per line, appended and flushed as it happens, so a crash loses at most the line being
written. Record types, in the order a run produces them:

    {"type": "start", "experiment", "run_name", "run_id" (null if the store never saw the run),
     "params": {dotted key: str}, "tags": {str: str}, "tracking_uri", "timestamp"}
    {"type": "params", "params": {...}}
    {"type": "metrics", "step": int, "timestamp": ms, "metrics": {name: float}}
    {"type": "artifact", "path": absolute local path, "artifact_path": str | null}
    {"type": "end", "status": "FINISHED" | "FAILED" | "KILLED", "timestamp": ms}

A file may hold several runs, each opened by its own "start" record, and may grow after it was
imported (training went on offline, or a resumed training lost the store again): the replay
remembers how many lines it imported and continues from there.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

RECORD_TYPES = ("start", "params", "metrics", "artifact", "end")


class OfflineLog:
    """Appends records to a JSONL file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()

    def append(self, record: dict) -> None:
        if record.get("type") not in RECORD_TYPES:
            raise ValueError(f"offline record type {record.get('type')!r} is not one of {RECORD_TYPES}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut short by a killed writer must not swallow this record
                f.seek(-1, os.SEEK_END)
                prefix = b"" if f.read(1) == b"\n" else b"\n"
            else:
                prefix = b""
            f.write(prefix + (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            f.flush()


def read_records(path: str | os.PathLike, first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from `first_line` on. A line that is not a complete record (a
    writer killed mid-line) is skipped with a warning: the numbers of the other lines still count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"offline tracking log {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number < first_line or not line.strip():
                continue
            if not line.endswith("\n"):  # being written right now, or cut short: read it next time
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                warnings.warn(f"{path}:{number}: skipping a damaged line ({exc.msg}): {line[:60]!r}", stacklevel=2)
                continue
            if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES:
                warnings.warn(f"{path}:{number}: skipping a line that is not a tracking record: {line[:60]!r}",
                              stacklevel=2)
                continue
            yield number, record
