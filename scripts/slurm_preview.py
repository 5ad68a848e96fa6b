"""Print the sbatch script that `vaelab-train -m hydra/launcher=slurm ...` would submit, without SLURM.

    python scripts/slurm_preview.py hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=4 \
        hydra.launcher.partition=gpu trainer=ddp trainer.num_nodes=2 trainer.devices=4

It composes the same config as the app and hands the launcher's settings to submitit (the library the
launcher submits with) split the way hydra-submitit-launcher splits them, so the script is the one SLURM
would get; its srun line runs submitit's pickled call of the app with those overrides.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import submitit
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from vaelab.cli.config import CONF_DIR


def shutil_which(name: str):
    import shutil

    return shutil.which(name)


def sbatch_script(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    params = {k: launcher[k] for k in launcher if k not in ("_target_", "submitit_folder")}  # resolved
    folder = launcher.submitit_folder
    path = os.environ.get("PATH", "")
    if not shutil_which("srun"):  # submitit refuses a SLURM executor without srun; we only render the script,
        stub_dir = tempfile.mkdtemp(prefix="vaelab-srun-")  # so a placeholder that is never run will do
        stub = Path(stub_dir) / "srun"
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
        os.environ["PATH"] = f"{stub_dir}{os.pathsep}{path}"
    try:
        # the same split of settings as hydra_submitit_launcher's launch(): init keys, shared keys, slurm_ keys
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        slurm = executor._executor
        # the job runs submitit's pickled call of the app with these overrides, as the launcher submits it
        return slurm._make_submission_file_text(slurm._submitit_command_str, "%j")
    finally:  # the placeholder srun must not outlive the preview: Lightning would take this process for a SLURM node
        os.environ["PATH"] = path


if __name__ == "__main__":
    print(sbatch_script(sys.argv[1:]))
