"""The service's one configuration object.

Every field can be set under ``applications[].args`` in the Serve YAML
(``cluster/config.yaml``); the defaults below are what an unset field means.
Deployment-level settings (replica counts, autoscaling, resources) live in the same
YAML under ``deployments:``, as Ray Serve defines them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import environment

#: How token-id inputs are read (``serve_app.api.token_ids``).
TokenIdInputs = Literal["openai", "model", "reject"]

#: The Serve deployment of the first (or only) model's encoder replicas: users' Serve YAML,
#: dashboards and logs refer to it. The n-th model's is KalmEncoder<n> unless it names its own.
FIRST_ENCODER_DEPLOYMENT = "KalmEncoder"


class ModelConfig(BaseModel):
    """One of several served models (``models:``). A field left out takes the service's top-level
    value of the same name (ServiceConfig documents each)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hub id or local directory; ${VAR} is replaced by the environment variable VAR.")
    served_model_name: str | None = None
    model_aliases: list[str] | None = None
    trust_remote_code: bool | None = None
    device: str | None = None
    dtype: str | None = None
    encoder_num_cpus: float | None = None
    encoder_num_gpus: float | None = Field(None, gt=0, le=1)
    max_input_tokens: int | None = Field(None, gt=0)
    default_query_instruction: str | None = None
    calibration_ranges: str | None = None  # ranges belong to the model: each its own file
    max_batch_tokens: int | None = Field(None, gt=0)
    interactive_batch_tokens: int | None = Field(None, gt=0)
    encoder_deployment: str | None = None

    @field_validator("model")
    @classmethod
    def _expand_environment(cls, v: str) -> str:
        expanded = os.path.expandvars(v)
        unset = re.search(r"\$\{?(\w+)", expanded)
        if unset:
            raise ValueError(f"model {v!r} names the environment variable {unset.group(1)}, which is not set")
        return expanded


class ServiceConfig(BaseModel):
    """What the embeddings service serves and the limits it enforces."""

    model_config = ConfigDict(extra="forbid")

    # --- which model ------------------------------------------------------------------
    model: str = Field(
        default_factory=environment.model,
        description="Hub id or local directory. The KALM_MODEL environment variable overrides the default.",
    )
    served_model_name: str | None = Field(
        None,
        description="Model id clients send and /v1/models lists; default: the hub id, or the "
        "directory name for a local path.",
    )
    model_aliases: list[str] = Field(default_factory=list, description="Other ids accepted in requests.")
    calibration_ranges: str | None = Field(
        None,
        description="Path (where the ingress runs) of a calibration file: the per-dimension ranges int8 / uint8 "
        "embeddings need, as the corpus job writes them (_calibration.json beside its output, from a sample of "
        "the corpus, with --embedding-types int8 or uint8). None: int8 / uint8 requests get a 400 saying so; "
        "float and binary need none (docs/api.md).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own Python code. Off: "
        "KaLM v2 is built from stock transformers modules.",
    )
    encoder_deployment: str = Field(
        FIRST_ENCODER_DEPLOYMENT,
        description="Serve deployment name of the model's encoder replicas (the name `deployments:` entries use).",
    )
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="Several models behind the one ingress, each with its own encoder deployment (own "
        "replicas, autoscaling and placement), chosen by the request's `model`; fields an entry leaves out "
        "come from the top level. Empty: the one model the top-level fields describe (docs/migrating-models.md).",
    )

    engine: Literal["model", "null"] = Field(
        "model",
        description="model: the encoder replicas load the model and batch. null: no model is loaded and every "
        "input gets the same unit vector of the model's width at once, to measure the served path around the "
        "model (docs/benchmark.md, host path); never for real traffic.",
    )

    # --- where it runs ----------------------------------------------------------------
    device: str = Field("auto", description="auto (CUDA when the replica has a GPU), cpu or cuda.")
    dtype: str = Field(
        "auto",
        description="auto (bf16 on CUDA and on CPUs with bf16 in hardware, AVX512-BF16 "
        "or AMX; else fp32; the KALM_DTYPE environment variable overrides), float32, bfloat16 "
        "or float16.",
    )
    encoder_num_cpus: float | None = Field(
        None,
        description="CPUs each encoder replica reserves on CPU-only clusters (torch uses that many "
        "threads); default: all CPUs of a node, at most 8. On GPU clusters a replica takes "
        "encoder_num_gpus GPUs and 1 CPU.",
    )
    encoder_num_gpus: float = Field(
        1.0,
        gt=0,
        le=1,
        description="GPUs each encoder replica reserves on GPU clusters. A fraction puts several "
        "replicas, each with its own copy of the model (~1 GB in bf16) and batching loop, on one "
        "GPU (0.5: two per GPU), so one's host work overlaps the other's GPU work; unmeasured "
        "(docs/gpu.md). The service starts with GPUs / encoder_num_gpus replicas (serve_app/placement.py).",
    )

    # --- request limits (checked in the ingress, before any model work) ---------------
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body; larger gets 413.")
    max_inputs_per_request: int = Field(2048, gt=0, description="Most items in `input` (OpenAI's limit).")
    max_input_tokens: int | None = Field(
        None,
        gt=0,
        description="Most tokens per input; default and ceiling: the model's own limit "
        "(32,768 for KaLM v2). Longer inputs fail with 400 unless the request sets truncate.",
    )
    max_request_tokens: int = Field(
        300_000, gt=0, description="Most tokens in one request, all inputs together (OpenAI's limit)."
    )
    default_query_instruction: str | None = Field(
        None,
        description="Instruction for input_type=query; default: the model's `query` prompt "
        "(KaLM: 'Given a query, retrieve documents that answer the query').",
    )
    token_id_inputs: TokenIdInputs = Field(
        "openai",
        description="How token-id inputs are read: openai (ids of OpenAI's cl100k_base, as OpenAI's "
        "endpoint reads them and LangChain sends them: decoded, then tokenised by the model's tokenizer), "
        "model (this model's own ids, as vLLM reads them) or reject (400).",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="A request not answered by then fails with 504.")
    body_read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A client that has not sent its whole body by then gets 408 (slow uploads must not hold "
        "ingress slots; 32 MiB at ~5 Mbit/s fits).",
    )
    max_header_bytes: int = Field(
        16384, gt=0, description="Largest total size of a request's headers (names and values); larger gets 431."
    )
    max_concurrent_large_requests: int = Field(
        2,
        gt=0,
        description="Requests with a body over 1 MiB that one ingress reads, parses and tokenises at once; others "
        "wait their turn. Bounds ingress memory and keeps CPU for small requests (docs/limits.md).",
    )

    # --- batching and scheduling in the encoder replicas ------------------------------
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget of one forward pass; default 512 on CPU (texts packed end to end, no "
        "padding; a bigger budget makes queries wait longer and gains no throughput there: "
        "docs/measurements/2026-11-30-engine-cpu.md), 16384 on CUDA "
        "(packed too; models other than Qwen2 pad: longest length x rows).",
    )
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        description="How long a batch below its budget may wait for more work (from its oldest input's arrival).",
    )
    max_padding_fraction: float = Field(
        0.15,
        ge=0,
        le=1,
        description="A padded batch (models other than Qwen2) takes no input "
        "that would make more than this share of its computed tokens padding.",
    )
    max_chunk_tokens: int = Field(
        8192, gt=0, description="Large requests are cut into chunks of about this many tokens, spread over replicas."
    )
    priority_scheduling: bool = Field(
        True, description="Let interactive requests overtake bulk work (with ageing). Off: first come, first served."
    )
    interactive_max_tokens: int = Field(
        128,
        ge=0,
        description="Requests with at most this many tokens in total are interactive: they "
        "overtake bulk work (a request may set priority explicitly).",
    )
    interactive_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget of a batch led by interactive requests (topped up with bulk "
        "inputs), at most max_batch_tokens; default 384 on CPU, max_batch_tokens on CUDA. Lower it where "
        "such a batch takes longer than queries may wait (fp32 CPUs: ~192), at some cost in throughput "
        "(batch times and the trade: docs/measurements/2026-11-27-priority-scheduling.md).",
    )
    interactive_max_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Interactive work goes first only while it has used less than this "
        "share of a replica's recent compute time, so bulk work is never starved.",
    )
    max_queued_tokens_per_replica: int = Field(
        2_000_000, gt=0, description="Tokens a replica holds queued before it refuses more (503 + Retry-After)."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        return v

    @model_validator(mode="after")
    def _check_model_ids(self) -> ServiceConfig:
        seen: dict[str, str] = {}
        for served in self.served_models():
            for model_id in served.accepted_model_ids:
                if seen.setdefault(model_id, served.model) != served.model:
                    raise ValueError(f"model id {model_id!r} names both {seen[model_id]!r} and {served.model!r}")
        return self

    def served_models(self) -> list[ServiceConfig]:
        """Each served model as a single-model config (what its encoder replicas and its requests use):
        this config itself when ``models`` is empty, else each entry over the top-level fields."""
        if not self.models:
            return [self]
        return [
            self.model_copy(
                update={
                    "encoder_deployment": FIRST_ENCODER_DEPLOYMENT if n == 1 else f"{FIRST_ENCODER_DEPLOYMENT}{n}",
                    **entry.model_dump(exclude_unset=True, exclude_none=True),
                    "models": [],
                }
            )
            for n, entry in enumerate(self.models, start=1)
        ]

    @property
    def vector_revision(self) -> str:
        """A short name for what decides this model's vectors (source, dtype, engine): replicas of two
        deployed versions differ in it, so a request never joins vectors of both (serve/dispatch.py)."""
        made_by = json.dumps([self.model, self.dtype, self.engine, self.trust_remote_code]).encode()
        return hashlib.sha256(made_by).hexdigest()[:12]

    @property
    def model_id(self) -> str:
        """The id clients use for this model."""
        if self.served_model_name:
            return self.served_model_name
        path = os.path.expanduser(self.model)
        return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else self.model

    @property
    def accepted_model_ids(self) -> set[str]:
        return {self.model_id, self.model, *self.model_aliases}
