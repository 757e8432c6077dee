"""The benchmark (`python -m loadtest.benchmark`) against any OpenAI-compatible server: plain fields, tokens counted locally."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np

from loadtest.benchmark_targets import Served, count_tokens
from loadtest.benchmark_workload import Request, make_side_by_side_workload
from serve_app.core.tokenization import TextTokenizer


def fake_server(bodies: list[dict]) -> httpx.MockTransport:
    """An OpenAI-style server that records request bodies and claims a wrong token count."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        vector = base64.b64encode(np.ones(4, np.float32).tobytes()).decode()
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(body["input"]))]
        return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    return httpx.MockTransport(handle)


def test_side_by_side_workload_is_60_queries_and_15_requests_of_4_passages():
    workload = make_side_by_side_workload(seed=0)
    queries = [r for r in workload if r.kind == "query"]
    passages = [r for r in workload if r.kind == "passages"]
    assert len(queries) == 60 and all(len(r.texts) == 1 and r.instruction for r in queries)
    assert len(passages) == 15 and all(len(r.texts) == 4 and r.instruction is None for r in passages)
    assert workload == make_side_by_side_workload(seed=0)


def test_plain_openai_requests_carry_the_instruction_in_the_text(tiny_model_dir):
    tokenizer = TextTokenizer.from_dir(tiny_model_dir)
    query = Request("query", ("what is ray serve?",), "Given a query, retrieve documents")
    passages = Request("passages", ("Ray Serve is a library.", "Another passage."))
    bodies: list[dict] = []
    served = Served("http://peer", "m", None, None, tokenizer, plain_openai=True, transport=fake_server(bodies))

    async def calls():
        return await served.call(query, priority="interactive"), await served.call(passages)

    query_tokens, passage_tokens = asyncio.run(calls())
    assert all(set(body) == {"model", "input", "encoding_format"} for body in bodies)
    assert bodies[0]["input"] == ["Instruct: Given a query, retrieve documents \n Query: what is ray serve?"]
    assert bodies[1]["input"] == list(passages.texts)
    # counted here, with the model's tokenizer, not taken from the server's usage
    assert query_tokens == len(tokenizer.encode_texts(bodies[0]["input"])[0].ids)
    assert passage_tokens == sum(len(t.ids) for t in tokenizer.encode_texts(bodies[1]["input"]))
    assert query_tokens == count_tokens(tokenizer, query) > 1


def test_extension_requests_send_instruction_and_priority_fields(tiny_model_dir):
    bodies: list[dict] = []
    served = Served(
        "http://ours", "m", None, None, TextTokenizer.from_dir(tiny_model_dir), transport=fake_server(bodies)
    )
    asyncio.run(served.call(Request("query", ("hello",), "Find it"), priority="interactive"))
    assert bodies[0]["input"] == ["hello"]
    assert bodies[0]["instruction"] == "Find it" and bodies[0]["priority"] == "interactive"
