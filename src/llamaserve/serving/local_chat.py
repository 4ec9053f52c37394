"""Chat completions on the local engine: check the request, render its prompt (tools, images, grammars) off the
event loop when large, admit it, run it, and answer or stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from llamaserve.backends.local import ChatPrompt, LocalModel
from llamaserve.chat.grammar import Grammar, SchemaError, json_object_grammar, json_schema_grammar
from llamaserve.chat.images import Image, ImageLimits
from llamaserve.chat.llama3 import Llama3FormatError
from llamaserve.chat.template import TemplateError
from llamaserve.chat.tools import Llama3Format, ToolFormat, ToolStream, assembled, parameters_schema
from llamaserve.engine import RequestHandle, SamplingParams
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.engine.mtmd import RGBImage
from llamaserve.protocol.chat import ChatCompletionRequest, ChatMessage, ImagePart, NamedToolChoice, TextPart
from llamaserve.protocol.errors import invalid
from llamaserve.serving.admission import Call
from llamaserve.serving.generation import (
    ChoiceResult,
    LocalSetup,
    chat_work,
    check_prompt_bytes,
    check_sampling,
    collect,
    completion_budget,
    engine_error,
    prompt_work,
    refuse_when_full,
    streamed,
    submit,
    text_bytes,
)
from llamaserve.serving.images import RequestImages, image_refused
from llamaserve.serving.logprobs import LegacyLogprobs, chat_logprobs
from llamaserve.serving.reply import SSE_DONE, Reply, new_id, sse, usage


@dataclasses.dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    prompt: ChatPrompt
    params: SamplingParams
    tool_format: ToolFormat | None = None  # set when the model may (or must) call a tool
    forced: bool = False  # tool_choice "required" or a named function: the grammar writes a call


# --- validation and planning ----------------------------------------------------------------------------------
Images = dict[tuple[int, int], Image]  # (message, part) -> the decoded image


def plan_chat(body: ChatCompletionRequest, model: LocalModel, images: Images | None = None) -> ChatPlan:
    """With images (loaded by load_images), this tokenizes them too (mtmd resizes them): run it off the event
    loop then."""
    check_sampling(body, model)
    check_images(body, model)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    if images and body.echo and body.logprobs:
        raise invalid("echo with logprobs is not available for prompts with images", "echo")
    tools, tool_format, tool_grammar = _plan_tools(body, model)
    grammar = _response_grammar(body)
    if grammar is not None and tool_grammar is not None:
        raise invalid("response_format cannot be combined with a forced tool call (tool_choice)", "response_format")
    grammar = grammar or tool_grammar
    if grammar is not None and body.ignore_eos:
        raise invalid("ignore_eos cannot be combined with structured output or forced tool calls", "ignore_eos")
    choice = body.tool_choice
    choice_name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    try:
        prompt = model.render_chat(template_messages(body.messages, images), tools=tools, tool_choice=choice_name)
    except (TemplateError, Llama3FormatError) as e:
        raise invalid(str(e), "messages") from e
    fields = body.model_copy(update={"max_tokens": body.max_completion_tokens or body.max_tokens})
    n_top = (body.top_logprobs or 0) if body.logprobs else None
    params = dataclasses.replace(
        fields.sampling_params(model.config.default_max_tokens),
        logprobs=n_top,
        prompt_logprobs=n_top if body.echo else None,
        grammar=grammar,
        special_text=isinstance(tool_format, Llama3Format),
    )
    return ChatPlan(prompt, params, tool_format, tool_grammar is not None)


def _image_parts(messages: list[ChatMessage]) -> list[tuple[int, int, ImagePart]]:
    return [
        (i, j, part)
        for i, m in enumerate(messages)
        if isinstance(m.content, list)
        for j, part in enumerate(m.content)
        if isinstance(part, ImagePart)
    ]


def check_images(body: ChatCompletionRequest, model: LocalModel) -> None:
    """A model without a vision projector refuses the first image part."""
    if model.vision:
        return
    for i, j, _ in _image_parts(body.messages)[:1]:
        raise image_refused(model.id, f"messages[{i}].content[{j}]")


async def load_images(body: ChatCompletionRequest, model: LocalModel, limits: ImageLimits) -> Images:
    """Fetch (under the deployment's limits and address rules) and decode every image part."""
    check_images(body, model)
    parts = [((i, j), f"messages[{i}].content[{j}]", part) for i, j, part in _image_parts(body.messages)]
    request_images = RequestImages([where for _, where, _ in parts], limits)
    return {key: await request_images.load(part.image_url.url, where) for key, where, part in parts}


def _response_grammar(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_grammar()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise invalid("response_format of type json_schema needs json_schema.schema", "response_format.json_schema")
    where = "response_format.json_schema.schema"
    try:
        return json_schema_grammar(fmt.json_schema.schema_, where)
    except SchemaError as e:
        raise invalid(str(e), where, code="unsupported_schema") from e


def _plan_tools(
    body: ChatCompletionRequest, model: LocalModel
) -> tuple[list[dict[str, Any]] | None, ToolFormat | None, str | None]:
    """The tools to show the model, the format to read calls in, and the grammar of a forced call."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none":
            raise invalid("tool_choice requires tools", "tool_choice")
        return None, None, None
    names = [t.function.name for t in body.tools]
    for i, tool in enumerate(body.tools):
        if names.index(tool.function.name) != i:
            raise invalid(f"tools has more than one function named {tool.function.name!r}", f"tools[{i}]")
        where = f"tools[{i}].function.parameters"
        schema = parameters_schema(tool.function.model_dump())
        if schema.get("type", "object") != "object" or not isinstance(schema.get("properties", {}), dict):
            raise invalid("function parameters must be a JSON schema of type object", where)
        try:
            Grammar().schema(schema, "args", where)
        except SchemaError as e:
            raise invalid(str(e), where, code="unsupported_schema") from e
    if choice == "none":
        return None, None, None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice == "auto":
        return tools, model.tool_format, None
    picked = list(range(len(tools)))
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not among tools", "tool_choice")
        picked = [names.index(choice.function.name)]
    where = [f"tools[{i}].function.parameters" for i in picked]
    grammar = model.tool_format.call_grammar([tools[i] for i in picked], where)
    return tools, model.tool_format, grammar


def template_messages(messages: list[ChatMessage], images: Images | None = None) -> list[dict[str, Any]]:
    """Messages as the renderers take them: content a string, None, or a list of text parts and image parts
    `{"type": "image", "image": RGBImage}` (from `images`, which must hold every image part)."""
    out = []
    for i, m in enumerate(messages):
        content: Any = m.content if m.content is not None else ""
        if isinstance(content, list):
            content = [_template_part(part, (i, j), images) for j, part in enumerate(content)]
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _template_part(part: TextPart | ImagePart, where: tuple[int, int], images: Images | None) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if images is None or where not in images:
        raise invalid("image parts are not accepted by this endpoint", f"messages[{where[0]}].content[{where[1]}]")
    image = images[where]
    return {"type": "image", "image": RGBImage(image.rgb, image.width, image.height)}


# --- serving ---------------------------------------------------------------------------------------------------
async def create_chat(local: LocalSetup, body: ChatCompletionRequest, call: Call) -> Reply:
    model = local.model
    check_sampling(body, model)  # cheap refusals before any image is fetched
    size = text_bytes(m.text() for m in body.messages)  # the rendered prompt holds at least these bytes
    check_prompt_bytes(model, size, "messages")
    # Admitted once its prompt is tokenized (images included); a key over its rate limits gets its 429 before
    # any of that work (images fetched, the prompt rendered, grammars built).
    await local.gate.check(call.caller, 1)
    images = await load_images(body, model, local.image_limits)
    if images:  # mtmd tokenizes (and resizes) the images too
        plan = await asyncio.to_thread(plan_chat, body, model, images)
    else:
        fmt = body.response_format
        schemas = bool(body.tools) or (fmt is not None and fmt.type == "json_schema")
        plan = await prompt_work(chat_work(size, body.messages, schemas), plan_chat, body, model)
    # The hold is sized from the tokenized prompt, image tokens included.
    n_prompt = plan.prompt.n_tokens
    budget = completion_budget(model, [n_prompt], plan.params, body.n)
    refuse_when_full(model, body.n)
    admission = await local.gate.admit(call, model.id, n_prompt, budget, local.price)
    [handle] = submit(model, [plan.prompt.engine_input], plan.params, body.n, "messages", admission)
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": model.id}
    if body.stream:
        return streamed(ChatStream(model, plan, body, handle, head).events(), [handle], admission)
    results = await collect(call, [handle], body.n, admission)
    response: dict[str, Any] = {
        **head,
        "object": "chat.completion",
        "choices": [_choice(model, plan, body, i, r) for i, r in enumerate(results)],
        "usage": usage(handle.prompt_tokens, handle.completion_tokens, handle.cached_tokens),
    }
    if body.echo:
        response["prompt"] = [_echo(model, plan.prompt.text, results[0].prompt_logprobs)]
    return Reply(admission.headers, body=response)


def _choice(model: LocalModel, plan: ChatPlan, body: ChatCompletionRequest, i: int, r: ChoiceResult) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": r.text, "tool_calls": []}
    reason = r.finish_reason
    if plan.tool_format is not None:  # read as its stream would be: the same calls, cut ones included
        stream = ToolStream(plan.tool_format, plan.forced)
        content, calls = assembled(stream.feed(r.text) + stream.finish(cut=reason == "length"))
        message = {"role": "assistant", "content": content if calls else content or "", "tool_calls": calls}
        if calls and reason == "stop":
            reason = "tool_calls"
    logprobs = {"content": chat_logprobs(model.llama, r.logprobs)} if body.logprobs else None
    return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}


def _echo(model: LocalModel, prompt_text: str, prompt_logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
    """The rendered prompt, as Together's `echo` returns it, with its logprobs when asked."""
    logprobs = LegacyLogprobs(model.llama)(prompt_logprobs) if prompt_logprobs is not None else None
    return {"text": prompt_text, "logprobs": logprobs}


class ChatStream:
    """The SSE events of one streamed chat completion."""

    def __init__(
        self, model: LocalModel, plan: ChatPlan, body: ChatCompletionRequest, handle: RequestHandle, head: dict
    ) -> None:
        self.model, self.plan, self.body, self.handle, self.head = model, plan, body, handle, head
        fmt = plan.tool_format
        self.tool_streams = [ToolStream(fmt, plan.forced) for _ in range(body.n)] if fmt else None
        self.held_logprobs: list[list[TokenLogprob]] = [[] for _ in range(body.n)]

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        data: dict[str, Any] = {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}
        if self.body.include_usage and "usage" not in extra:
            data["usage"] = None
        return sse(data)

    def delta(self, index: int, delta: dict[str, Any], logprobs: list[TokenLogprob], reason: str | None) -> str:
        lp = {"content": chat_logprobs(self.model.llama, logprobs)} if self.body.logprobs else None
        return self.chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])

    async def events(self) -> AsyncIterator[str]:
        handle, body = self.handle, self.body
        try:
            for i in range(handle.n):
                yield self.delta(i, {"role": "assistant", "content": ""}, [], None)
            echo_pending = body.echo
            if echo_pending and not body.logprobs:
                yield self.chunk([], prompt=[_echo(self.model, self.plan.prompt.text, None)])
                echo_pending = False
            async for out in handle.outputs():
                if out.error:
                    yield sse(engine_error(out).body.model_dump())
                    return
                if echo_pending and out.prompt_logprobs is not None:
                    yield self.chunk([], prompt=[_echo(self.model, self.plan.prompt.text, out.prompt_logprobs)])
                    echo_pending = False
                for event in self._output_events(out.choice, out.text, out.logprobs or [], out.finish_reason):
                    yield event
            if body.include_usage:
                u = usage(handle.prompt_tokens, handle.completion_tokens, handle.cached_tokens)
                yield self.chunk([], usage=u)
            yield SSE_DONE
        finally:
            handle.close()

    def _output_events(self, c: int, text: str, logprobs: list[TokenLogprob], reason: str | None) -> list[str]:
        streams = self.tool_streams
        if streams is None:
            deltas = [{"content": text}] if text else []
        else:
            deltas = streams[c].feed(text) + (streams[c].finish(cut=reason == "length") if reason else [])
            if reason == "stop" and streams[c].calls:
                reason = "tool_calls"
        held = self.held_logprobs[c] + logprobs
        events = []
        for delta in deltas:
            events.append(self.delta(c, delta, held, None))
            held = []
        if reason is not None:
            events.append(self.delta(c, {}, held, reason))
            held = []
        self.held_logprobs[c] = held
        return events
