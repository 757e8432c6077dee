"""The encoder core: model files, tokenisation, the transformer, pooling; no Ray, no HTTP."""
