"""Evaluation: sample-quality metrics and two-sample distances."""
