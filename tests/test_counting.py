"""Token counts for upstream models that report none: exact with the model's vocabulary (a vocabulary-only load of
a GGUF), checked against Meta's reference for Llama 3.1 prompts; estimated, and marked so, without one."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaserve.backends.counting import Count, TokenCounter
from llamaserve.engine import LlamaError
from tests.data.llama3_dialogs import DIALOGS
from tests.test_llama3_format import ChatFormat, Tokenizer, meta_dialog_tokens
from tests.tiny_llama3 import tiny_llama3_gguf


@pytest.fixture(scope="module")
def meta() -> ChatFormat:
    return ChatFormat(Tokenizer.get_instance())


@pytest.fixture(scope="module")
def llama3_counter() -> Iterator[TokenCounter]:
    """The tiny Llama 3 GGUF's vocabulary (Meta's), loaded without weights, counting in Meta's chat format."""
    counter = TokenCounter.load("llama", str(tiny_llama3_gguf()), "llama3")
    yield counter
    counter.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in DIALOGS])
def test_prompt_counts_equal_metas_reference(
    llama3_counter: TokenCounter,
    meta: ChatFormat,
    case: dict[str, Any],
) -> None:
    """The request body as a gateway forwards it (OpenAI's JSON: tools, tool_choice, tool calls) counts as many
    tokens as Meta's own encoding of the dialog (dated today on both sides)."""
    payload = {k: case[k] for k in ("messages", "tools", "tool_choice") if k in case}
    assert llama3_counter.prompt(payload) == Count(len(meta_dialog_tokens(case, meta)), estimated=False)


def test_completion_counts_equal_metas_tokenizer(
    llama3_counter: TokenCounter,
    meta: ChatFormat,
) -> None:
    texts = ["Crimson red.", '{"city": "Paris"}', "<|eot_id|> as text", "naïve café 日本語 🤖"]
    expected = sum(len(meta.tokenizer.encode(t, bos=False, eos=False)) for t in texts)
    assert llama3_counter.completion(texts) == Count(expected, estimated=False)


def test_completions_prompts_in_every_form(llama3_counter: TokenCounter, meta: ChatFormat) -> None:
    text = "The sky is"
    one = len(meta.tokenizer.encode(text, bos=True, eos=False))
    assert llama3_counter.prompt({"prompt": text}).tokens == one
    assert llama3_counter.prompt({"prompt": [text, text]}).tokens == 2 * one
    assert llama3_counter.prompt({"prompt": [1, 2, 3]}).tokens == 3
    assert llama3_counter.prompt({"prompt": [[1, 2], [3]]}).tokens == 3


def test_without_a_tokenizer_counts_are_estimates() -> None:
    counter = TokenCounter()
    messages = [{"role": "user", "content": "Name a colour."}]
    assert counter.prompt({"messages": messages}) == Count(math.ceil(14 / 4) + 8, estimated=True)
    assert counter.completion(["Crimson red.", "ab"]) == Count(3 + 1, estimated=True)


def test_an_image_prompt_is_estimated_even_with_a_tokenizer(llama3_counter: TokenCounter) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    assert llama3_counter.prompt({"messages": messages}).estimated


def test_a_file_that_is_no_gguf_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    path.write_text("not a model")
    with pytest.raises(LlamaError):
        TokenCounter.load("m", str(path), "template")
