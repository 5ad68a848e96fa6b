"""hparams_search=optuna's sweeper: Hydra's Optuna sweeper (hydra-optuna-sweeper) with its study kept where the
sweep is (Hydra takes sweepers only from the hydra_plugins package). The storage is SQLite in the sweep directory
(conf/hparams_search/optuna.yaml), so a study can be inspected (optuna.load_study) and continued: the same
command in the same sweep directory runs hydra.sweeper.n_trials more trials, which the sampler chooses knowing the
earlier ones. Hydra's sweeper numbers a run's jobs from 0, so a continued study's new trials would land in its
finished trials' job directories; here they are numbered after the trials the study holds. hydra-optuna-sweeper
and optuna are imported only when this sweeper is used (Hydra imports every plugin module at start)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.plugins.sweeper import Sweeper

SQLITE = "sqlite:///"


def _quiet_sqlalchemy() -> None:
    """optuna 2.10 runs on SQLAlchemy 1.4 (pyproject pins it below 2), which warns once that optuna uses API that
    SQLAlchemy 2 removed: known, pinned, and not the user's to act on."""
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")


def trials_held(storage: str | None, study_name: str | None) -> int:
    """How many trials the stored study holds (0 without storage, or before its first run)."""
    if not storage or not study_name or (storage.startswith(SQLITE) and not Path(storage[len(SQLITE):]).is_file()):
        return 0
    _quiet_sqlalchemy()
    import optuna

    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study in it yet
        return 0


class PersistentOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's OptunaSweeper, with the same settings; its SQLite file's folder made, and a continued
    study's jobs numbered after the trials it holds."""

    def __init__(self, **kwargs) -> None:
        _quiet_sqlalchemy()
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**kwargs)

    def setup(self, **kwargs) -> None:
        self.optuna.setup(**kwargs)

    def sweep(self, arguments: list[str]) -> None:
        impl = self.optuna.sweeper
        if isinstance(impl.storage, str) and impl.storage.startswith(SQLITE):
            Path(impl.storage[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)  # the sweep's directory
        impl.job_idx = trials_held(impl.storage, impl.study_name)
        return self.optuna.sweep(arguments)
