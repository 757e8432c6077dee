"""Batching: token-budget planning and stats (no torch), tensor layouts, the replica scheduler."""
