"""Read a W&B run's local `.wandb` log back: the records W&B itself wrote, offline, with nothing mocked.

The file's format is said in vaelab/training/wandb_log.py, whose reader this uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from vaelab.training import wandb_log


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every whole record of a W&B log (vaelab's own reader, which checkpoints and resumes use)."""
    return wandb_log.read_records(path)[0]


def history(run_dir: Path) -> list[dict]:
    """Every history row W&B recorded, as {key: value} dicts."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for rec in read_records(log):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def _updates(run_dir: Path, kind: str) -> dict:
    """The key/value updates of every `config` or `summary` record, merged in order (the last value wins)."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    out = {}
    for rec in read_records(log):
        if rec.WhichOneof("record_type") == kind:
            for item in getattr(rec, kind).update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config(run_dir: Path) -> dict:
    return _updates(run_dir, "config")


def run_info(run_dir: Path) -> dict:
    """The run record: id, group, job_type, tags."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    for rec in read_records(log):
        if rec.WhichOneof("record_type") == "run":
            return {"id": rec.run.run_id, "group": rec.run.run_group, "job_type": rec.run.job_type,
                    "tags": list(rec.run.tags)}
    raise AssertionError(f"no run record in {log}")


def artifacts(run_dir: Path) -> list[dict]:
    (log,) = Path(run_dir).glob("run-*.wandb")
    return [{"name": rec.artifact.name, "type": rec.artifact.type,
             "files": [e.path for e in rec.artifact.manifest.contents]}
            for rec in read_records(log) if rec.WhichOneof("record_type") == "artifact"]


def metric_definitions(run_dir: Path) -> list[dict]:
    """Every define_metric W&B recorded: name or glob, step metric, summary."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    return [{"name": rec.metric.name or rec.metric.glob_name, "step_metric": rec.metric.step_metric,
             "summary": [f.name for f, v in rec.metric.summary.ListFields() if v]}
            for rec in read_records(log) if rec.WhichOneof("record_type") == "metric"]


def summary(run_dir: Path) -> dict:
    """The run summary as W&B keeps it (its summary updates, the last value of each key)."""
    return _updates(run_dir, "summary")


def table(run_dir: Path, key: str) -> dict:
    """A logged wandb.Table, from its JSON file in the run's media folder: {"columns": [...], "data": [[...]]}."""
    (path,) = (Path(run_dir) / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())
