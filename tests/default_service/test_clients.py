"""Real client libraries against `serve run cluster/config.yaml`, on their defaults.

Each answer is compared with ``Encoder.encode`` of the same texts (cosine >= 0.9999; the
figures are printed, ``pytest -s`` shows them). LangChain's ``OpenAIEmbeddings`` on its
defaults tokenises with tiktoken's ``cl100k_base`` and sends token ids, which the service reads
as OpenAI does (``token_id_inputs: openai``). tiktoken would download that vocabulary; here its
cache is seeded from the file the service itself loads, so nothing is fetched.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from serve_app.api.token_ids import cl100k_base, cl100k_file
from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION
from tests.service_harness import environ

DOCS = [
    "Ray Serve scales model serving.",
    "Paris is in France.",
    "东京是日本的首都。",
    "Die Katze schläft auf dem Sofa.",
]
QUERY = "what scales model serving?"
#: Where tiktoken looks for cl100k_base: its cache key is the SHA-1 of the download address.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
#: LangChain's OpenAIEmbeddings cuts texts into chunks of this many cl100k tokens (embedding_ctx_length).
LANGCHAIN_CHUNK_TOKENS = 8191
#: 11,500 cl100k tokens: LangChain sends it as two chunks, 8191 tokens of English and a second one
#: that is mostly Chinese, so the chunks' vectors differ (cosine 0.63 on the tiny stand-in) and their
#: weighted average differs from the vector of the whole text (0.995).
LONG_TEXT = (
    " ".join(f"Sentence {i} says that Ray Serve scales model serving on many nodes." for i in range(590))
    + " "
    + "".join(f"第{i}句：东京是日本的首都，猫在沙发上睡觉。" for i in range(120))
)


@pytest.fixture(scope="module")
def model_id(tiny_model_dir):
    return tiny_model_dir.name


@pytest.fixture(scope="module")
def offline_tiktoken(tmp_path_factory):
    """tiktoken's cache holding cl100k_base, seeded from the installed file: no download."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(cl100k_file(), cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    with environ(TIKTOKEN_CACHE_DIR=str(cache)):
        yield cache


def cosines(got, want: np.ndarray) -> np.ndarray:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def assert_close(client: str, got, want: np.ndarray) -> None:
    cos = cosines(got, want)
    print(f"{client}: cosine to Encoder.encode {' '.join(f'{c:.6f}' for c in cos)}")
    assert cos.min() >= 0.9999, cos


def langchain_average(encoder, text: str) -> np.ndarray:
    """What LangChain's OpenAIEmbeddings makes of a long text, computed with Encoder.encode.

    LangChain tokenises the text with cl100k_base, cuts the ids into chunks of 8191, embeds each
    chunk (the service decodes each chunk's ids back to its piece of the text), averages the chunk
    vectors weighted by their cl100k token counts and L2-normalises the average.
    """
    ids = cl100k_base().encode_ordinary(text)
    chunks = [ids[i : i + LANGCHAIN_CHUNK_TOKENS] for i in range(0, len(ids), LANGCHAIN_CHUNK_TOKENS)]
    assert len(chunks) >= 2, "the text must be long enough for LangChain to split it"
    vectors = encoder.encode([cl100k_base().decode(c) for c in chunks])
    average = np.average(vectors, axis=0, weights=[len(c) for c in chunks])
    return average / np.linalg.norm(average)


def test_openai_client(service, model_id, tiny_encoder):
    from openai import OpenAI

    client = OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)
    docs = client.embeddings.create(model=model_id, input=DOCS)
    query = client.embeddings.create(model=model_id, input=QUERY, extra_body={"input_type": "query"})
    assert_close("openai documents", [d.embedding for d in docs.data], tiny_encoder.encode(DOCS))
    assert_close(
        "openai query",
        [query.data[0].embedding],
        tiny_encoder.encode([QUERY], instruction=KALM_QUERY_INSTRUCTION),
    )


def test_langchain_on_its_defaults_sends_cl100k_ids_and_gets_the_texts_vectors(
    service, model_id, tiny_encoder, offline_tiktoken
):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=model_id, base_url=service.base_url + "/v1", api_key="unused")
    assert embeddings.check_embedding_ctx_length and embeddings.tiktoken_enabled  # the defaults: token ids
    assert_close("langchain defaults documents", embeddings.embed_documents(DOCS), tiny_encoder.encode(DOCS))
    assert_close("langchain defaults query", [embeddings.embed_query(QUERY)], tiny_encoder.encode([QUERY]))
    # Query instructions go in the body (the service applies them to the decoded text).
    queries = OpenAIEmbeddings(
        model=model_id,
        base_url=service.base_url + "/v1",
        api_key="unused",
        model_kwargs={"extra_body": {"input_type": "query"}},
    )
    assert_close(
        "langchain defaults query with input_type=query",
        [queries.embed_query(QUERY)],
        tiny_encoder.encode([QUERY], instruction=KALM_QUERY_INSTRUCTION),
    )
    # A text over 8191 cl100k tokens: LangChain embeds its chunks and averages them.
    long_vector = embeddings.embed_documents([LONG_TEXT])
    assert_close(
        "langchain defaults long text (2 chunks, averaged)",
        long_vector,
        langchain_average(tiny_encoder, LONG_TEXT)[None],
    )
    whole = cosines(long_vector, tiny_encoder.encode([LONG_TEXT]))[0]
    print(f"  (for comparison: that average against the whole text embedded in one piece: cosine {whole:.6f})")
    assert whole < 0.9999  # so the comparison above does tell LangChain's chunk average apart


def test_langchain_without_the_context_length_check_sends_text(service, model_id, tiny_encoder):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=model_id, base_url=service.base_url + "/v1", api_key="unused", check_embedding_ctx_length=False
    )
    assert_close("langchain text documents", embeddings.embed_documents(DOCS), tiny_encoder.encode(DOCS))
    assert_close("langchain text query", [embeddings.embed_query(QUERY)], tiny_encoder.encode([QUERY]))
    # Sent whole (the model takes 32k tokens): the service embeds the text in one piece.
    assert_close(
        "langchain text long text (whole)",
        embeddings.embed_documents([LONG_TEXT]),
        tiny_encoder.encode([LONG_TEXT]),
    )


def test_llamaindex_openai_like_embedding(service, model_id, tiny_encoder):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    embeddings = OpenAILikeEmbedding(model_name=model_id, api_base=service.base_url + "/v1", api_key="unused")
    assert_close("llamaindex documents", embeddings.get_text_embedding_batch(DOCS), tiny_encoder.encode(DOCS))
    assert_close("llamaindex query", [embeddings.get_query_embedding(QUERY)], tiny_encoder.encode([QUERY]))
    queries = OpenAILikeEmbedding(
        model_name=model_id,
        api_base=service.base_url + "/v1",
        api_key="unused",
        additional_kwargs={"extra_body": {"input_type": "query"}},
    )
    assert_close(
        "llamaindex query with input_type=query",
        [queries.get_query_embedding(QUERY)],
        tiny_encoder.encode([QUERY], instruction=KALM_QUERY_INSTRUCTION),
    )
