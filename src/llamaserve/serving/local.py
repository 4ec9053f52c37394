"""The model served in this process, behind the same interface as an upstream one (serving/directory.py)."""

from __future__ import annotations

from typing import Any

from llamaserve.chat.llama3 import Llama3FormatError
from llamaserve.chat.template import TemplateError
from llamaserve.protocol.chat import ChatCompletionRequest
from llamaserve.protocol.completions import CompletionRequest
from llamaserve.protocol.errors import invalid
from llamaserve.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from llamaserve.serving.admission import Call
from llamaserve.serving.generation import LocalSetup, chat_work, check_prompt_bytes, prompt_work, text_bytes
from llamaserve.serving.local_chat import create_chat, template_messages
from llamaserve.serving.local_completions import create_completion
from llamaserve.serving.reply import Reply


class LocalServing(LocalSetup):
    @property
    def id(self) -> str:
        return self.model.id

    async def chat(self, body: ChatCompletionRequest, call: Call) -> Reply:
        return await create_chat(self, body, call)

    async def completion(self, body: CompletionRequest, call: Call) -> Reply:
        return await create_completion(self, body, call)

    async def tokenize(self, body: TokenizeRequest, call: Call) -> dict[str, Any]:
        await self.gate.count(call.caller)  # tokenizing costs CPU: one of the key's requests a minute
        model = self.model
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
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=model.max_model_len).model_dump()

    async def detokenize(self, body: DetokenizeRequest, call: Call) -> dict[str, Any]:
        await self.gate.count(call.caller)
        model = self.model
        if any(not model.llama.is_valid_token(t) for t in body.tokens):
            raise invalid(f"token ids must be in 0..{model.llama.n_vocab - 1}", "tokens")
        text = await prompt_work(len(body.tokens) * 4, model.detokenize, body.tokens)  # a token: ~4 bytes of text
        return DetokenizeResponse(prompt=text).model_dump()
