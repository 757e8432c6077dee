"""Operator scripts, run from the repository root: ``python -m scripts.gpu_check``; the shell scripts directly."""
