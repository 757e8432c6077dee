"""Serve KaLM-Embedding v2 online (Ray Serve) and offline (Ray Data) with one encoder core."""

from .encoder import Encoder

__all__ = ["Encoder"]
