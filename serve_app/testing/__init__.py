"""Test support shipped with the package: stand-in checkpoints (real architecture, random weights)."""
