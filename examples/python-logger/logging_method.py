"""The `writer` resource of the `logging-method` interface (componentize-py looks for
resource classes in a module named after their interface)."""

import json
import os
import struct

from componentize_py_types import Err
from wit_world.imports import types


def events(batch: bytes):
    """Decode an `event-batch` (layout in wit/types.wit): little-endian integers,
    strings with a u32 length prefix. Yields (seq, timestamp_ms, step, message, data)."""
    at = 0

    def u32():
        nonlocal at
        (v,) = struct.unpack_from("<I", batch, at)
        at += 4
        return v

    def text():
        nonlocal at
        n = u32()
        s = batch[at:at + n].decode("utf-8")
        at += n
        return s

    for _ in range(u32()):
        seq, ts = struct.unpack_from("<Qq", batch, at)
        at += 16
        step = text()
        message = text()
        data = {}
        for _ in range(u32()):
            k = text()
            data[k] = text()
        yield seq, ts, step, message, data


def safe_name(part: str) -> str:
    """A metadata value as one path component (the default browser refuses others)."""
    if not part or part in (".", "..") or any(c in part for c in "/\\\0"):
        raise Err(types.Error_Permanent(f"`{part}` cannot be used as a file name"))
    return part


class Writer:
    """One run's log in the default file store's layout, so the default `file-browser`
    reads it (as it reads the Rust `jsonl-logger` example's):

        <directory>/<job-id>/<loggable-id>.jsonl   one event per line, in seq order
        <directory>/<job-id>/<loggable-id>.count   the final event count, at close
    """

    def __init__(self, directory: str, meta: types.LogMetadata):
        self.meta = meta
        folder = os.path.join(directory, safe_name(meta.job_id))
        run = safe_name(meta.loggable_id)
        self.path = os.path.join(folder, f"{run}.jsonl")
        self.count_path = os.path.join(folder, f"{run}.count")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise Err(types.Error_Retryable(f"cannot create {folder}: {e}"))
        # Resume after the highest seq already stored (a resent batch writes nothing twice).
        self.last = 0
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                for line in f:
                    try:
                        self.last = max(self.last, json.loads(line).get("seq", 0))
                    except ValueError:
                        pass  # a line cut short by a crash: it is written again
        except FileNotFoundError:
            pass

    def write(self, batch: bytes) -> None:
        lines = []
        for seq, ts, step, message, data in events(batch):
            if seq <= self.last:
                continue
            if seq != self.last + 1:
                raise Err(types.Error_Permanent(
                    f"gap in the log: expected seq {self.last + 1}, got {seq}"))
            lines.append(json.dumps({
                "id": f"{self.meta.loggable_id}:{seq}",
                "seq": seq,
                "message": message,
                "timestamp": ts,
                "data": data,
                "instance_id": self.meta.instance_id,
                "loggable_type": self.meta.loggable_type,
                "loggable_id": self.meta.loggable_id,
                "job_id": self.meta.job_id,
                "step_id": step,
            }))
            self.last = seq
        if not lines:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        except OSError as e:
            raise Err(types.Error_Retryable(f"cannot append to {self.path}: {e}"))

    def flush(self) -> None:
        pass

    def close(self, final_count: int) -> None:
        if final_count != self.last:
            raise Err(types.Error_Permanent(
                f"closing with {final_count} events but {self.last} are stored"))
        # Written aside and renamed, so a browser never reads half a count.
        try:
            with open(self.count_path + ".tmp", "w", encoding="utf-8") as f:
                f.write(str(final_count))
            os.replace(self.count_path + ".tmp", self.count_path)
        except OSError as e:
            raise Err(types.Error_Retryable(f"cannot record the final count: {e}"))
