"""The `llamaserve` command."""

from __future__ import annotations

import asyncio
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llamaserve.billing.bootstrap import KEY_FILE, bootstrap, open_store
from llamaserve.billing.cli import DatabaseUrl, DataDir, accounts_app, credits_app, keys_app
from llamaserve.billing.pricing import format_credits, parse_credits
from llamaserve.config import ModelNotFound, PlatformConfig, ServeConfig, default_data_dir
from llamaserve.engine import LlamaError

if TYPE_CHECKING:
    from llamaserve.backends.local import LocalModel

app = typer.Typer(help="llamaserve: a self-hosted, OpenAI-compatible Llama API.", no_args_is_help=True)
console = Console(stderr=True)


class ChatFormatName(StrEnum):
    auto = "auto"
    llama3 = "llama3"
    template = "template"


app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")


@app.callback()
def main() -> None:
    """llamaserve: a self-hosted, OpenAI-compatible Llama API."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[str | None, typer.Option(help="GGUF file to serve (default: the embedded SmolLM2-135M).")] = None,
    model_id: Annotated[str | None, typer.Option(help="Model name clients use (default: from the file).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for llama.cpp.")] = max(1, os.cpu_count() or 1),
    parallel: Annotated[int, typer.Option(help="Sequences generated at once (engine slots).")] = 16,
    ctx: Annotated[int, typer.Option(help="Context of each slot in tokens (KV memory: ctx × parallel).")] = 4096,
    batch: Annotated[int, typer.Option(help="Most tokens per engine step (decode + prompt chunks).")] = 128,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 503.")] = 1024,
    chat_format: Annotated[
        ChatFormatName, typer.Option(help="Prompt format: llama3 (Meta's), template (the GGUF's), auto: detect.")
    ] = ChatFormatName.auto,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    redis_url: Annotated[
        str | None, typer.Option(envvar="LLAMASERVE_REDIS_URL", help="Share rate limits across replicas.")
    ] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar="LLAMASERVE_ADMIN_KEY", help="Turns on /admin/..., guarded by this key.")
    ] = None,
    starter_credits: Annotated[str, typer.Option(help="Credits of the account made at first start.")] = "10",
    price_input: Annotated[float, typer.Option(help="Credits per million prompt tokens.")] = 0.10,
    price_output: Annotated[float, typer.Option(help="Credits per million completion tokens.")] = 0.20,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a non-streaming request gets 504.")] = 600,
) -> None:
    """Serve the OpenAI-compatible API on one model with the continuous-batching engine."""
    import uvicorn

    from llamaserve.api.app import create_app

    config = ServeConfig(
        host=host,
        port=port,
        model=model,
        model_id=model_id,
        threads=threads,
        parallel=parallel,
        ctx=ctx,
        batch=batch,
        max_queue=max_queue,
        chat_format=chat_format.value,
        platform=PlatformConfig(
            data_dir=data_dir or default_data_dir(),
            database_url=database_url,
            redis_url=redis_url,
            admin_key=admin_key,
            starter_credits=parse_credits(starter_credits),
            price_input=price_input,
            price_output=price_output,
            request_timeout=request_timeout,
        ),
    )
    try:
        local = _load(config)
    except (ModelNotFound, LlamaError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    _first_start(config.platform)
    url = f"http://{host}:{port}"
    key_file = config.platform.data_dir / KEY_FILE
    console.print(
        f"[green]llamaserve ready[/green] at {url}/v1 · model [bold]{local.id}[/bold] "
        f"({parallel} slots, {local.max_model_len}-token context, {threads} threads)\n"
        f'  try: curl {url}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{local.id}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )
    uvicorn.run(create_app(local, config.platform), host=host, port=port, log_level="warning")


def _first_start(platform: PlatformConfig) -> None:
    """Migrate the store; on an empty one, create the default account and show its key, once."""

    async def prepare() -> str | None:
        store = await open_store(platform.url, platform.data_dir)
        try:
            return await bootstrap(store, platform.data_dir, platform.starter_credits)
        finally:
            await store.close()

    key = asyncio.run(prepare())
    if key is not None:
        console.print(
            f"first start: created account [bold]default[/bold] with {format_credits(platform.starter_credits)} "
            f"credits and an API key (shown once; also saved to {platform.data_dir / KEY_FILE}, mode 0600):\n"
            f"  {key}"
        )


def _load(config: ServeConfig) -> LocalModel:
    from llamaserve.backends.local import LocalModel

    with Progress(
        TextColumn("loading model"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("load", total=1.0)
        return LocalModel(config, on_progress=lambda p: progress.update(task, completed=p))


if __name__ == "__main__":
    app()
