"""The OpenAI error shape every failure is answered in, as tests check it."""

from __future__ import annotations

import httpx


def assert_openai_error(resp: httpx.Response, status: int, type_: str, code=None, param=None, says=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    if says is not None:
        assert says in err["message"], err["message"]
    return err
