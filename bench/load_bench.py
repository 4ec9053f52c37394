"""Load and books: N concurrent streaming clients against `llamaserve serve` for a while, then the ledger checked
to the micro-credit.

By default it starts a server itself (embedded model, a fresh SQLite data directory, a small engine queue so
most clients wait and some are refused), creates --accounts accounts with known credits over the admin API,
and runs --clients streaming clients, one connection each, spread over those accounts' keys. Each client
repeats a short chat (max_tokens --max-tokens) until --duration has passed; a refusal (429, 503) waits its
Retry-After and tries again. Afterwards the server is stopped with SIGTERM (drain) and the SQLite file is read:

  - no open holds;
  - every usage row costs price(prompt, completion) at the server's prices (0 for a refused request), and the
    ledger's charges sum to the usage rows' costs;
  - each account's balance = its grant - its charges = the sum of its ledger;
  - the requests the clients saw complete are the usage rows with status ok, with the same completion tokens.

Prints throughput, TTFT and latency, refusals by status and code, errors; exits 1 on any unexpected error or
a ledger that does not balance. `--url --admin-key --db PATH` targets a running server instead (SQLite only).

    python bench/load_bench.py --clients 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

MODEL = "SmolLM2-135M-Instruct"
ADMIN_KEY = "load-bench-admin"
PER_MILLION = 1_000_000
MICRO = 1_000_000


@dataclass
class Stats:
    completed: int = 0
    completion_tokens: int = 0  # as the streams' usage chunks reported them
    refused: Counter[str] = field(default_factory=Counter)  # "503 engine_overloaded", ...
    errors: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    last_done: float = 0.0


# --- the server ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--threads", str(args.threads), "--parallel", str(args.parallel), "--max-queue", str(args.max_queue),
        "--admin-key", ADMIN_KEY, "--price-input", str(args.price_input), "--price-output", str(args.price_output),
        "--drain-timeout", "60",
    ]  # fmt: skip
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {data_dir / 'server.log'}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy in 180 s")


def make_accounts(base: str, admin_key: str, n: int, credits: str, tag: str) -> dict[str, str]:
    """n accounts (plan unlimited, `credits` each) with one key each; returns name -> key."""
    keys = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as admin:
        for i in range(n):
            name = f"load-{tag}-{i}"
            r = admin.post("/admin/accounts", json={"name": name, "plan": "unlimited", "credits": credits})
            r.raise_for_status()
            r = admin.post(f"/admin/accounts/{name}/keys", json={"name": "load"})
            r.raise_for_status()
            keys[name] = r.json()["key"]
    return keys


# --- the clients --------------------------------------------------------------------------------------------------
async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stats: Stats) -> float:
    """One streamed chat; returns how long to wait before the next (a refusal's Retry-After, else 0)."""
    started = time.monotonic()
    first: float | None = None
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with session.post(url, json=body) as r:
            if r.status in (429, 503):
                code = (await r.json()).get("error", {}).get("code")
                stats.refused[f"{r.status} {code}"] += 1
                return float(r.headers.get("Retry-After", "1"))
            if r.status != 200:
                stats.errors[f"HTTP {r.status}: {(await r.text())[:120]}"] += 1
                return 1.0
            async for raw in r.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats.errors[f"error event: {chunk['error'].get('code')}"] += 1
                        return 1.0
                    if first is None and any(c["delta"].get("content") for c in chunk.get("choices") or []):
                        first = time.monotonic()
                    usage = chunk.get("usage") or usage
    except (aiohttp.ClientError, TimeoutError) as e:
        stats.errors[f"transport: {type(e).__name__}"] += 1
        return 1.0
    if not done or usage is None:
        stats.errors["stream ended without [DONE] and usage"] += 1
        return 1.0
    now = time.monotonic()
    stats.completed += 1
    stats.completion_tokens += int(usage["completion_tokens"])
    stats.ttft.append((first or now) - started)
    stats.latency.append(now - started)
    stats.last_done = now
    return 0.0


async def client(i: int, base: str, key: str, args: argparse.Namespace, stop_at: float, stats: Stats) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Client {i}: name a colour and a fruit."}],
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # One connection per client: a real crowd, not a pool of a few sockets.
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        await asyncio.sleep(i * args.ramp / max(1, args.clients))  # spread the first requests over --ramp s
        while time.monotonic() < stop_at:
            wait = await one_request(session, f"{base}/v1/chat/completions", body, stats)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))


async def run_clients(base: str, keys: list[str], args: argparse.Namespace) -> tuple[Stats, float]:
    stats = Stats()
    started = time.monotonic()
    stop_at = started + args.duration
    await asyncio.gather(*(client(i, base, keys[i % len(keys)], args, stop_at, stats) for i in range(args.clients)))
    return stats, (stats.last_done or time.monotonic()) - started


# --- the books ----------------------------------------------------------------------------------------------------
def cost(prompt: int, completion: int, price_in: int, price_out: int) -> int:
    """The server's formula (billing/pricing.py): micro-credits, rounded up."""
    return -(-(prompt * price_in + completion * price_out) // PER_MILLION)


def check_ledger(db: Path, accounts: list[str], grant: int, args: argparse.Namespace, stats: Stats) -> list[str]:
    """The problems found in the books (empty: they balance exactly)."""
    price_in, price_out = round(args.price_input * MICRO), round(args.price_output * MICRO)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    problems = []
    marks = ",".join("?" * len(accounts))
    ids = [r[0] for r in con.execute(f"SELECT id FROM accounts WHERE name IN ({marks})", accounts)]
    in_ids = f"({','.join(str(i) for i in ids)})"
    open_holds = con.execute("SELECT count(*) FROM holds WHERE status = 'open'").fetchone()[0]
    if open_holds:
        problems.append(f"{open_holds} holds still open")
    rows = con.execute(
        f"SELECT prompt_tokens, completion_tokens, cost, status FROM usage WHERE account_id IN {in_ids}"
    ).fetchall()
    wrong = [r for r in rows if r[2] != (0 if r[3] == "rejected" else cost(r[0], r[1], price_in, price_out))]
    if wrong:
        problems.append(f"{len(wrong)} usage rows not charged price(prompt, completion), e.g. {wrong[:3]}")
    charged = -(con.execute(f"SELECT sum(amount) FROM ledger WHERE kind = 'charge' AND account_id IN {in_ids}")
                .fetchone()[0] or 0)  # fmt: skip
    used = sum(r[2] for r in rows)
    if charged != used:
        problems.append(f"ledger charges {charged} != usage costs {used}")
    twice = con.execute("SELECT count(*) FROM (SELECT hold_id FROM ledger WHERE kind = 'charge' "
                        "GROUP BY hold_id HAVING count(*) > 1)").fetchone()[0]  # fmt: skip
    if twice:
        problems.append(f"{twice} holds charged more than once")
    for account_id, balance in con.execute(f"SELECT id, balance FROM accounts WHERE id IN {in_ids}"):
        ledger = con.execute("SELECT sum(amount) FROM ledger WHERE account_id = ?", (account_id,)).fetchone()[0]
        spent = -(con.execute("SELECT sum(amount) FROM ledger WHERE account_id = ? AND kind = 'charge'",
                              (account_id,)).fetchone()[0] or 0)  # fmt: skip
        if not balance == ledger == grant - spent:
            problems.append(f"account {account_id}: balance {balance}, ledger {ledger}, grant-charged {grant - spent}")
    ok = [r for r in rows if r[3] == "ok"]
    if len(ok) != stats.completed or sum(r[1] for r in ok) != stats.completion_tokens:
        problems.append(
            f"clients saw {stats.completed} requests / {stats.completion_tokens} tokens complete; the usage rows "
            f"say {len(ok)} / {sum(r[1] for r in ok)}"
        )
    con.close()
    print(
        f"ledger: {len(rows)} usage rows ({len(ok)} ok, {sum(r[3] == 'rejected' for r in rows)} rejected), "
        f"charged {charged} micro-credits = usage x price; open holds {open_holds}"
    )
    return problems


# --- the report ---------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(stats: Stats, wall: float, args: argparse.Namespace) -> None:
    print(
        f"clients {args.clients} (one connection each), duration {args.duration:g} s, engine {args.parallel} slots + "
        f"queue {args.max_queue}, max_tokens {args.max_tokens}"
    )
    print(f"completed {stats.completed} requests in {wall:.1f} s: {stats.completed / wall:.2f} req/s, "
          f"{stats.completion_tokens / wall:.1f} completion tok/s")  # fmt: skip
    ttft, latency = (
        f"p50 {pct(v, 0.5) * 1e3:.0f} ms, p99 {pct(v, 0.99) * 1e3:.0f} ms" for v in (stats.ttft, stats.latency)
    )
    print(f"TTFT {ttft}; latency {latency}")
    print(f"refused (clean, retried): {dict(stats.refused) or 0}")
    print(f"errors: {dict(stats.errors) or 0}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200, help="concurrent streaming clients, one connection each")
    p.add_argument("--duration", type=float, default=60, help="seconds clients keep starting requests")
    p.add_argument("--ramp", type=float, default=2, help="seconds over which the clients start")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--accounts", type=int, default=4, help="accounts (one key each) the clients are spread over")
    p.add_argument("--credits", default="1000", help="credits granted to each account")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--parallel", type=int, default=8, help="engine slots of the server started here")
    p.add_argument("--max-queue", type=int, default=160, help="engine queue of the server started here")
    p.add_argument("--price-input", type=float, default=1000.0, help="credits per million prompt tokens")
    p.add_argument("--price-output", type=float, default=2000.0, help="credits per million completion tokens")
    p.add_argument("--request-timeout", type=float, default=300, help="client-side limit of one request, s")
    p.add_argument("--url", help="a running server (else one is started here)")
    p.add_argument("--admin-key", default=ADMIN_KEY, help="with --url: its admin key")
    p.add_argument("--db", type=Path, help="with --url: its SQLite file, for the ledger check")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="llamaserve-load-")
    proc, base, db = None, args.url, args.db
    if base is None:
        proc, base = start_server(args, Path(tmp.name))
        db = Path(tmp.name) / "llamaserve.db"
    try:
        keys = make_accounts(base, args.admin_key, args.accounts, args.credits, str(int(time.time())))
        stats, wall = asyncio.run(run_clients(base, list(keys.values()), args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)  # drain: every settlement written before the file is read
            proc.wait(120)
    report(stats, wall, args)
    problems = ["unexpected errors: " + str(dict(stats.errors))] if stats.errors else []
    if db is not None:
        if args.url:
            time.sleep(2)  # a running server settles right after each stream closes
        grant = round(float(args.credits) * MICRO)
        problems += check_ledger(db, list(keys), grant, args, stats)
    else:
        print("ledger: not checked (give --db with --url)")
    print("FAIL:\n  " + "\n  ".join(problems) if problems else "PASS")
    tmp.cleanup()
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
