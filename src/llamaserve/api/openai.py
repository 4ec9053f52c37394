"""The OpenAI-compatible model listing, and vLLM-style /tokenize and /detokenize (for an upstream model, asked of
its upstream). On `serve` all of them take an API key, as every route that makes a model work: tokenizing a long
prompt costs CPU like a request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llamaserve.api.chat import template_messages
from llamaserve.api.common import chat_work, check_prompt_bytes, prompt_work, text_bytes
from llamaserve.api.common import get_model as lookup_model
from llamaserve.api.inference import inference_route
from llamaserve.api.platform import CallerDep, check_model_allowed, count_request
from llamaserve.api.proxy import find_upstream
from llamaserve.backends.local import LocalModel
from llamaserve.billing.store import Caller
from llamaserve.chat.llama3 import Llama3FormatError
from llamaserve.chat.template import TemplateError
from llamaserve.protocol.errors import invalid
from llamaserve.protocol.models import ModelCard, ModelList, ModelPricing
from llamaserve.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from llamaserve.registry import Registry

router = APIRouter()


# --- models, tokenize -----------------------------------------------------------------------------------------
def _model_card(request: Request, model: LocalModel) -> ModelCard:
    """The local model served without a registry: priced at the platform's prices, if it keeps accounts."""
    capabilities = sorted({"tools", "json", "logprobs"} | ({"vision"} if model.vision else set()))
    platform = request.app.state.platform
    return ModelCard(
        id=model.id,
        created=request.app.state.started,
        owned_by="llamaserve",
        max_model_len=model.max_model_len,
        capabilities=capabilities,
        pricing=ModelPricing(**platform.price.per_million_credits()) if platform is not None else None,
    )


@router.get("/v1/models", response_model_exclude_none=True)
async def list_models(request: Request, caller: CallerDep) -> ModelList:
    """The registry's models with their aliases and capabilities, or the one local model."""
    registry: Registry | None = request.app.state.registry
    created = request.app.state.started
    if registry is not None:
        return ModelList(data=[ModelCard.model_validate(spec.card(created)) for spec in registry.models])
    return ModelList(data=[_model_card(request, request.app.state.model)])


@router.get("/v1/models/{model_id:path}", response_model_exclude_none=True)
async def get_model_card(model_id: str, request: Request, caller: CallerDep) -> ModelCard:
    registry: Registry | None = request.app.state.registry
    spec = registry.resolve(model_id) if registry is not None else None
    if spec is not None:
        return ModelCard.model_validate(spec.card(request.app.state.started))
    return _model_card(request, lookup_model(request, model_id))


async def _forwarded(request: Request, caller: Caller, body: TokenizeRequest | DetokenizeRequest) -> Any:
    """The answer of the upstream of the model `body` names, for /tokenize and /detokenize (vLLM serves both at
    its root, beside /v1), or None when the model is not an upstream one. Only it knows that model's tokenizer."""
    model = find_upstream(request.app.state, body.model) if body.model is not None else None
    if model is None:
        return None
    check_model_allowed(caller, model.spec.id)
    payload = body.model_dump(exclude_unset=True)
    endpoint = request.url.path.strip("/")  # tokenize | detokenize, at the upstream's root
    _, reply = await model.router.open(endpoint, payload, False, request.state.request_id)
    return JSONResponse(reply.json())


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, caller: CallerDep) -> Any:
    await count_request(request, caller)  # tokenizing costs CPU: one of the key's requests a minute
    if (forwarded := await _forwarded(request, caller, body)) is not None:
        return forwarded
    model = lookup_model(request, body.model)
    check_model_allowed(caller, model.id)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        size = text_bytes(m.text() for m in body.messages)
        check_prompt_bytes(model, size, "messages")
        try:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            messages = template_messages(body.messages)
            work = chat_work(size, body.messages, bool(body.tools))
            prompt = await prompt_work(work, model.render_chat, messages, body.add_generation_prompt, tools)
        except (TemplateError, Llama3FormatError) as e:
            raise invalid(str(e), "messages") from e
        tokens = prompt.tokens
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        text = body.prompt or ""
        check_prompt_bytes(model, text_bytes([text]), "prompt")
        tokens = await prompt_work(text_bytes([text]), model.tokenize_text, text, add_special)
    response = TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=model.max_model_len)
    return JSONResponse(response.model_dump())


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, caller: CallerDep) -> Any:
    await count_request(request, caller)
    if (forwarded := await _forwarded(request, caller, body)) is not None:
        return forwarded
    model = lookup_model(request, body.model)
    check_model_allowed(caller, model.id)
    if any(not model.llama.is_valid_token(t) for t in body.tokens):
        raise invalid(f"token ids must be in 0..{model.llama.n_vocab - 1}", "tokens")
    text = await prompt_work(len(body.tokens) * 4, model.detokenize, body.tokens)  # a token is ~4 bytes of text
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())


# POSTs are answered by InferenceMiddleware: their bodies (tools' schemas, long token lists) are checked off the
# event loop when large.
tokenize_route = inference_route("/tokenize", TokenizeRequest, tokenize)
detokenize_route = inference_route("/detokenize", DetokenizeRequest, detokenize)
