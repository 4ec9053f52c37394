"""The OpenAI-compatible model listing, and vLLM-style /tokenize and /detokenize (asked of the model's backend:
an upstream model's tokenizer is its upstream's). On `serve` all of them take an API key, as every route that
makes a model work: tokenizing a long prompt costs CPU like a request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llamaserve.api.openai.calls import call_of, models_of
from llamaserve.api.openai.inference import InferenceRoute
from llamaserve.api.platform.keys import CallerDep, platform_of
from llamaserve.billing.pricing import Price
from llamaserve.protocol.models import ModelCard, ModelList
from llamaserve.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()
tokenize_router = APIRouter(route_class=InferenceRoute)  # bodies of tools' schemas, long token lists


def _price(request: Request) -> Price | None:
    platform = platform_of(request)
    return platform.price if platform is not None else None


@router.get("/v1/models", response_model_exclude_none=True)
async def list_models(request: Request, caller: CallerDep) -> ModelList:
    """The registry's models with their aliases and capabilities, or the one local model."""
    return ModelList(data=models_of(request).cards(_price(request)))


@router.get("/v1/models/{model_id:path}", response_model_exclude_none=True)
async def get_model_card(model_id: str, request: Request, caller: CallerDep) -> ModelCard:
    return models_of(request).card(model_id, _price(request))


@tokenize_router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, caller: CallerDep) -> Any:
    serving = models_of(request).resolve(body.model, caller)
    return JSONResponse(await serving.tokenize(body, call_of(request, caller)))


@tokenize_router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, caller: CallerDep) -> Any:
    serving = models_of(request).resolve(body.model, caller)
    return JSONResponse(await serving.detokenize(body, call_of(request, caller)))
