"""Every sampling parameter has an effect: each test here fails if the server ignored its parameter.

Greedy references are computed once per module; sampled runs are seeded so that the tests are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import MODEL, Server, start_server

POEM = "Write a short poem about the sea."
REPEAT = "hello hello hello hello hello hello hello hello"  # a text prompt the model continues in kind
SHORT = 12  # tokens for the greedy reference and the runs compared with it
SAMPLED = 8  # tokens for runs that only need to differ from each other


def chat(client: openai.OpenAI, content: str = POEM, **kwargs: Any) -> ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def text_of(r: ChatCompletion, i: int = 0) -> str:
    content = r.choices[i].message.content
    assert content is not None
    return content


def tokens_of(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def piece(http: httpx.Client, token: int) -> str:
    r = http.post("/detokenize", json={"model": MODEL, "tokens": [token]})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


ADMIN = "parameters-admin"


@pytest.fixture(scope="module")
def cold_server() -> Iterator[Server]:
    """Four slots: the most any of its tests runs at once (2 prompts × n=2)."""
    with start_server("--parallel", "4", "--admin-key", ADMIN) as server:
        yield server


@pytest.fixture
def cold_client(cold_server: Server) -> openai.OpenAI:
    """A client of a server whose KV cache is as a fresh start leaves it. Outputs are compared only between
    requests that found the KV cache in the same state: its cell layout changes the numerics (see
    docs/determinism.md)."""
    cold_server.reset_prefix_cache(ADMIN)
    return cold_server.openai()


@pytest.fixture
def greedy(cold_client: openai.OpenAI) -> str:
    """The greedy continuation of POEM, SHORT tokens long."""
    r = chat(cold_client, max_tokens=SHORT, temperature=0)
    assert r.choices[0].finish_reason == "length"
    text = text_of(r)
    assert len(text) > 20, text
    return text


def complete(client: openai.OpenAI, prompt: str, **kwargs: Any) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, **kwargs).choices[0].text


@pytest.fixture(scope="module")
def repetitive(client: openai.OpenAI) -> str:
    """Greedy output, without penalties, of a prompt that makes the model repeat itself."""
    return complete(client, REPEAT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})


def hellos(text: str) -> int:
    return text.lower().count("hello")


# --- max_tokens -----------------------------------------------------------------------------------------------
def test_max_tokens_cuts_generation(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_max_completion_tokens_cuts_generation(client: openai.OpenAI) -> None:
    r = chat(client, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_chat_default_max_tokens_is_512(client: openai.OpenAI) -> None:
    """Without max_tokens a chat completion is not cut at the legacy endpoint's 16 tokens, but at 512."""
    r = chat(client, "Tell me a story.", temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 512


def test_completions_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 16


# --- stop -----------------------------------------------------------------------------------------------------
def test_stop_string_cuts_before_it(cold_client: openai.OpenAI, greedy: str) -> None:
    middle = len(greedy) // 2
    stop = greedy[middle : middle + 4]
    expected = greedy[: greedy.index(stop)]
    assert expected
    r = chat(cold_client, max_tokens=SHORT, temperature=0, stop=stop)
    assert text_of(r) == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < SHORT


def test_stop_list_earliest_wins(cold_client: openai.OpenAI, greedy: str) -> None:
    late = greedy[-6:].strip()
    early = greedy[len(greedy) // 3 : len(greedy) // 3 + 3]
    assert greedy.index(early) < greedy.index(late)
    r = chat(cold_client, max_tokens=SHORT, temperature=0, stop=["never appears", late, early])
    assert text_of(r) == greedy[: greedy.index(early)]
    assert r.choices[0].finish_reason == "stop"


def test_stop_not_present_changes_nothing(cold_client: openai.OpenAI, greedy: str) -> None:
    r = chat(cold_client, max_tokens=SHORT, temperature=0, stop=["\u2603\u2603"])
    assert text_of(r) == greedy
    assert r.choices[0].finish_reason == "length"


# --- n, seed, temperature -------------------------------------------------------------------------------------
def test_n_returns_n_distinct_choices(client: openai.OpenAI) -> None:
    r = chat(client, n=3, max_tokens=SAMPLED, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [text_of(r, i) for i in range(3)]
    assert all(texts)
    assert len(set(texts)) > 1, texts


def test_n_usage_counts_every_choice(client: openai.OpenAI) -> None:
    r = chat(client, n=2, max_tokens=4, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_same_seed_same_output(cold_client: openai.OpenAI) -> None:
    first = text_of(chat(cold_client, max_tokens=SAMPLED, temperature=1.0, seed=1234))
    second = text_of(chat(cold_client, max_tokens=SAMPLED, temperature=1.0, seed=1234))
    assert first == second


def test_different_seeds_differ(cold_client: openai.OpenAI) -> None:
    texts = {text_of(chat(cold_client, max_tokens=SAMPLED, temperature=1.0, seed=s)) for s in (11, 22, 33)}
    assert len(texts) > 1, texts


def test_temperature_zero_ignores_seed(cold_client: openai.OpenAI, greedy: str) -> None:
    for seed in (5, 6):
        assert text_of(chat(cold_client, max_tokens=SHORT, temperature=0, seed=seed)) == greedy


def test_high_temperature_varies_with_seed(cold_client: openai.OpenAI, greedy: str) -> None:
    texts = [text_of(chat(cold_client, max_tokens=SAMPLED, temperature=1.5, seed=s)) for s in (1, 2)]
    assert texts[0] != texts[1], texts
    assert not greedy.startswith(texts[0]) or not greedy.startswith(texts[1]), texts


# --- truncation samplers: each, set to its extreme, leaves only the greedy token --------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"top_p": 0.01}, id="top_p"),
        pytest.param({"extra_body": {"top_k": 1}}, id="top_k"),
        pytest.param({"extra_body": {"min_p": 1.0}}, id="min_p"),
    ],
)
def test_truncation_to_one_token_is_greedy(cold_client: openai.OpenAI, greedy: str, kwargs: dict[str, Any]) -> None:
    for seed in (1, 2):
        assert text_of(chat(cold_client, max_tokens=SHORT, temperature=1.5, seed=seed, **kwargs)) == greedy


# --- penalties ------------------------------------------------------------------------------------------------
def test_repetitive_prompt_repeats(repetitive: str) -> None:
    assert hellos(repetitive) >= 3, repetitive


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"extra_body": {"repetition_penalty": 2.0}}, id="repetition_penalty"),
        pytest.param({"presence_penalty": 2.0}, id="presence_penalty"),
        pytest.param({"frequency_penalty": 2.0}, id="frequency_penalty"),
    ],
)
def test_penalty_reduces_repetition(client: openai.OpenAI, repetitive: str, kwargs: dict[str, Any]) -> None:
    kwargs = dict(kwargs)
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    text = complete(client, REPEAT, max_tokens=24, temperature=0, extra_body=extra, **kwargs)
    assert text != repetitive
    assert hellos(text) < hellos(repetitive), text


# --- logit_bias -----------------------------------------------------------------------------------------------
def test_logit_bias_ban_changes_first_token(cold_client: openai.OpenAI, http: httpx.Client, greedy: str) -> None:
    first = tokens_of(http, greedy)[0]
    assert greedy.startswith(piece(http, first))
    text = text_of(chat(cold_client, max_tokens=SHORT, temperature=0, logit_bias={str(first): -100}))
    assert text != greedy
    assert tokens_of(http, text)[0] != first, text


def test_logit_bias_force_token(client: openai.OpenAI, http: httpx.Client) -> None:
    [banana] = tokens_of(http, " banana")
    r = chat(client, max_tokens=4, temperature=0, logit_bias={str(banana): 100})
    assert text_of(r) == piece(http, banana) * 4


def test_logit_bias_force_token_when_sampling(client: openai.OpenAI, http: httpx.Client) -> None:
    [banana] = tokens_of(http, " banana")
    r = chat(client, max_tokens=3, temperature=1.0, seed=9, logit_bias={str(banana): 100})
    assert text_of(r) == piece(http, banana) * 3


# --- /v1/completions: echo and prompt forms -------------------------------------------------------------------
COMPLETION_PROMPT = "The capital of France is"


@pytest.fixture
def completion_greedy(cold_client: openai.OpenAI) -> str:
    r = cold_client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=6, temperature=0)
    assert r.choices[0].text
    return r.choices[0].text


def test_completions_echo(cold_client: openai.OpenAI, completion_greedy: str) -> None:
    r = cold_client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == COMPLETION_PROMPT + completion_greedy


def test_completions_prompt_list(cold_client: openai.OpenAI, completion_greedy: str) -> None:
    prompts = [COMPLETION_PROMPT, "One, two, three,"]
    r = cold_client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == completion_greedy
    assert r.choices[1].text and r.choices[1].text != completion_greedy
    assert r.usage is not None and r.usage.completion_tokens <= 12


def test_completions_prompt_list_with_n(cold_client: openai.OpenAI, completion_greedy: str) -> None:
    r = cold_client.completions.create(
        model=MODEL, prompt=[COMPLETION_PROMPT, "One, two, three,"], n=2, max_tokens=6, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == completion_greedy
    assert r.choices[2].text == r.choices[3].text != completion_greedy


def test_completions_prompt_token_ids(cold_client: openai.OpenAI, http: httpx.Client, completion_greedy: str) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": COMPLETION_PROMPT})
    ids = r.json()["tokens"]
    c = cold_client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert c.choices[0].text == completion_greedy
    assert c.usage is not None and c.usage.prompt_tokens == len(ids)


def test_completions_prompt_token_id_lists(
    cold_client: openai.OpenAI, http: httpx.Client, completion_greedy: str
) -> None:
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": COMPLETION_PROMPT}).json()["tokens"]
    c = cold_client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [ch.text for ch in c.choices] == [completion_greedy, completion_greedy]


def test_a_reset_prefix_cache_answers_as_a_fresh_server(cold_server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": POEM}], "max_tokens": SAMPLED, "seed": 3}
    with start_server("--parallel", "4") as fresh:
        expected = fresh.http().post("/v1/chat/completions", json=body).json()
    http = cold_server.http()
    warm = http.post("/v1/chat/completions", json=body).json()
    assert http.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    cold_server.reset_prefix_cache(ADMIN)
    after = http.post("/v1/chat/completions", json=body).json()
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # nothing cached any more
    assert after["choices"] == expected["choices"] == warm["choices"]
    reset = f"{cold_server.base_url}/admin/engine/reset-prefix-cache"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with http.stream(
        "POST", "/v1/chat/completions", json={**body, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    ) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)  # generating
        busy = httpx.post(reset, headers=admin)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "engine_busy", busy.text
