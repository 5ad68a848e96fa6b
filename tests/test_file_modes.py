"""Files are for a team: every file vaelab writes (atomically or not) has the mode open() would give it under the
process's umask, so colleagues on shared storage can read a finished run, load its checkpoints and open its
report. mkstemp's owner-only 0600 must never leak through the atomic writes."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import TINY, run_app

from vaelab.files import atomic_write, umask, write_json


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(mask, tmp_path):
    old = os.umask(mask)
    try:
        assert umask() == mask
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_write(tmp_path / "b.bin", "wb") as f:
            f.write(b"\0")
        with open(tmp_path / "c.txt", "w") as f:  # what open() gives, for comparison
            f.write("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o666 & ~mask, "b.bin": 0o666 & ~mask, "c.txt": 0o666 & ~mask}


def test_every_file_of_a_run_and_its_report_is_readable_by_the_group(tmp_path, fashion_mnist):
    """Under umask 027 (a group-shared cluster's), a run and vaelab-report over it write nothing owner-only:
    results.json, run_state.json, metrics.csv, every checkpoint, grids, .hydra/, W&B's offline files, the report."""
    sweep = tmp_path / "sweep"
    old = os.umask(0o027)
    try:
        proc = run_app("-m", *TINY, "trainer.max_epochs=1", "seed=1", "logger=many", f"hydra.sweep.dir={sweep}",
                       "extras.print_config=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = run_app(str(sweep), "--no-gmm", module="vaelab.cli.report")
        assert report.returncode == 0, report.stderr[-3000:]
    finally:
        os.umask(old)
    files = [p for p in sweep.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"results.json", "metrics.csv", "last.ckpt", "config.yaml", "report.html", "report.csv"} <= names, names
    wrong = {str(p.relative_to(sweep)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o640}
    assert not wrong, wrong
