"""A job's share of the machine when Hydra's joblib launcher runs a sweep's jobs side by side (use_job_share: its GPU
and its share of the cores). The stacked launcher's plan is vaelab.stacking.plan; its work, Hydra's side of it,
is hydra_plugins/vaelab_stacked_launcher."""

from __future__ import annotations

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from vaelab.devices import cpu_cores, job_share, on_gpu


def parallel_jobs() -> int:
    """How many jobs of this process's sweep run at once: hydra/launcher=joblib's n_jobs (-1: one per core), else
    1 (Hydra's basic launcher runs one after another; the stacked launcher sets its members' threads itself)."""
    if not HydraConfig.initialized():
        return 1
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "Joblib" not in str(hydra_cfg.launcher.get("_target_", "")):
        return 1
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or -1)
    return cpu_cores() if n_jobs < 0 else n_jobs


def use_job_share(cfg) -> None:
    """Under hydra/launcher=joblib: give this job its GPU (trainer.devices=[i mod G], for a one-device job whose
    devices the command line did not name) and its share of the cores as torch threads."""
    parallel = parallel_jobs()
    if parallel <= 1:
        return
    gpus = torch.cuda.device_count() if on_gpu(str(cfg.trainer.get("accelerator", "auto"))) else 0
    gpu, threads = job_share(int(HydraConfig.get().job.num), parallel, cpu_cores(), gpus)
    torch.set_num_threads(threads)
    if gpu is not None and str(cfg.trainer.get("devices", 1)) == "1":
        with open_dict(cfg):
            cfg.trainer.devices = [gpu]
