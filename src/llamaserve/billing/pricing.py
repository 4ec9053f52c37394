"""Prices per token, in integer micro-credits."""

from __future__ import annotations

from dataclasses import dataclass

from llamaserve.billing.models import MICRO

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    input_per_million: int  # micro-credits per million prompt tokens
    output_per_million: int  # micro-credits per million completion tokens

    @classmethod
    def from_credits(cls, input_per_million: float, output_per_million: float) -> Price:
        """From credits per million tokens, the way price lists state them (e.g. 3.5 for $3.50/M)."""
        return cls(round(input_per_million * MICRO), round(output_per_million * MICRO))

    def per_million_credits(self) -> dict[str, float]:
        """The price as /v1/models shows it: credits (not micro-credits) per million tokens."""
        return {
            "input_credits_per_million_tokens": self.input_per_million / MICRO,
            "output_credits_per_million_tokens": self.output_per_million / MICRO,
        }

    def discounted(self, discount: float) -> Price:
        """This price less `discount` (0.5: half price), rounded down per million tokens."""
        keep = 1 - discount
        return Price(int(self.input_per_million * keep), int(self.output_per_million * keep))

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-credits for a request, rounded up: never a free fraction."""
        total = prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        return -(-total // PER_MILLION)


def format_credits(micro: int) -> str:
    return f"{micro / MICRO:.6f}"


def parse_credits(text: str) -> int:
    """'12.5' credits → micro-credits, exactly (no float rounding)."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text) * MICRO
    except InvalidOperation as e:
        raise ValueError(f"not an amount of credits: {text!r}") from e
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimals")
    return int(value)
