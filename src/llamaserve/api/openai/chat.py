"""POST /v1/chat/completions, and Segmind's form of it with the model in the path (POST /v1/{model}), on whichever
backend serves the model."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Scope

from llamaserve.api.openai.calls import call_of, models_of
from llamaserve.api.openai.idempotency import idempotent
from llamaserve.api.openai.inference import InferenceRoute, json_body
from llamaserve.api.platform.keys import CallerDep, require_caller
from llamaserve.protocol.chat import ChatCompletion, ChatCompletionRequest, PathChatRequest
from llamaserve.protocol.errors import invalid

router = APIRouter(route_class=InferenceRoute)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: CallerDep) -> Any:
    serving = models_of(request).resolve(body.model, caller)
    call = call_of(request, caller)
    return await idempotent(request, call, lambda: serving.chat(body, call))


class ServedModelRoute(APIRoute):
    """A route whose path parameter `model` matches only the names of models served here, so that any other path
    under /v1 stays a 404, for every method, as before this route existed."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and not scope["app"].state.models.served(child["path_params"]["model"]):
            return Match.NONE, {}
        return match, child


# Included after every other router: its one path segment must not shadow theirs.
by_path_router = APIRouter(route_class=ServedModelRoute)


@by_path_router.post("/v1/{model}", response_model=ChatCompletion, summary="Chat completion, model in the path")
async def chat_completions_by_path(model: str, body: PathChatRequest, request: Request, caller: CallerDep) -> Any:
    """Segmind's form of the same endpoint: `POST /v1/llama-v3p1-405b-instruct` with the chat body, `model` left
    out (or naming the same model). A name no model has is no such path: 404."""
    if body.model is not None and body.model != model:
        raise invalid(f"the body's model {body.model!r} differs from the path's {model!r}", "model")
    body.model = model
    return await chat_completions(body, request, caller)


async def unknown_model_by_path(request: Request) -> None:
    """Segmind's form with a name no model has: a chat body (`messages`) posted to `/v1/<name>` is answered, once
    its key is checked, with 404 model_not_found listing the served models. Any other unknown path stays the
    route's 404."""
    if request.method != "POST" or not _ONE_SEGMENT.fullmatch(request.url.path):
        return
    try:
        body = await json_body(request)
    except (RequestValidationError, HTTPException):  # not JSON: no chat body
        return
    if not isinstance(body, dict) or "messages" not in body:
        return
    caller = await require_caller(request)
    models_of(request).resolve(request.url.path.removeprefix("/v1/"), caller)  # raises: no model has that name


_ONE_SEGMENT = re.compile(r"/v1/[^/]+")
