"""Every model this server serves, under each of its names: the one place a route asks which model a name means
and how that model is served. A local model and an upstream one answer the same calls (`Serving`), so no route
branches on the kind of backend."""

from __future__ import annotations

from typing import Any, Protocol

from llamaserve.billing.pricing import Price
from llamaserve.billing.store import Caller
from llamaserve.protocol.chat import ChatCompletionRequest
from llamaserve.protocol.completions import CompletionRequest
from llamaserve.protocol.errors import APIError
from llamaserve.protocol.models import ModelCard, ModelPricing
from llamaserve.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from llamaserve.registry import Registry
from llamaserve.serving.admission import Call, check_model_allowed
from llamaserve.serving.local import LocalServing
from llamaserve.serving.reply import Reply
from llamaserve.serving.upstream import UpstreamServing


class Serving(Protocol):
    """How a model is served: each call validates, admits (serving/admission.py) and runs one request."""

    @property
    def id(self) -> str: ...

    async def chat(self, body: ChatCompletionRequest, call: Call) -> Reply: ...

    async def completion(self, body: CompletionRequest, call: Call) -> Reply: ...

    async def tokenize(self, body: TokenizeRequest, call: Call) -> dict[str, Any]: ...

    async def detokenize(self, body: DetokenizeRequest, call: Call) -> dict[str, Any]: ...


class ModelDirectory:
    def __init__(
        self,
        local: LocalServing | None,
        local_aliases: tuple[str, ...],
        upstreams: list[UpstreamServing],
        registry: Registry | None,
        created: int,
    ) -> None:
        self.local, self.upstreams, self.registry, self.created = local, upstreams, registry, created
        self._by_name: dict[str, Serving] = {}
        if local is not None:
            self._by_name.update(dict.fromkeys((local.id, *local_aliases), local))
        for upstream in upstreams:
            for name in (upstream.spec.id, *upstream.spec.aliases):
                self._by_name.setdefault(name, upstream)

    def served(self, name: str) -> bool:
        return name in self._by_name

    def resolve(self, name: str | None, caller: Caller) -> Serving:
        """The model `name` (id or alias; None: the local model) means, if the caller's key may use it: 404
        listing what exists, or 403."""
        serving = self.local if name is None else self._by_name.get(name)
        if serving is None:
            raise self._not_found(name)
        check_model_allowed(caller, serving.id)
        return serving

    def _not_found(self, name: str | None) -> APIError:
        available = ", ".join(sorted(self._by_name))
        return APIError(
            404,
            f"The model '{name}' does not exist. Available: {available}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )

    def cards(self, price: Price | None) -> list[ModelCard]:
        """The registry's models with their aliases and capabilities, or the one local model (`price`: the
        platform's, if it keeps accounts)."""
        if self.registry is not None:
            return [ModelCard.model_validate(spec.card(self.created)) for spec in self.registry.models]
        return [self._local_card(self.local, price)] if self.local is not None else []

    def card(self, name: str, price: Price | None) -> ModelCard:
        spec = self.registry.resolve(name) if self.registry is not None else None
        if spec is not None:
            return ModelCard.model_validate(spec.card(self.created))
        if self.local is None or self._by_name.get(name) is not self.local:
            raise self._not_found(name)
        return self._local_card(self.local, price)

    def _local_card(self, local: LocalServing, price: Price | None) -> ModelCard:
        """The local model served without a registry: priced at the platform's prices, if it keeps accounts."""
        model = local.model
        capabilities = sorted({"tools", "json", "logprobs"} | ({"vision"} if model.vision else set()))
        return ModelCard(
            id=model.id,
            created=self.created,
            owned_by="llamaserve",
            max_model_len=model.max_model_len,
            capabilities=capabilities,
            pricing=ModelPricing(**price.per_million_credits()) if price is not None else None,
        )
