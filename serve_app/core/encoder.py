"""The encoder core: token ids → embeddings, knowing nothing of Ray or HTTP.

    from serve_app import Encoder
    enc = Encoder.from_pretrained("HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2")
    enc.encode(["what is ray serve?"], instruction="Given a query, retrieve documents that answer the query")

The service's replicas, the corpus job and notebooks all use this class, so the
same text gives the same vector everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..batching.layout import pack_batch, pad_batch, unpack_hidden
from ..batching.planning import BatchStats, plan_batches
from .backbone import load_backbone
from .checkpoint import ModelFiles, read_model_files
from .device import dtype_name, parse_dtype, resolve_device, to_device
from .packed_attention import PackedSpans, packed_kernel
from .pooling import pool
from .qwen2 import BidirectionalQwen2
from .steps import Steps, run_steps
from .tokenization import TextTokenizer
from .vectors import check_dimensions, l2_normalize, truncate_dimensions

log = logging.getLogger(__name__)

#: Default token budget per forward pass (computed tokens: padding included where batches are padded).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 512, "cuda": 16384}


class Encoder:
    """Embeds texts or token ids with one model on one device."""

    def __init__(
        self,
        files: ModelFiles,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
    ):
        self.files = files
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS[device.type]
        self.dimensions = files.hidden_size
        # Packed batches (no padding): on CPU attention runs text by text, which costs nothing
        # extra; on CUDA one variable-length kernel takes the whole row (core.packed_attention).
        self.packed_kernel = packed_kernel(device, dtype) if isinstance(model, BidirectionalQwen2) else None
        self.packed = isinstance(model, BidirectionalQwen2) and (device.type == "cpu" or self.packed_kernel is not None)
        # A forward pass stops between layers for waiting queries. On CPU a layer of one long text
        # takes seconds (32k tokens), so there it also stops within layers, after each piece of
        # about one batch budget's work; on a GPU a layer takes milliseconds.
        self.step_tokens = self.max_batch_tokens if device.type == "cpu" else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        max_input_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        trust_remote_code: bool = False,
    ) -> Encoder:
        """Load a hub id or a local directory (sentence-transformers or bare transformers layout)."""
        started = time.perf_counter()
        files = read_model_files(name_or_path)
        device = resolve_device(device)
        torch_dtype = parse_dtype(dtype, device)
        model = load_backbone(files, device, torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = TextTokenizer(files, max_input_tokens)
        if files.is_standin:
            log.warning("%s is a stand-in checkpoint with RANDOM weights, not the real model", files.path)
        log.info(
            "model loaded: source=%s device=%s dtype=%s pooling=%s normalize=%s max_input_tokens=%d seconds=%.2f",
            files.path,
            device,
            dtype_name(torch_dtype),
            files.pooling,
            files.normalize,
            tokenizer.max_input_tokens,
            time.perf_counter() - started,
        )
        return cls(files, model, tokenizer, device, torch_dtype, max_batch_tokens)

    # --- the public API ----------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        instruction: str | None = None,
        dimensions: int | None = None,
        *,
        prompt_name: str | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """Embed texts: float32 array [n, dimensions or native size].

        ``instruction`` formats each text as KaLM's query (``Instruct: {instruction} \\n
        Query: {text}``); ``prompt_name`` picks a prompt the model ships (``query``,
        ``document``). Inputs over the token limit raise unless ``truncate`` is set;
        ``dimensions`` outside 1..the model's size raise ``InvalidRequestError`` (HTTP answers 400).
        """
        if isinstance(texts, str):
            texts = [texts]
        check_dimensions(dimensions, self.dimensions)
        prompt = self.tokenizer.prompt_for(instruction, prompt_name)
        tokenized = self.tokenizer.encode_texts(texts, prompt=prompt, truncate=truncate)
        return truncate_dimensions(self.embed_token_ids([t.ids for t in tokenized]), dimensions)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed already tokenised inputs at native size, batched under the token budget."""
        out = np.empty((len(token_ids), self.dimensions), dtype=np.float32)
        lengths = [len(ids) for ids in token_ids]
        for batch in plan_batches(lengths, self.max_batch_tokens, self.packed):
            vectors, _ = self.forward_batch([token_ids[i] for i in batch])
            out[batch] = vectors
        return out

    # --- one forward pass --------------------------------------------------------------

    def start_batch(self, token_ids: Sequence[Sequence[int]]) -> BatchRun:
        """A forward pass over ``token_ids`` as one batch, run with ``BatchRun.run``."""
        return BatchRun(self, token_ids)

    def forward_batch(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, BatchStats]:
        """One forward pass over ``token_ids`` as a single batch, start to end."""
        run = self.start_batch(token_ids)
        run.run()
        return run.result()

    def warm_up(self) -> float:
        """Run one small batch so the first real request does not pay for lazy init."""
        started = time.perf_counter()
        self.forward_batch([[self.tokenizer.pad_token_id] * 8] * 2)
        seconds = time.perf_counter() - started
        log.info("warm-up done in %.2fs", seconds)
        return seconds


class BatchRun:
    """One forward pass that can stop between steps and go on later.

    ``run(should_yield)`` advances step by step (layers, and pieces of long layers on CPU:
    ``Encoder.step_tokens``) and returns False as soon as ``should_yield()`` is true (the
    work done so far stays here), True once done. Backbones that cannot be stepped (AutoModel
    encoders) run in one piece. Stepped or not, the same pieces are computed: the same vectors.
    """

    def __init__(self, encoder: Encoder, token_ids: Sequence[Sequence[int]]):
        self.encoder = encoder
        self.rows = len(token_ids)
        self.tokens = sum(len(ids) for ids in token_ids)
        self.inputs: dict[str, Any]  # the backbone's keyword arguments: tensors, and spans when packed
        if encoder.packed:
            input_ids, spans = pack_batch(token_ids)
            kernel = encoder.packed_kernel  # CUDA: the spans with what the packed kernel needs, on the device
            packing = spans if kernel is None else PackedSpans(spans, encoder.device, kernel)
            self.inputs = {"input_ids": to_device(input_ids, encoder.device), "spans": packing}
            self.computed_tokens = self.tokens
        else:
            input_ids, attention_mask = pad_batch(token_ids, encoder.tokenizer.pad_token_id)
            self.inputs = {
                "input_ids": to_device(input_ids, encoder.device),
                "attention_mask": to_device(attention_mask, encoder.device),
            }
            self.computed_tokens = input_ids.numel()
        self.compute_s = 0.0
        self._steps: Steps[torch.Tensor] | None = None
        self._vectors: np.ndarray | None = None

    @torch.inference_mode()
    def run(self, should_yield=None) -> bool:
        started = time.perf_counter()
        try:
            model = self.encoder.model
            if not isinstance(model, BidirectionalQwen2):  # others run in one piece
                hidden = model(**self.inputs)
            else:
                if self._steps is None:
                    self._steps = model.forward_steps(**self.inputs, step_tokens=self.encoder.step_tokens)
                done, hidden = run_steps(self._steps, should_yield)
                if not done:
                    return False
                self._steps = None
            if "spans" in self.inputs:
                hidden, attention_mask = unpack_hidden(hidden, self.inputs["spans"])
            else:
                attention_mask = self.inputs["attention_mask"]
            vectors = pool(hidden, attention_mask, self.encoder.files.pooling).cpu().numpy()
            if self.encoder.files.normalize:
                vectors = l2_normalize(vectors)
            self._vectors = vectors.astype(np.float32, copy=False)
            return True
        finally:
            self.compute_s += time.perf_counter() - started

    def result(self) -> tuple[np.ndarray, BatchStats]:
        assert self._vectors is not None, "the batch has not finished"
        stats = BatchStats(
            rows=self.rows, tokens=self.tokens, padded_tokens=self.computed_tokens, seconds=self.compute_s
        )
        return self._vectors, stats
