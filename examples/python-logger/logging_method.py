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


class Writer:
    def __init__(self, directory: str, meta: types.LogMetadata):
        self.meta = meta
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in meta.loggable_id)
        self.path = os.path.join(directory, f"{safe}.jsonl")
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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"closed": True, "final_count": final_count}) + "\n")
        except OSError as e:
            raise Err(types.Error_Retryable(f"cannot close {self.path}: {e}"))
