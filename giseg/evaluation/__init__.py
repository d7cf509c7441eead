"""Evaluation: metrics, validation during training, scoring, tuning, run comparison, figures."""
