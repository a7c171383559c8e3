"""Training: TrainConfig, schedules, engines, checkpoints, metrics and the Trainer."""
