"""Serve KaLM-Embedding v2 online (Ray Serve) and offline (Ray Data) with one encoder core."""

__all__ = ["Encoder"]


def __getattr__(name: str):
    # Lazy, so `python -m serve_app.<module>` and light imports don't pull in torch first.
    if name == "Encoder":
        from .core.encoder import Encoder

        return Encoder
    raise AttributeError(name)
