"""`vaelab-train --help`: vaelab's own text, not Hydra's generic one. The groups a user picks and their options
are read from conf/ (the default first), leaving out the parts other configs build on; Hydra's own options stay
behind --hydra-help. Hydra renders it from `hydra.help.template` (conf/hydra/default.yaml: ${vaelab_help:})."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from vaelab.cli.config import CONF_DIR

# folders of conf/ that are not a user's choice, and options that only other options build on
NOT_PICKED = {"hydra", "paths"}
BASES = {"data": {"common", "synthetic"}}
EXAMPLES = [
    ("vaelab-train model=deep prior=vamp trainer.max_epochs=50", "one run: the deep VAE with a VampPrior"),
    ("vaelab-train -m experiment=compare seed=1,2,3", "a sweep: 4 models x 3 seeds, then vaelab-report"),
    ("vaelab-train resume=auto", "continue this command's newest unfinished run"),
]


def groups() -> dict[str, list[str]]:
    """{group: its options, the default first} for every group a user picks."""
    conf = Path(CONF_DIR)
    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(conf / "train.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    out = {}
    for folder in sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in NOT_PICKED):
        options = sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in BASES.get(folder.name, ()))
        first = defaults.get(folder.name)
        out[folder.name] = [first, *(o for o in options if o != first)] if first in options else options
    return out


def help_text() -> str:
    picked = groups()
    width = max(map(len, picked))
    lines = ["vaelab-train: train, test and compare VAEs on images, each run tracked (W&B, CSV, TensorBoard).", "",
             "Pick a part with group=option (the default first; the optional groups have none):"]
    lines += [f"  {name:<{width}}  {', '.join(options)}" for name, options in picked.items()]
    lines += ["", "Set any key as well (key=value), e.g. trainer.max_epochs=50 optim.lr=1e-3 data.subset=2000;",
              "vaelab-train --cfg job prints the whole composed config.", "", "Examples:"]
    cmd_width = max(len(cmd) for cmd, _ in EXAMPLES)
    lines += [f"  {cmd:<{cmd_width}}  # {what}" for cmd, what in EXAMPLES]
    lines += ["", "README.md says more; --hydra-help shows Hydra's own options."]
    return "\n".join(lines)


OmegaConf.register_new_resolver("vaelab_help", help_text, replace=True)
