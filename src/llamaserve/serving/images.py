"""Image parts, for local and upstream models alike: fetched and decoded under the deployment's limits and
address rules (chat/images.py), each failure a 400 naming its part."""

from __future__ import annotations

from llamaserve.chat.images import Image, ImageBudget, ImageError, ImageLimits
from llamaserve.protocol.errors import APIError, invalid


class RequestImages:
    """The images of one request, at `places` (their parameter paths, in order): 400 at the first one past the
    count a request may hold, before anything is fetched."""

    def __init__(self, places: list[str], limits: ImageLimits) -> None:
        if len(places) > limits.max_images:
            where = places[limits.max_images]
            message = f"{where}: a request may hold at most {limits.max_images} images"
            raise invalid(message, where, code="too_many_images")
        self.budget = ImageBudget(limits)

    async def load(self, url: str, where: str) -> Image:
        try:
            return await self.budget.load(url)
        except ImageError as e:
            raise invalid(f"{where}: {e}", where, code=e.code) from e


def image_refused(model_id: str, where: str) -> APIError:
    """The 400 for an image part sent to a model without vision."""
    message = f"model {model_id} does not accept image input ({where} has an image_url part)"
    return invalid(message, where, code="image_input_not_supported")
