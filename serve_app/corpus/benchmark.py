"""The job against sentence-transformers: tokens/s of both on the same texts, model directory and dtype.

sentence-transformers is timed with its model loaded and warmed up, so the job's headline
figure runs from its encoders' model load to the end; the whole pipeline and the whole
call are reported beside it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import CorpusError
from .files import absolute_uri, join
from .job import embed_corpus
from .options import CorpusOptions
from .output import MANIFEST, read_json
from .parts import read_part
from .plan import Plan


def benchmark(options: CorpusOptions, st_batch_size: int = 32) -> dict[str, Any]:
    """Run the job into ``options.output`` (a folder without a job in it), then sentence-transformers'
    ``encode`` on the same texts in this process; print and return both speeds."""
    import torch
    from sentence_transformers import SentenceTransformer

    from ..core.device import dtype_name, parse_dtype, resolve_device

    out_uri = absolute_uri(options.output)
    if read_json(join(out_uri, MANIFEST)) is not None:
        raise CorpusError(f"the benchmark needs a fresh output folder; {options.output} already holds a job")
    job = embed_corpus(options)
    manifest = read_json(join(out_uri, MANIFEST))
    assert manifest is not None, "the job writes its manifest"
    plan = Plan.from_json(manifest)
    texts = [t for p in range(plan.parts) for t in read_part(plan, p).texts]

    device = resolve_device(options.device)
    # the dtype the job's encoders ran in (sentence-transformers alone would follow config.json)
    dtype = parse_dtype(job.dtypes[0] if len(job.dtypes) == 1 else options.dtype, device)
    st = SentenceTransformer(plan.settings["model"], device=str(device), model_kwargs={"dtype": dtype})
    prompt = plan.settings["prompt"] or None
    st.encode(texts[:64], prompt=prompt, batch_size=st_batch_size)  # warm-up
    started = time.perf_counter()
    st_vectors = st.encode(texts, prompt=prompt, batch_size=st_batch_size, convert_to_numpy=True)
    st_s = time.perf_counter() - started
    st_tps = job.tokens / st_s
    result: dict[str, Any] = {
        "texts": len(texts),
        "tokens": job.tokens,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "torch_threads": torch.get_num_threads(),
        "st_s": round(st_s, 3),
        "st_tokens_per_s": round(st_tps, 1),
        "st_batch_size": st_batch_size,
        "corpus_steady_s": job.steady_s,
        "corpus_pipeline_s": job.pipeline_s,
        "corpus_wall_s": job.wall_s,
        "corpus_tokens_per_s_steady": job.tokens_per_s_steady,
        "corpus_tokens_per_s": job.tokens_per_s,
        "corpus_tokens_per_s_wall": job.tokens_per_s_wall,
        "ratio": round(job.tokens_per_s_steady / st_tps, 3),
        "ratio_pipeline": round(job.tokens_per_s / st_tps, 3),
        "ratio_wall": round(job.tokens_per_s_wall / st_tps, 3),
        "bytes_per_row": job.bytes_per_row,
        "bytes_report": job.bytes_report(),
    }
    if "://" not in out_uri and plan.settings["dimensions"] is None:
        good = pq.read_table(out_uri, columns=["embedding"])
        if len(good) == len(st_vectors):
            ours = np.asarray(good.column("embedding").combine_chunks().flatten()).reshape(len(good), -1)
            result["mean_cosine_vs_st"] = round(float(np.mean(np.sum(ours * st_vectors, axis=1))), 4)
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    print(
        f"benchmark: {result['texts']:,} texts, {result['tokens']:,} tokens, same model directory, "
        f"{result['device']}, {result['dtype']} on both sides\n"
        f"  sentence-transformers encode (model loaded)  {result['st_tokens_per_s']:>10,.0f} tokens/s  "
        f"{result['st_s']:7.1f} s   (batch_size={result['st_batch_size']}, {result['torch_threads']} torch threads)",
        flush=True,
    )
    for name, tps, seconds, ratio in (
        ("corpus job, encoders loaded -> end", "corpus_tokens_per_s_steady", "corpus_steady_s", "ratio"),
        ("corpus job, whole pipeline", "corpus_tokens_per_s", "corpus_pipeline_s", "ratio_pipeline"),
        ("corpus job, whole command", "corpus_tokens_per_s_wall", "corpus_wall_s", "ratio_wall"),
    ):
        print(
            f"  {name:<43} {result[tps]:>10,.0f} tokens/s  {result[seconds]:7.1f} s   {result[ratio]:.2f}x", flush=True
        )
    print(f"  vector bytes per row: {result['bytes_report']}", flush=True)
    if "mean_cosine_vs_st" in result:
        print(
            f"  mean cosine(ours, sentence-transformers) = {result['mean_cosine_vs_st']}: sentence-transformers "
            f"loads a KaLM directory as stock (causal) Qwen2 without remote code, so its vectors are not "
            f"KaLM's; only its speed is comparable",
            flush=True,
        )
