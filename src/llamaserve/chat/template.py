"""Render chat messages to a prompt with the model's own Jinja2 chat template (from the GGUF metadata).

Templates come from model files, so they run in Jinja2's immutable sandbox: no attribute access to Python
internals, no mutation of our objects.
"""

from __future__ import annotations

import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# For GGUFs without a template: ChatML, which most small instruct models use.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The template refused the conversation (e.g. raise_exception for an unsupported role order)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Templates that take `tools` render definitions, calls and results themselves; for the others we
        # write them into the messages (chat/tools.py).
        self.renders_tools = "tools" in self.source
        self.typed_content = self._wants_typed_content()

    def _wants_typed_content(self) -> bool:
        """Whether the template reads a message's content only as a list of typed parts
        (`[{"type": "text", "text": ...}]`), as some vision models' templates do (SmolVLM's iterates over the
        content and prints nothing of a string): a probe text shows in its output only when given as a part."""
        probe = "llamaserve-probe-b7d1"
        try:
            if probe in self.render([{"role": "user", "content": probe}]):
                return False
            return probe in self.render([{"role": "user", "content": [{"type": "text", "text": probe}]}])
        except Exception:  # a template that fails on a lone user message: find out at the first request
            return False

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template failed on these messages: {e}") from e
