"""The RL loop and its services: config, checkpoints, tracking, validation metrics, plots, evaluation."""
