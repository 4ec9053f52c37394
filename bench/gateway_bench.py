"""Gateway overhead: the same requests straight to a `llamaserve engine` and through a `llamaserve serve
--config` gateway in front of it (key check, rate limit, credit hold, proxy, settlement), interleaved so both
see the same machine state. Prints latency p50/p99, requests/s and the milliseconds the gateway adds.

With `--engine stub` the upstream is bench/stub_upstream.py, which answers at once: what is left is the gateway's
own cost, without the engine's noise (nor its competition for the cores).

    .venv/bin/python bench/gateway_bench.py --requests 200
    .venv/bin/python bench/gateway_bench.py --engine stub --floor --requests 1000

`--store sqlite,postgres,postgres+redis` runs a gateway on each store (PostgreSQL: a fresh database on the server
`--postgres-url` names, dropped afterwards; Redis: `--redis-url`), side by side; `--accounts N` gives each
gateway N accounts (unlimited plan, one key each) and the clients send as them in turn: one account's requests all
update one balance row, N accounts' spread over N. `--idempotency` adds each gateway again as "<name>-keyed", every
request with a new `Idempotency-Key`: what keeping a response for retries costs a request.

`--before DIR` adds a gateway run from another checkout (`git worktree add DIR REV`), so a change's cost is
measured against the code before it in the same run. `--floor` adds bench/passthrough.py beside the gateway: a bare
forwarder (no keys, validation or credits), the least a second HTTP round trip costs on this machine.
`--floor-clients aiohttp,httpx` runs one forwarder per HTTP client ("passthrough-aiohttp", "passthrough-httpx"):
what the choice of client costs, apart from the gateway.

LiteLLM's proxy as a peer (bench/litellm_proxy.py): the same upstream behind LiteLLM (master key only, no database,
offline), as target "litellm". It needs a virtualenv of its own:

    python3 -m venv /tmp/venv-litellm && /tmp/venv-litellm/bin/pip install 'litellm[proxy]'
    .venv/bin/python bench/gateway_bench.py --engine stub --floor --floor-clients aiohttp,httpx \\
        --litellm-venv /tmp/venv-litellm --clients 1 --requests 1000

(or `--litellm PATH`, PATH its `litellm` script or that venv's Python). Its output goes to a log whose path is
printed with its version; it takes tens of seconds to start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litellm_proxy import LiteLLM, proxy  # noqa: E402
from serve_bench import free_port, stop, wait_healthy  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
FRESH = "<fresh>"  # an Idempotency-Key header to be replaced by a new key on each request
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


@contextlib.contextmanager
def process(*args: str, source: str | None = None) -> Iterator[str]:
    """`llamaserve ARGS` on a free port; from another checkout's `src/` when `source` names one."""
    env = {**os.environ, "PYTHONPATH": str(Path(source) / "src")} if source else None
    with started([sys.executable, "-m", "llamaserve.cli", *args], env) as base:
        yield base


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """COMMAND `--port PORT` until the block ends; yields its base URL once its /health answers 200."""
    port = free_port()
    out = subprocess.DEVNULL
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=out, stderr=out, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=120)
        yield base
    finally:
        stop(proc)


@contextlib.contextmanager
def postgres_database(server: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at `server` (dropped afterwards); yields its SQLAlchemy URL."""
    import asyncpg
    from sqlalchemy.engine import make_url

    name = f"llamaserve_bench_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(drivername="postgresql+asyncpg", database=name).render_as_string(False)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def gateway(
    config: Path, store: str, accounts: int, args: argparse.Namespace, source: str | None = None
) -> Iterator[Target]:
    """`llamaserve serve --config CONFIG` on STORE (sqlite, postgres, postgres+redis), with ACCOUNTS accounts of
    the unlimited plan, each with a key."""
    with contextlib.ExitStack() as stack:
        data = stack.enter_context(tempfile.TemporaryDirectory())
        options = ["--data-dir", data]
        if store.startswith("postgres"):
            options += ["--database-url", stack.enter_context(postgres_database(args.postgres_url))]
        redis = ["--redis-url", args.redis_url] if store.endswith("+redis") else []
        base = stack.enter_context(process("serve", "--config", str(config), *options, *redis, source=source))
        keys = [(Path(data) / "default.key").read_text().strip()]
        for i in range(1, accounts):
            cli("accounts", "create", f"bench-{i}", "--plan", "unlimited", "--credits", "1000000", *options)
            keys.append(cli("keys", "create", f"bench-{i}", *options).splitlines()[-1].strip())
        yield f"{base}/v1/chat/completions", "smol", [{"Authorization": f"Bearer {key}"} for key in keys]


def cli(*args: str) -> str:
    """`llamaserve ARGS`'s output."""
    return subprocess.run(
        [sys.executable, "-m", "llamaserve.cli", *args], check=True, capture_output=True, text=True
    ).stdout


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client: httpx.AsyncClient, url: str, model: str, stream: bool, headers: dict[str, str]) -> float:
    if headers.get("Idempotency-Key") == FRESH:
        headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
    started = time.perf_counter()
    if stream:
        async with client.stream("POST", url, json={**BODY, "model": model, "stream": True}, headers=headers) as r:
            async for _ in r.aiter_lines():
                pass
    else:
        r = await client.post(url, json={**BODY, "model": model}, headers=headers)
    assert r.status_code == 200, (r.status_code, r.read())
    return (time.perf_counter() - started) * 1000


# Chat completions URL, model name there, and the headers of each account (client i sends as account i mod n).
Target = tuple[str, str, list[dict[str, str]]]


async def run(targets: dict[str, Target], n: int, concurrency: int, stream: bool, block: int) -> dict[str, list[float]]:
    """The same requests to every target, `concurrency` at a time, in blocks of `block` rounds per target, the
    targets taking turns (in a rotating order). In blocks, what a server does after a reply (settling, logging)
    meets its own next request, as with a client of its own, and not another target's."""
    lat: dict[str, list[float]] = {name: [] for name in targets}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {name: httpx.AsyncClient(timeout=60, limits=limits) for name in targets}
    names = list(targets)
    try:
        for name in names:  # warm-up: connections, first decode, every account's key
            url, model, accounts = targets[name]
            await asyncio.gather(*(one(clients[name], url, model, stream, h) for h in accounts))
        step = concurrency * block
        for turn, start in enumerate(range(0, n, step)):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                url, model, accounts = targets[name]
                for at in range(start, min(start + step, n), concurrency):
                    batch = min(concurrency, n - at)
                    sends = (one(clients[name], url, model, stream, accounts[i % len(accounts)]) for i in range(batch))
                    lat[name] += await asyncio.gather(*sends)
    finally:
        for c in clients.values():
            await c.aclose()
    return lat


def report(targets: dict[str, Target], requests: int, modes: list[bool], concurrencies: list[int], block: int) -> None:
    """One row per mode and concurrency. "adds" is p50 through minus p50 direct; "paired" is the median of the
    differences between requests at the same place in their targets' blocks (sent a block apart), which machine drift
    affects less."""
    others = [name for name in targets if name != "direct"]
    print(
        "| mode | clients | direct p50 / p99 ms | "
        + " | ".join(f"{name} p50 / p99 ms | {name} adds (p50) | paired | {name} req/s" for name in others)
        + " | direct req/s |"
    )
    print("|---" * (3 + 4 * len(others) + 1) + "|")
    for stream in modes:
        for concurrency in concurrencies:
            lat = asyncio.run(run(targets, requests, concurrency, stream, block))
            d = lat["direct"]
            cells = [f"{percentile(d, 0.5):.1f} / {percentile(d, 0.99):.1f}"]
            for name in others:
                g = lat[name]
                cells += [
                    f"{percentile(g, 0.5):.1f} / {percentile(g, 0.99):.1f}",
                    f"{percentile(g, 0.5) - percentile(d, 0.5):+.2f}",
                    f"{statistics.median(a - b for a, b in zip(g, d, strict=True)):+.2f}",
                    f"{1000 * concurrency / statistics.mean(g):.0f}",
                ]
            rate = f"{1000 * concurrency / statistics.mean(d):.0f}"
            print(f"| {'stream' if stream else 'non-stream'} | {concurrency} | " + " | ".join(cells) + f" | {rate} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the engine")
    p.add_argument("--engine", choices=("real", "stub"), default="real", help="llamaserve engine, or an instant stub")
    p.add_argument("--floor", action="store_true", help="also a bare passthrough (bench/passthrough.py): the floor")
    p.add_argument(
        "--floor-clients", help="comma-separated HTTP clients of the passthroughs (aiohttp, httpx); implies --floor"
    )
    litellm_args = p.add_mutually_exclusive_group()
    litellm_args.add_argument("--litellm", help="also LiteLLM's proxy: its `litellm` script, or a Python with it")
    litellm_args.add_argument("--litellm-venv", help="also LiteLLM's proxy, from this virtualenv (bin/litellm)")
    p.add_argument(
        "--before",
        help="also a gateway run from this checkout (e.g. a `git worktree` of an older commit): before/after",
    )
    p.add_argument("--modes", default="non-stream,stream", help="comma-separated: non-stream, stream")
    p.add_argument("--clients", default="1,8", help="comma-separated concurrencies")
    p.add_argument("--block", type=int, default=10, help="rounds in a row to one target before the next takes over")
    p.add_argument(
        "--store", default="sqlite", help="comma-separated: sqlite, postgres, postgres+redis (a gateway on each)"
    )
    p.add_argument("--accounts", type=int, default=1, help="accounts the clients send as, in turn (one key each)")
    p.add_argument(
        "--idempotency", action="store_true", help="also each gateway with a new Idempotency-Key on every request"
    )
    p.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="for --store")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="for --store postgres+redis")
    args = p.parse_args()
    stores = args.store.split(",")
    if unknown := set(stores) - {"sqlite", "postgres", "postgres+redis"}:
        p.error(f"--store: unknown {', '.join(sorted(unknown))}")
    modes = [{"non-stream": False, "stream": True}[m] for m in args.modes.split(",")]
    concurrencies = [int(c) for c in args.clients.split(",")]
    floor_clients = (args.floor_clients or "aiohttp").split(",") if args.floor or args.floor_clients else []
    if unknown := set(floor_clients) - {"aiohttp", "httpx"}:
        p.error(f"--floor-clients: unknown {', '.join(sorted(unknown))}")
    litellm = LiteLLM.from_path(args.litellm) if args.litellm else None
    if args.litellm_venv:
        litellm = LiteLLM.from_venv(args.litellm_venv)
    if args.engine == "stub":
        upstream, model = started([sys.executable, str(Path(__file__).parent / "stub_upstream.py")]), "stub"
    else:
        upstream, model = process("engine", "--threads", str(args.threads)), MODEL
    with tempfile.TemporaryDirectory() as tmp, upstream as engine:
        config = Path(tmp) / "llamaserve.toml"
        config.write_text(
            f'[[models]]\nid = "smol"\n[[models.backends]]\ntype = "upstream"\nurl = "{engine}/v1"\nmodel = "{model}"\n'
        )
        with contextlib.ExitStack() as running:
            targets: dict[str, Target] = {"direct": (f"{engine}/v1/chat/completions", model, [{}])}
            for store in stores:
                name = "gateway" if len(stores) == 1 else f"gateway-{store}"
                targets[name] = running.enter_context(gateway(config, store, args.accounts, args))
                if args.idempotency:  # the same gateway, each request with a new Idempotency-Key
                    url, served, accounts = targets[name]
                    targets[f"{name}-keyed"] = (url, served, [{**h, "Idempotency-Key": FRESH} for h in accounts])
                if args.before:
                    before = gateway(config, store, args.accounts, args, source=args.before)
                    targets[f"{name}-before"] = running.enter_context(before)
            script = str(Path(__file__).parent / "passthrough.py")
            for client in floor_clients:
                floor = running.enter_context(
                    started([sys.executable, script, "--upstream", engine, "--client", client])
                )
                targets[f"passthrough-{client}"] = (f"{floor}/v1/chat/completions", model, [{}])
            if litellm is not None:
                fd, name = tempfile.mkstemp(prefix="gateway_bench_litellm_", suffix=".log")  # kept for reading
                os.close(fd)
                log = Path(name)
                print(f"litellm {litellm.version()} ({' '.join(litellm.command)}), its log: {log}", flush=True)
                peer, master_key = running.enter_context(proxy(litellm, engine, model, "smol", log))
                targets["litellm"] = (
                    f"{peer}/v1/chat/completions",
                    "smol",
                    [{"Authorization": f"Bearer {master_key}"}],
                )
            report(targets, args.requests, modes, concurrencies, args.block)


if __name__ == "__main__":
    main()
