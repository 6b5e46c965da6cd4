"""The validation stage alone (no model, no server): whatever the body, only a 4xx
`APIError` or a request that is typed, bounded and finite comes out."""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub.serve import protocol as p
from lorahub.serve.validate import Limits, check, check_prompt, check_token_ids, parse

EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES * 5,  # cheap: no model
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=EXAMPLES <= 60,
)
LIMITS = Limits()


def validated(body: bytes, kind: type = p.ChatRequest) -> p.ChatRequest | p.CompletionRequest:
    req = parse(body, kind)
    check(req, LIMITS)
    return req


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        Limits(max_stops=0)
    with pytest.raises(ValueError, match="below"):
        Limits(min_weight=2.0, max_weight=1.0)


@pytest.mark.parametrize(
    "field, value",
    [("stream", "yes"), ("max_tokens", "8"), ("max_tokens", 8.0), ("temperature", "0.5")],
)
def test_no_coercion(field: str, value: object) -> None:
    body = {"model": "m", "prompt": "x", field: value}
    with pytest.raises(p.APIError) as e:
        validated(json.dumps(body).encode(), p.CompletionRequest)
    assert e.value.status == 400 and e.value.param == field


@pytest.mark.parametrize(
    "body, param, forms",
    [
        ({"prompt": "x", "stop": [None]}, "stop", "str or list[str]"),
        ({"prompt": "x", "stop": 5}, "stop", "str or list[str]"),
        ({"prompt": [True]}, "prompt", "str or list[str] or list[int] or list[list[int]]"),
    ],
)
def test_a_field_of_several_forms_is_named_with_its_forms(body, param, forms) -> None:
    """pydantic reports a union field once per form, under the form's name ("stop.str")."""
    with pytest.raises(p.APIError) as e:
        validated(json.dumps({"model": "m", **body}).encode(), p.CompletionRequest)
    assert e.value.param == param and str(e.value) == f"{param}: should be {forms}"


def test_an_adapter_named_like_a_type_keeps_its_name_in_the_error() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    body["loraplex"] = {"adapters": {"str": "heavy"}}
    with pytest.raises(p.APIError) as e:
        validated(json.dumps(body).encode())
    assert e.value.param == "loraplex.adapters.str"


def test_integers_are_numbers() -> None:
    req = validated(
        b'{"model": "m", "prompt": "x", "temperature": 1, "top_p": 1}', p.CompletionRequest
    )
    assert req.temperature == 1.0 and req.top_p == 1.0


def test_the_prompt_check_names_the_first_problem() -> None:
    with pytest.raises(p.APIError) as e:
        check_prompt(0, 5, 100, "prompt")
    assert (e.value.code, e.value.param) == ("empty_prompt", "prompt")
    with pytest.raises(p.APIError) as e:
        check_prompt(100, 5, 100, "messages")
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(p.APIError) as e:
        check_prompt(90, 11, 100, "messages")
    assert e.value.param == "max_tokens"
    check_prompt(90, 10, 100, "messages")


@pytest.mark.parametrize(
    "change, param",
    [
        ({"prompt": ["x"] * (LIMITS.max_prompts + 1)}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["x", "y"], "stream": True}, "stream"),
        ({"echo": True, "stream": True}, "stream"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [f"s{i}" for i in range(LIMITS.max_stops + 1)]}, "stop"),
    ],
)
def test_completion_prompts_are_bounded(change: dict, param: str) -> None:
    body = json.dumps({"model": "m", "prompt": "x", **change}).encode()
    with pytest.raises(p.APIError) as e:
        validated(body, p.CompletionRequest)
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.parametrize(
    "prompt, prompts",
    [("x", ["x"]), ([5, 6], [[5, 6]]), (["x", "y"], ["x", "y"]), ([[5], [6, 7]], [[5], [6, 7]])],
)
def test_a_prompt_is_text_token_ids_or_a_list_of_either(prompt: object, prompts: list) -> None:
    body = {"model": "m", "prompt": prompt, "max_tokens": 0, "echo": True}
    assert validated(json.dumps(body).encode(), p.CompletionRequest).prompts() == prompts


def test_token_ids_lie_in_the_vocabulary() -> None:
    check_token_ids([0, 5, 9], 10, "prompt")
    for bad in ([10], [-1], [3, 2**40]):
        with pytest.raises(p.APIError) as e:
            check_token_ids(bad, 10, "prompt.2")
        assert (e.value.code, e.value.param) == ("invalid_token_id", "prompt.2")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "n", "stream", "stream_options", "stop", "seed", "min_tokens", "logprobs",
    "top_logprobs", "loraplex", "tools", "response_format", "logit_bias", "best_of", "user",
    "echo", "suffix", "add_special_tokens", "prompt_logprobs",
]  # fmt: skip
GOOD = {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
    kind=st.sampled_from([p.ChatRequest, p.CompletionRequest]),
)
def test_any_body_is_a_400_or_a_bounded_finite_request(changes: dict, kind: type) -> None:
    body = json.dumps({**GOOD, **changes}).encode()  # NaN / Infinity written as JSON allows
    try:
        req = validated(body, kind)
    except p.APIError as e:
        assert e.status == 400 and e.message
        return
    weights = (req.loraplex.adapters or {}).values()
    assert all(math.isfinite(w) and LIMITS.min_weight <= w <= LIMITS.max_weight for w in weights)
    assert req.seed is None or 0 <= req.seed < 2**63
    assert all(0 < len(s) <= LIMITS.max_stop_chars for s in req.stops())
    assert len(req.stops()) <= LIMITS.max_stops
    assert req.temperature is None or math.isfinite(req.temperature)
    assert isinstance(req.stream, bool) and req.n == 1
    req.texts()  # the text is readable
    if isinstance(req, p.CompletionRequest):
        assert 0 < len(req.prompts()) <= LIMITS.max_prompts
        assert not (req.stream and (req.echo or len(req.prompts()) > 1))
        assert req.max_tokens != 0 or req.echo


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_400_or_a_request(raw: bytes) -> None:
    try:
        validated(raw)
    except p.APIError as e:
        assert e.status == 400


@pytest.mark.parametrize(
    "text",
    [
        "cannot read /home/ann/.cache/loraplex/blobs/ab/cd.safetensors: truncated",
        "NaN or Inf in C:\\Users\\ann\\registry\\blobs\\x.safetensors",
        "adapter 'math' failed at /srv/reg/tmp/",
    ],
)
def test_error_texts_for_clients_leave_server_paths_out(text: str) -> None:
    from lorahub.serve.engine import Event
    from lorahub.serve.serving import event_error

    error = event_error(Event("error", error=text))
    assert error.status == 500 and "<path>" in error.message
    assert not any(part in error.message for part in ("/home", "Users", "blobs", "/srv", "reg"))
    client_fault = event_error(Event("error", error="too long for /x/y", status=400, code="c"))
    assert (client_fault.status, client_fault.code) == (400, "c")


@pytest.mark.parametrize(
    "kind, fields",
    [
        (p.ChatRequest, {"n": None, "stream": None, "logprobs": None, "min_tokens": None}),
        (p.CompletionRequest, {"n": None, "stream": None, "echo": None, "logprobs": None}),
    ],
)
def test_a_field_sent_as_null_takes_its_default(kind: type, fields: dict) -> None:
    base = (
        {"messages": [{"role": "user", "content": "x"}]}
        if kind is p.ChatRequest
        else {"prompt": "x"}
    )
    req = validated(json.dumps({"model": "m", **base, **fields}).encode(), kind)
    assert all(getattr(req, k) == kind.model_fields[k].default for k in fields)
    with pytest.raises(p.APIError) as e:  # a null model is still no model
        validated(json.dumps({"model": None, **base}).encode(), kind)
    assert (e.value.status, e.value.param) == (400, "model")
