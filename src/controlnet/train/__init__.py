"""ControlNet training: typed config, trainer, checkpoints, validation, report, demo (paper Sec. 3.3, Sec. 4)."""
