"""Training: its settings, the trainer and its final validation, losses, trainer classes and `desam_train`."""
