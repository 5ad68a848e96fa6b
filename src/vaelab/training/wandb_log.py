"""W&B's own local log of a run (`run-<id>.wandb`, what `wandb sync` uploads), read back: how many history rows it
holds. A checkpoint waits until W&B has written every row logged before it (training/log_rows.py), and a resumed
run counts the rows its W&B run already holds, so that each row is in its history once.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
records, each with a 7-byte header (crc32c, length, type: full / first / middle / last) around one serialised
`wandb_internal_pb2.Record`. wandb-core writes it from a buffer, every `x_transaction_log_flush_interval` seconds,
and drops the buffer when the process that started it is killed (tested in tests/test_kill_anywhere.py)."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path, start: int = 0) -> tuple[list, int]:
    """The whole records of a W&B log from byte `start` (0, or an offset this returned before), and the offset
    after the last whole one: a record still being written is left for the next read."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if start == 0:
        if len(data) < HEADER:
            return [], 0
        ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
        if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
            raise ValueError(f"{path} is not a W&B log")
        start = HEADER
    records, pos, done, pending = [], start, start, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # cut short: still being written
            break
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FIRST, MIDDLE):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending, done = b"", pos
    return records, done


def is_history(record) -> bool:
    return record.WhichOneof("record_type") == "history"


class HistoryCount:
    """The number of history rows in one W&B log, read on from where the last count stopped."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows, self._offset = Path(path), 0, 0

    def count(self) -> int:
        if self.path.is_file():
            records, self._offset = read_records(self.path, self._offset)
            self.rows += sum(map(is_history, records))
        return self.rows


def rows_in_logs(wandb_dir: Path, run_id: str, but: Path | None = None) -> int:
    """History rows of run `run_id` in every local log under `wandb_dir` (one per start of the run), but `but`."""
    total = 0
    for log in sorted(Path(wandb_dir).glob(f"*-{run_id}/run-{run_id}.wandb")):
        if but is None or log.resolve() != Path(but).resolve():
            total += HistoryCount(log).count()
    return total
