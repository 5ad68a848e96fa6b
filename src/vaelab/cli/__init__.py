"""The command-line apps: vaelab-train (train.py), vaelab-eval (eval.py), vaelab-sample (sample.py) and
vaelab-report (report.py); the config side they share (config.py: conf/'s location, validation, building from
configs), run directories (rundirs.py) and the Hydra callback that guards them (guard.py). Only this layer
knows Hydra; no app imports another."""
