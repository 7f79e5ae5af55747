"""Evaluation drivers and benchmark metrics (not installed; tests and scripts put the repo root on sys.path)."""
