"""Read an offline wandb run file (``<run>/wandb/offline-run-*/run-<id>.wandb``) without syncing it.

The file is wandb's record log: a 7-byte header (``:W&B``, magic, version) then 32 KiB blocks of chunks, each with a
7-byte header (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST) as in LevelDB's log format; every record is
a ``wandb_internal_pb2.Record`` protobuf. ``summarise_run`` gives what a test or a report needs: run group, tags,
name, config keys and the history metric keys.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """All protobuf ``Record``s of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (no ':W&B' header)")
    pos, pending, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            payloads = [chunk]
        elif kind == _FIRST:
            pending, payloads = chunk, []
        elif kind == _MIDDLE:
            pending, payloads = pending + chunk, []
        elif kind == _LAST:
            payloads, pending = [pending + chunk], b""
        else:  # zero padding at the end of a block
            pos += left - _HEADER - length if left > _HEADER + length else 0
            continue
        for payload in payloads:
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(payload)
            records.append(record)
    return records


def summarise_run(path: str | Path) -> dict[str, Any]:
    """``{"name", "group", "tags", "job_type", "config": {key: value}, "history_keys": set, "history_rows": int}``."""
    out: dict[str, Any] = {"config": {}, "history_keys": set(), "history_rows": 0}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, tags=list(run.tags), job_type=run.job_type)
            for item in run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out["history_rows"] += 1
            out["history_keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return out
