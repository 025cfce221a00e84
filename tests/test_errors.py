"""Every error the gateway can answer is an OpenAI error object (gateway.errors)."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

from gateway import errors
from gateway.errors import OpenAIError
from gateway.protocol import ChatCompletionRequest

SECRET = "db password is hunter2"


def make_app() -> FastAPI:
    app = FastAPI()
    errors.install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict:
        return {"ok": True, "n": req.n}

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise OpenAIError(503, retry_after=2)

    @app.get("/busy")
    async def busy() -> None:
        raise errors.rate_limited(1.2)

    @app.get("/model")
    async def model() -> None:
        raise errors.model_not_found("gpt-5")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET)

    def deny() -> None:
        raise HTTPException(
            status_code=401, detail="Not authenticated", headers={"WWW-Authenticate": "Bearer"}
        )

    @app.get("/private", dependencies=[Depends(deny)])
    async def private() -> dict:
        return {}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_error_object(body: dict, type_: str) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_valid_request_passes(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200 and r.json() == {"ok": True, "n": 1}


def test_malformed_json(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        content=b'{"model": "m", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    err = assert_error_object(r.json(), "invalid_request_error")
    assert "could not parse the JSON body" in err["message"]


def test_non_json_body(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"model=m", headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert "JSON" in assert_error_object(r.json(), "invalid_request_error")["message"]


def test_missing_field_names_param(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 400
    err = assert_error_object(r.json(), "invalid_request_error")
    assert err["param"] == "messages"
    assert err["message"] == "Missing required parameter: 'messages'."


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"9": 500}}, "logit_bias.9"),
    ],
)
def test_invalid_field_names_param(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = assert_error_object(r.json(), "invalid_request_error")
    assert err["param"] == param
    assert "Value error" not in err["message"]


def test_json_array_body(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    assert "JSON object" in assert_error_object(r.json(), "invalid_request_error")["message"]


def test_unknown_route_404(client: TestClient) -> None:
    r = client.post("/v1/nope", json={})
    assert r.status_code == 404
    err = assert_error_object(r.json(), "not_found_error")
    assert err["message"] == "Invalid URL (POST /v1/nope)" and err["code"] == "unknown_url"


def test_wrong_method_405(client: TestClient) -> None:
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert_error_object(r.json(), "invalid_request_error")
    assert "POST" in r.headers.get("allow", "")


def test_openai_error_503_with_retry_after(client: TestClient) -> None:
    r = client.get("/unavailable")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "2"
    assert_error_object(r.json(), "unavailable_error")


def test_rate_limited_rounds_retry_after_up(client: TestClient) -> None:
    r = client.get("/busy")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert assert_error_object(r.json(), "rate_limit_error")["code"] == "rate_limit_exceeded"


def test_model_not_found(client: TestClient) -> None:
    r = client.get("/model")
    assert r.status_code == 404
    err = assert_error_object(r.json(), "not_found_error")
    assert err["message"] == "The model `gpt-5` does not exist."
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_http_exception_keeps_status_and_headers(client: TestClient) -> None:
    r = client.get("/private")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert assert_error_object(r.json(), "authentication_error")["message"] == "Not authenticated"


def test_unexpected_exception_is_generic_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        r = client.get("/boom")
    assert r.status_code == 500
    err = assert_error_object(r.json(), "server_error")
    assert SECRET not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert err["param"] is None
    # The traceback goes to the log, once.
    records = [rec for rec in caplog.records if rec.exc_info]
    assert len(records) == 1 and SECRET in str(records[0].exc_info[1])


def test_unexpected_exception_does_not_reraise() -> None:
    """With the catch-all middleware the exception stops at the gateway (no double log)."""
    with TestClient(make_app(), raise_server_exceptions=True) as strict:
        r = strict.get("/boom")
    assert r.status_code == 500


def test_factories() -> None:
    cases = [
        (errors.invalid_request("bad", param="x"), 400, "invalid_request_error"),
        (errors.authentication_error(), 401, "authentication_error"),
        (errors.permission_error(), 403, "permission_error"),
        (errors.model_not_found("m"), 404, "not_found_error"),
        (errors.payload_too_large(), 413, "invalid_request_error"),
        (errors.rate_limited(3), 429, "rate_limit_error"),
        (errors.server_error(), 500, "server_error"),
        (errors.unavailable("down", retry_after=5), 503, "unavailable_error"),
    ]
    for err, status, type_ in cases:
        assert err.status_code == status and err.type == type_
        assert_error_object(err.to_dict(), type_)
    assert errors.unavailable("down", retry_after=5).headers == {"Retry-After": "5"}
    assert errors.authentication_error().headers["WWW-Authenticate"] == "Bearer"
    ctx = errors.context_length_exceeded(4096, 4000, 200)
    assert ctx.code == "context_length_exceeded" and "4096" in ctx.message and "4200" in ctx.message


def test_stream_error_event() -> None:
    payload = json.loads(errors.sse_error_data(errors.unavailable("a peer failed", retry_after=1)))
    assert_error_object(payload, "unavailable_error")
    assert payload["error"]["message"] == "a peer failed"
    # Any other exception becomes the generic server error, revealing nothing.
    hidden = json.loads(errors.sse_error_data(ValueError(SECRET)))
    assert_error_object(hidden, "server_error")
    assert SECRET not in json.dumps(hidden)
    assert errors.error_payload(ValueError(SECRET))["error"]["type"] == "server_error"


def test_validation_error_helper_strips_union_noise() -> None:
    err = errors.validation_error(
        [
            {
                "loc": ("body", "messages", 0, "content", "str"),
                "msg": "Input should be a valid string",
                "type": "x",
            },
            {
                "loc": ("body", "messages", 0, "content", "list[TextContentPart]"),
                "msg": "Input should be a valid list",
                "type": "x",
            },
        ]
    )
    assert err.param == "messages.0.content"
    assert err.message == "Invalid value for 'messages.0.content': Input should be a valid string."
