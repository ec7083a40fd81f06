"""A run's folder, identity, checkpoints and metrics log."""
