"""Calibration, initialization, start-up, the training loop and its plan."""
