"""Client mistakes and the 400 each gets, with the field named: one table, checked in-process
(tests/test_http_contract.py) and through `serve run` (tests/default_service/test_service.py).

A row is ``(body, param, says)``: the body sent, the ``param`` the error names and words its message
holds (``None``: any). Bodies name the served model as :data:`MODEL`; :func:`as_sent` puts the
service's model id there. Mistakes against configured limits depend on the limits a service runs
with: :func:`over_the_limits` gives them for those.
"""

from __future__ import annotations

import pytest

MODEL = "M"  # stands for the served model's id

CLIENT_MISTAKES = [
    pytest.param({"input": "x"}, "model", "missing", id="no-model"),
    pytest.param({"model": MODEL, "input": ""}, "input", "empty", id="empty-text"),
    pytest.param({"model": MODEL, "input": []}, "input", "empty", id="empty-list"),
    pytest.param({"model": MODEL, "input": ["ok", ""]}, "input", "input[1]", id="an-empty-text-among-others"),
    pytest.param({"model": MODEL, "input": [[]]}, "input", "empty", id="empty-token-ids"),
    pytest.param({"model": MODEL, "input": 42}, "input", "input is an integer", id="an-integer"),
    pytest.param({"model": MODEL, "input": None}, "input", "input is null", id="null"),
    pytest.param({"model": MODEL, "input": [True]}, "input", "input[0] is a boolean", id="a-boolean"),
    pytest.param(
        {"model": MODEL, "input": [1.5]}, "input", "input[0] is a number, not a token id", id="a-fraction-as-id"
    ),
    pytest.param(
        {"model": MODEL, "input": [[[1]]]}, "input", "input[0][0] is a list, not a token id", id="ids-nested-too-deep"
    ),
    pytest.param(
        {"model": MODEL, "input": ["a", 1]},
        "input",
        "input mixes strings with other values: input[1] is an integer",
        id="texts-mixed-with-ids",
    ),
    pytest.param(
        {"model": MODEL, "input": [1, "a"]}, "input", "input[1] is a string, not a token id", id="ids-mixed-with-texts"
    ),
    pytest.param({"model": MODEL, "input": [[1], 2]}, "input", "input[1] is an integer", id="id-lists-mixed-with-ids"),
    pytest.param({"model": MODEL, "input": [{"a": 1}]}, "input", "input[0] is an object", id="an-object"),
    pytest.param({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions", "between 1 and 64", id="dimensions-0"),
    pytest.param(
        {"model": MODEL, "input": "x", "dimensions": 65}, "dimensions", "between 1 and 64", id="dimensions-over-models"
    ),
    pytest.param({"model": MODEL, "input": "x", "dimensions": "8"}, "dimensions", None, id="dimensions-as-text"),
    pytest.param(
        {"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format", None, id="unknown-encoding"
    ),
    pytest.param({"model": MODEL, "input": "x", "input_type": "passage"}, "input_type", None, id="unknown-input-type"),
    pytest.param({"model": MODEL, "input": "x", "truncate": "yes"}, "truncate", None, id="truncate-as-text"),
    pytest.param({"model": MODEL, "input": "x", "dimension": 8}, "dimension", "unrecognized", id="unknown-field"),
    pytest.param({"model": MODEL, "input": [5, 151646]}, "input", "151646", id="token-id-past-the-vocabulary"),
    pytest.param({"model": MODEL, "input": [[5], [-1]]}, "input", "-1", id="negative-token-id"),
    pytest.param({"model": MODEL, "input": "x", "instruction": " "}, "instruction", "empty", id="blank-instruction"),
]

#: Bodies that are not a JSON object: 400 before any field is read.
MALFORMED_BODIES = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"[1, 2]", id="a-list"),
    pytest.param(b"", id="empty"),
    pytest.param(b'"text"', id="a-string"),
    pytest.param(b"\xff\xfe", id="not-utf-8"),
    pytest.param(b"null", id="null"),
]


def over_the_limits(max_inputs_per_request: int, max_input_tokens: int) -> list:
    """Rows for a service with these limits: one input too many, and one input well over its token limit."""
    return [
        pytest.param(
            {"model": MODEL, "input": ["x"] * (max_inputs_per_request + 1)},
            "input",
            f"at most {max_inputs_per_request}",
            id="too-many-inputs",
        ),
        pytest.param(
            {"model": MODEL, "input": "word " * (max_input_tokens * 5 // 4)},
            "input",
            f"limit of {max_input_tokens}",
            id="an-input-over-the-token-limit",
        ),
    ]


def as_sent(body: dict, model_id: str) -> dict:
    """The row's body as sent to a service that serves ``model_id``."""
    return {**body, "model": model_id} if body.get("model") == MODEL else body
