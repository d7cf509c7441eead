"""Training: configuration, run folder and identity, checkpoints, signals, losses, EMA, trackers, cards, CV."""
