"""Token-id inputs are read as the client meant them (``token_id_inputs``), without a server.

OpenAI's endpoint, and LangChain's ``OpenAIEmbeddings`` on its defaults, send ids of OpenAI's
``cl100k_base``; vLLM-style clients send the model's own ids. The service test
(tests/default_service/test_clients.py) runs the real clients against ``serve run``.
"""

from __future__ import annotations

import pytest
import tiktoken.load

from serve_app.api import token_ids
from serve_app.api.protocol import EmbeddingRequest, validate_and_tokenize
from serve_app.config import ServiceConfig
from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION, instruction_prompt
from serve_app.core.tokenization import TextTokenizer
from serve_app.errors import InvalidRequestError, TokenIdOutOfRangeError

TEXTS = ["Ray Serve scales model serving.", "Die Katze schläft auf dem Sofa. 东京是日本的首都。"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return TextTokenizer.from_dir(tiny_model_dir)


def prepare(tiny_model_dir, tokenizer, reading: str, **body):
    config = ServiceConfig(model=str(tiny_model_dir), token_id_inputs=reading)
    request = EmbeddingRequest(model=config.model_id, **body)
    return validate_and_tokenize(request, config, tokenizer, native_dimensions=64)


def test_cl100k_base_loads_from_the_installed_file_without_fetching(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("cl100k_base must not be fetched")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    token_ids.cl100k_base.cache_clear()
    encoding = token_ids.cl100k_base()
    # Known cl100k_base ids (OpenAI's tokenizer, as the tiktoken docs show them).
    assert encoding.encode("hello world") == [15339, 1917]
    assert encoding.n_vocab == 100277


def test_openai_reading_embeds_cl100k_ids_like_their_text(tiny_model_dir, tokenizer):
    """The default: ids decode to the text, which the model's tokenizer then tokenises (usage counts those)."""
    cl100k = token_ids.cl100k_base()
    as_text = prepare(tiny_model_dir, tokenizer, "openai", input=TEXTS)
    as_ids = prepare(tiny_model_dir, tokenizer, "openai", input=[cl100k.encode(t) for t in TEXTS])
    one = prepare(tiny_model_dir, tokenizer, "openai", input=cl100k.encode(TEXTS[1]))
    assert as_ids.token_ids == as_text.token_ids == [t.ids for t in tokenizer.encode_texts(TEXTS)]
    assert as_ids.n_tokens == as_text.n_tokens != sum(len(cl100k.encode(t)) for t in TEXTS)
    assert one.token_ids == as_text.token_ids[1:]


def test_openai_reading_applies_instructions_to_the_decoded_text(tiny_model_dir, tokenizer):
    ids = token_ids.cl100k_base().encode(TEXTS[0])
    query = prepare(tiny_model_dir, tokenizer, "openai", input=ids, input_type="query")
    prompt = instruction_prompt(KALM_QUERY_INSTRUCTION)
    assert query.token_ids == [tokenizer.encode_texts(TEXTS[:1], prompt=prompt)[0].ids]


@pytest.mark.parametrize("bad", [100256, 100277, 151646, -1, 10**12])
def test_openai_reading_refuses_ids_outside_cl100k(tiny_model_dir, tokenizer, bad):
    with pytest.raises(TokenIdOutOfRangeError, match=f"token id {bad}, which is not in OpenAI's cl100k_base"):
        prepare(tiny_model_dir, tokenizer, "openai", input=[[15339], [1917, bad]])


def test_model_reading_takes_the_models_own_ids(tiny_model_dir, tokenizer):
    ids = [t.ids for t in tokenizer.encode_texts(TEXTS)]
    assert prepare(tiny_model_dir, tokenizer, "model", input=ids).token_ids == ids
    with pytest.raises(TokenIdOutOfRangeError, match="outside this model's vocabulary"):
        prepare(tiny_model_dir, tokenizer, "model", input=[5, 10**9])


def test_reject_reading_answers_400_naming_the_setting(tiny_model_dir, tokenizer):
    with pytest.raises(InvalidRequestError, match="token_id_inputs: reject") as refused:
        prepare(tiny_model_dir, tokenizer, "reject", input=[15339, 1917])
    assert refused.value.param == "input"
    assert prepare(tiny_model_dir, tokenizer, "reject", input=TEXTS).n_tokens > 0  # text is unaffected


def test_the_setting_takes_only_its_three_values(tiny_model_dir):
    with pytest.raises(ValueError, match="token_id_inputs"):
        ServiceConfig(model=str(tiny_model_dir), token_id_inputs="qwen")
