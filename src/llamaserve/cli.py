"""The `llamaserve` command."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llamaserve.billing.bootstrap import KEY_FILE, bootstrap, open_store
from llamaserve.billing.cli import DatabaseUrl, DataDir, accounts_app, credits_app, keys_app
from llamaserve.billing.pricing import format_credits, parse_credits
from llamaserve.chat.images import ImageLimits
from llamaserve.config import ModelNotFound, PlatformConfig, ServeConfig, default_data_dir
from llamaserve.engine import LlamaError
from llamaserve.logs import configure as configure_logging
from llamaserve.registry import Registry, RegistryError, load_registry

if TYPE_CHECKING:
    from llamaserve.api.runtime.lifecycle import Limits
    from llamaserve.backends.counting import TokenCounter
    from llamaserve.backends.local import LocalModel

app = typer.Typer(help="llamaserve: a self-hosted, OpenAI-compatible Llama API.", no_args_is_help=True)
console = Console(stderr=True)


class LogFormat(StrEnum):
    json = "json"
    text = "text"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


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


Host = Annotated[str, typer.Option(help="Address to listen on.")]
Port = Annotated[int, typer.Option(help="Port to listen on.")]
Model = Annotated[str | None, typer.Option(help="GGUF file to serve (default: the embedded SmolLM2-135M).")]
ModelId = Annotated[str | None, typer.Option(help="Model name clients use (default: from the file).")]
Threads = Annotated[int, typer.Option(help="CPU threads for llama.cpp.")]
Parallel = Annotated[int, typer.Option(help="Sequences generated at once (engine slots).")]
Ctx = Annotated[int, typer.Option(help="Context of each slot in tokens (KV memory: ctx × parallel).")]
Batch = Annotated[int, typer.Option(help="Most tokens per engine step (decode + prompt chunks).")]
FlashAttn = Annotated[
    bool,
    typer.Option(
        "--flash-attn/--no-flash-attn",
        help="llama.cpp's flash attention: faster, but a prompt served from the prefix cache may then answer "
        "differently from the same prompt computed afresh (docs/determinism.md).",
    ),
]
MaxQueue = Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 503.")]
Mmproj = Annotated[
    str | None,
    typer.Option(help="Vision projector GGUF for the model (llama.cpp mtmd, e.g. mmproj-*.gguf): accept images."),
]
Format = Annotated[
    ChatFormatName, typer.Option(help="Prompt format: llama3 (Meta's), template (the GGUF's), auto: detect.")
]
MaxBodyMb = Annotated[float, typer.Option(help="Largest request body accepted, in MB (larger: 413).")]
BodyTimeout = Annotated[float, typer.Option(help="Seconds a client may take to send its request body (then 408).")]
DrainTimeout = Annotated[float, typer.Option(help="On SIGTERM, seconds requests in flight may run before the stop.")]
WriteTimeout = Annotated[
    float, typer.Option(help="Seconds a client may read nothing of a response held up for it (then it is cut off).")
]
HeaderTimeout = Annotated[
    float, typer.Option(help="Seconds a connection may take to send a request's head (then 408 and closed).")
]
MaxConnections = Annotated[
    int,
    typer.Option(
        min=0,
        help="Connections held open at once; past it a new one closes the longest idle (0: the file-descriptor "
        "limit, raised to its hard limit, less 256).",
    ),
]
ImageAllow = Annotated[
    list[str] | None,
    typer.Option(help="A network image URLs may point into although not public, e.g. 10.1.0.0/16 (repeatable)."),
]
ImageMaxMb = Annotated[float, typer.Option(help="Largest image accepted, in MB.")]
SslCertfile = Annotated[
    Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM; chain included), with --ssl-keyfile.")
]
SslKeyfile = Annotated[Path | None, typer.Option(help="The private key (PEM) of --ssl-certfile.")]
ForwardedAllowIps = Annotated[
    str | None,
    typer.Option(
        help="Proxies (comma-separated addresses or networks) whose X-Forwarded-For/-Proto are believed; "
        "default: none, the peer's address is the client's"
    ),
]
LogFormatOpt = Annotated[
    LogFormat, typer.Option(help="Log lines on stderr: json (one object a line) or text. Bodies are never logged.")
]
LogLevelOpt = Annotated[
    LogLevel, typer.Option(help="Least level logged; info has one access-log line per request (probes: debug).")
]
CPUS = max(1, os.cpu_count() or 1)


@app.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    model: Model = None,
    model_id: ModelId = None,
    mmproj: Mmproj = None,
    threads: Threads = CPUS,
    parallel: Parallel = 16,
    ctx: Ctx = 4096,
    batch: Batch = 128,
    flash_attn: FlashAttn = False,
    max_queue: MaxQueue = 1024,
    chat_format: Format = ChatFormatName.auto,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    redis_url: Annotated[
        str | None, typer.Option(envvar="LLAMASERVE_REDIS_URL", help="Share rate limits across replicas.")
    ] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar="LLAMASERVE_ADMIN_KEY", help="Turns on /admin/..., guarded by this key.")
    ] = None,
    starter_credits: Annotated[
        str, typer.Option(help="Credits of the account made at first start and of each dashboard sign-up.")
    ] = "10",
    price_input: Annotated[float, typer.Option(help="Credits per million prompt tokens.")] = 0.10,
    price_output: Annotated[float, typer.Option(help="Credits per million completion tokens.")] = 0.20,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a non-streaming request gets 504.")] = 600,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="Model registry (TOML): models, aliases, prices, local and upstream backends."),
    ] = None,
    image_allow: ImageAllow = None,
    image_max_mb: ImageMaxMb = 20,
    signup: Annotated[
        bool, typer.Option("--signup/--no-signup", help="Let anyone create a dashboard account (off: admins do).")
    ] = True,
    signups_per_hour: Annotated[
        int,
        typer.Option(
            min=0,
            help="Dashboard sign-ups one client address may make in an hour (in Redis with --redis-url); 0: no limit.",
        ),
    ] = 5,
    max_keys_per_account: Annotated[
        int,
        typer.Option(
            min=0, help="Active API keys an account may create from its dashboard (admins may add more); 0: no limit."
        ),
    ] = 20,
    batch_concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Batch lines run at once (OpenAI's Batch API); default: half the local engine's --parallel slots, "
            "so live requests keep the rest (4 with no local model).",
        ),
    ] = None,
    batch_discount: Annotated[
        float, typer.Option(min=0, max=1, help="Off the models' prices for batch lines (0.5: half price).")
    ] = 0.5,
    batch_window: Annotated[
        float,
        typer.Option(min=1, help='Seconds a batch may run before it expires (its "24h" window; less for small sites).'),
    ] = 24 * 3600,
    batch_queued_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens (estimated: prompt bytes / 4 + max_tokens) an account's unfinished batch lines may add up "
            "to; a batch past it fails with token_limit_exceeded.",
        ),
    ] = 20_000_000,
    idempotency_hours: Annotated[
        float,
        typer.Option(min=0.001, help="Hours a request's Idempotency-Key and its response are kept for retries."),
    ] = 24.0,
    max_concurrent_per_account: Annotated[
        int,
        typer.Option(
            "--max-concurrent-per-account",
            "--max-concurrent-per-key",  # its former name
            help="Inference requests (streams included) one account, all its keys together, may have open at once; "
            "more: 429.",
        ),
    ] = 128,
    max_body_mb: MaxBodyMb = 32,
    body_timeout: BodyTimeout = 30,
    drain_timeout: DrainTimeout = 30,
    write_timeout: WriteTimeout = 60,
    header_timeout: HeaderTimeout = 10,
    max_connections: MaxConnections = 0,
    ssl_certfile: SslCertfile = None,
    ssl_keyfile: SslKeyfile = None,
    forwarded_allow_ips: ForwardedAllowIps = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="A web origin whose pages may call the API from browsers (repeatable; default: none)."),
    ] = None,
    log_format: LogFormatOpt = LogFormat.json,
    log_level: LogLevelOpt = LogLevel.info,
) -> None:
    """Serve the OpenAI-compatible API, with accounts, keys, credits and rate limits: on one local model, or on
    the models of a registry file (local and upstream engines)."""
    configure_logging(log_format.value, log_level.value)
    if admin_key is not None and not admin_key.strip():
        raise typer.BadParameter(
            "an empty admin key would let anyone in: give a secret, or leave it out", param_hint="--admin-key"
        )
    platform = PlatformConfig(
        data_dir=data_dir or default_data_dir(),
        database_url=database_url,
        redis_url=redis_url,
        admin_key=admin_key,
        starter_credits=parse_credits(starter_credits),
        price_input=price_input,
        price_output=price_output,
        request_timeout=request_timeout,
        signup=signup,
        signups_per_hour=signups_per_hour,
        max_keys_per_account=max_keys_per_account,
        max_concurrent_per_account=max_concurrent_per_account,
        cors_origins=tuple(cors_origin or ()),
        batch_concurrency=batch_concurrency,
        batch_discount=batch_discount,
        batch_window=batch_window,
        batch_queued_tokens=batch_queued_tokens,
        idempotency_hours=idempotency_hours,
    )
    registry = None
    if config_file is not None:
        try:
            registry = load_registry(config_file)
        except RegistryError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
        if mmproj is not None:
            raise typer.BadParameter(
                "with --config, give mmproj on the registry's local backend", param_hint="--mmproj"
            )
        local = next((m for m in registry.models if m.backends[0].type == "local"), None)
        model, model_id = (local.backends[0].path, local.id) if local else (None, None)
        mmproj = local.backends[0].mmproj if local else None
    config = ServeConfig(
        host,
        port,
        model,
        model_id,
        threads,
        parallel,
        ctx,
        batch,
        max_queue,
        chat_format=chat_format.value,
        mmproj=mmproj,
        flash_attn=flash_attn,
    )
    images = _image_limits(image_allow, image_max_mb)
    limits = _limits(max_body_mb, body_timeout, drain_timeout, write_timeout, header_timeout, max_connections)
    tls = _tls(ssl_certfile, ssl_keyfile)
    counters = _token_counters(registry, config_file) if registry and config_file else {}
    load_local = registry is None or model is not None
    _run(config, platform, limits, registry, load_local, images, tls, counters, forwarded_allow_ips)


def _image_limits(image_allow: list[str] | None, image_max_mb: float) -> ImageLimits:
    try:
        allow = tuple(ipaddress.ip_network(n, strict=False) for n in image_allow or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--image-allow") from e
    return ImageLimits(max_bytes=int(image_max_mb * 1024 * 1024), allow=allow)


@app.command()
def engine(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    model: Model = None,
    model_id: ModelId = None,
    mmproj: Mmproj = None,
    threads: Threads = CPUS,
    parallel: Parallel = 16,
    ctx: Ctx = 4096,
    batch: Batch = 128,
    flash_attn: FlashAttn = False,
    max_queue: MaxQueue = 1024,
    chat_format: Format = ChatFormatName.auto,
    image_allow: ImageAllow = None,
    image_max_mb: ImageMaxMb = 20,
    max_body_mb: MaxBodyMb = 32,
    body_timeout: BodyTimeout = 30,
    drain_timeout: DrainTimeout = 30,
    write_timeout: WriteTimeout = 120,  # above serve's 60: a gateway whose client stalls cuts that client first
    header_timeout: HeaderTimeout = 10,
    max_connections: MaxConnections = 0,
    ssl_certfile: SslCertfile = None,
    ssl_keyfile: SslKeyfile = None,
    log_format: LogFormatOpt = LogFormat.json,
    log_level: LogLevelOpt = LogLevel.info,
) -> None:
    """A bare engine: the OpenAI-compatible API on one model, no accounts, for a gateway to front. Bind it where
    only the gateway can reach it."""
    configure_logging(log_format.value, log_level.value)
    config = ServeConfig(
        host,
        port,
        model,
        model_id,
        threads,
        parallel,
        ctx,
        batch,
        max_queue,
        chat_format=chat_format.value,
        mmproj=mmproj,
        flash_attn=flash_attn,
    )
    limits = _limits(max_body_mb, body_timeout, drain_timeout, write_timeout, header_timeout, max_connections)
    images = _image_limits(image_allow, image_max_mb)
    _run(config, None, limits, image_limits=images, tls=_tls(ssl_certfile, ssl_keyfile))


def _tls(certfile: Path | None, keyfile: Path | None) -> tuple[str, str] | None:
    """(certificate, key) files to serve HTTPS with, both or neither."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise typer.BadParameter("give both --ssl-certfile and --ssl-keyfile", param_hint="--ssl-certfile")
    for path, hint in ((certfile, "--ssl-certfile"), (keyfile, "--ssl-keyfile")):
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {path}", param_hint=hint)
    return str(certfile), str(keyfile)


def _token_counters(registry: Registry, config_file: Path) -> dict[str, TokenCounter]:
    """The token counters of the upstream models that name a tokenizer; a GGUF that does not load stops the
    start, naming the file and the place."""
    from llamaserve.backends.counting import TokenCounter

    counters = {}
    for spec in registry.models:
        if spec.tokenizer is None:
            continue
        try:
            counters[spec.id] = TokenCounter.load(spec.id, spec.tokenizer, spec.chat_format)
        except (LlamaError, ValueError) as e:
            console.print(f"[red]error:[/red] {spec.where}.tokenizer: {spec.tokenizer} does not load ({e})")
            raise typer.Exit(2) from e
    return counters


def _limits(
    max_body_mb: float,
    body_timeout: float,
    drain_timeout: float,
    write_timeout: float,
    header_timeout: float,
    max_connections: int,
) -> Limits:
    from llamaserve.api.runtime.lifecycle import Limits

    body_bytes = int(max_body_mb * 1024 * 1024)
    return Limits(body_bytes, body_timeout, drain_timeout, write_timeout, header_timeout, max_connections)


def _run(
    config: ServeConfig,
    platform: PlatformConfig | None,
    limits: Limits,
    registry: Registry | None = None,
    load_local: bool = True,
    image_limits: ImageLimits | None = None,
    tls: tuple[str, str] | None = None,
    counters: dict[str, TokenCounter] | None = None,
    forwarded_allow_ips: str | None = None,
) -> None:
    import uvicorn

    from llamaserve.api.app import create_app
    from llamaserve.api.runtime.http_protocol import protocol_class
    from llamaserve.api.runtime.lifecycle import DrainingServer, Lifecycle

    try:
        local = _load(config) if load_local else None
    except (ModelNotFound, LlamaError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    url = f"{'https' if tls else 'http'}://{config.host}:{config.port}"
    auth = ""
    if platform is not None:
        _first_start(platform)
        auth = f'-H "Authorization: Bearer $(cat {platform.data_dir / KEY_FILE})" '
    names = [m.id for m in registry.models] if registry else [local.id] if local else []
    served = (
        f"local model [bold]{local.id}[/bold] ({config.parallel} slots, {local.max_model_len}-token context"
        + (", images" if local.vision else "")
        + ")"
        if local
        else ""
    )
    upstream = [m.id for m in registry.models if m.backends[0].type == "upstream"] if registry else []
    console.print(
        f"[green]llamaserve {'ready' if platform else 'engine ready (no accounts)'}[/green] at {url}/v1 · "
        + ", ".join(filter(None, [served, f"upstream models {', '.join(upstream)}" if upstream else ""]))
        + f"\n  try: curl {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{names[0]}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )
    if platform is not None:
        console.print(f"  dashboard: {url}/ (sign-up {'on' if platform.signup else 'off'})")
    lifecycle = Lifecycle(limits)
    app_ = create_app(local, platform, registry, image_limits, lifecycle, counters)
    # After the drain, streams still open get a few seconds to end before uvicorn cancels them.
    # uvicorn logs through our handler (log_config=None); its own access log is off: ours has more to say.
    level = logging.getLogger().level
    uv = uvicorn.Config(
        app_,
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=level if level <= logging.DEBUG else max(level, logging.WARNING),
        access_log=False,
        timeout_graceful_shutdown=5,
        http=protocol_class(limits.write_timeout, limits.header_timeout, limits.max_connections),
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: then any local client could pose as any
        # address (and shake off the log-in limiter). Only the proxies named are believed.
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips or "",
    )
    DrainingServer(uv, lifecycle).run()


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
