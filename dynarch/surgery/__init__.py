"""Grow and prune channel groups in place (see grow.py, prune.py); per-layer rules in layers.py."""
