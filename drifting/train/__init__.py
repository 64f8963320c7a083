"""Training infrastructure shared by the trainers: LR schedule, EMA, checkpoints, distribution, wrapping, logging."""
