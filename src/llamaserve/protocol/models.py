"""GET /v1/models and GET /v1/models/{id}: OpenAI's model objects, with what a registry adds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelPricing(BaseModel):
    input_credits_per_million_tokens: float = Field(description="Credits per million prompt tokens.")
    output_credits_per_million_tokens: float = Field(description="Credits per million completion tokens.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int = Field(description="The context length in tokens.")
    aliases: list[str] | None = Field(default=None, description="Other names that route to this model.")
    capabilities: list[str] | None = None
    pricing: ModelPricing | None = Field(default=None, description="What it costs, where accounts are kept.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
