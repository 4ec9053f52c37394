"""Hostile requests against a live server: what the tests cannot see. While each hostile request runs, one client
polls `GET /health` every 50 ms and another sends small chats back to back; the table gives their latencies
(p50 / max) beside the hostile request's status and seconds. A baseline row polls a quiet server for a few seconds.
Target on a quiet machine: /health under 200 ms while any of them runs.

    .venv/bin/python bench/hostile_bench.py
    .venv/bin/python bench/hostile_bench.py --before /tmp/before --cases tokenize,logit-bias

`--before DIR` adds a server from another checkout (`git worktree add DIR REV`), each case run on both ("after",
then "before"). Each server has its own temporary data dir (and its first-start key). Between cases a server must
answer /health in under 200 ms three times in a row; one that does not within `--settle` seconds, or that stopped
answering, is restarted (and the notes under the table say so).

Bounded: the hostile request has a client timeout (`--timeout`, reported as "timeout"); the pollers stop when it
ends, though not before `--window` seconds (work left behind by a quick answer shows too), and a poll still in flight
`--grace` seconds later is cut (its max shown as ">N"); `--memory-gb` caps the address space of this process and so
of the servers it starts (a grammar that explodes fails there, not the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import MODEL, process  # noqa: E402

CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
QUIET_MS = 200.0  # the target: /health under this


# --- the hostile requests
@dataclass(frozen=True)
class Hostile:
    name: str
    what: str
    path: str
    body: Callable[[], dict[str, Any]]


def _chat(**extra: Any) -> dict[str, Any]:
    return {**CHAT, **extra}


def _schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _optional(n: int) -> dict[str, Any]:
    """An object of `n` string properties, none required."""
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


def _tool(i: int, properties: int = 1) -> dict[str, Any]:
    """A tool whose parameters schema no other tool has."""
    names = [f"p{i}_{j}" for j in range(properties)]
    parameters = {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": names[:1]}
    return {"type": "function", "function": {"name": f"f{i}", "description": "x", "parameters": parameters}}


HOSTILE = [
    Hostile(
        "messages",
        "40,000 empty user messages",
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": ""}] * 40_000),
    ),
    Hostile(
        "enum",
        "json_schema: a string enum of 20,000 values",
        "/v1/chat/completions",
        lambda: _chat(response_format=_schema("e", {"type": "string", "enum": [f"v{i}" for i in range(20_000)]})),
    ),
    Hostile(
        "tools",
        "10,000 tools, each its own parameters schema",
        "/v1/chat/completions",
        lambda: _chat(tools=[_tool(i) for i in range(10_000)]),
    ),
    Hostile(
        "optional",
        "json_schema: an object of 46 optional properties",
        "/v1/chat/completions",
        lambda: _chat(response_format=_schema("o", _optional(46))),
    ),
    Hostile(
        "tokenize",
        'POST /tokenize: "<|im_start|>x" * 20,000',
        "/tokenize",
        lambda: {"model": MODEL, "prompt": "<|im_start|>x" * 20_000},
    ),
    Hostile(
        "tools-max",
        "128 tools of 36 properties each (240 KB), a call forced",
        "/v1/chat/completions",
        lambda: _chat(tools=[_tool(i, 36) for i in range(128)], tool_choice="required"),
    ),
    Hostile(
        "enum-max",
        "json_schema: a string enum of 1,000 values, 24 tokens",
        "/v1/chat/completions",
        lambda: _chat(
            max_tokens=24,
            response_format=_schema("e", {"type": "string", "enum": [f"value-{i:04d}" for i in range(1000)]}),
        ),
    ),
    Hostile(
        "logit-bias",
        "a logit_bias key of 5,000 digits",
        "/v1/chat/completions",
        lambda: _chat(logit_bias={"9" * 5_000: 1}),
    ),
]


# --- measuring
@dataclass
class Samples:
    """Latencies in ms; `cut` marks one still unanswered when it was stopped (or timed out): a lower bound."""

    ms: list[tuple[float, bool]] = field(default_factory=list)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, seconds: float, outcome: str, cut: bool = False) -> None:
        self.ms.append((seconds * 1000, cut))
        if outcome == "200":
            self.ok += 1
        else:
            self.errors[outcome] = self.errors.get(outcome, 0) + 1

    def cell(self) -> str:
        if not self.ms:
            return "-"
        p50 = statistics.median(v for v, _ in self.ms)
        top, cut = max(self.ms)
        return f"{p50:.0f} / {'>' if cut else ''}{top:.0f}"


@dataclass
class Row:
    case: str
    server: str
    status: str = "-"
    seconds: float | None = None
    health: Samples = field(default_factory=Samples)
    chats: Samples = field(default_factory=Samples)
    notes: list[str] = field(default_factory=list)


def outcome(e: BaseException) -> str:
    return "timeout" if isinstance(e, httpx.TimeoutException) else type(e).__name__


async def loop(
    stop: asyncio.Event, out: Samples, send: Callable[[], Any], pause: float, answered: asyncio.Event | None = None
) -> None:
    """`send()` again and again until `stop`, `pause` seconds apart; a cancellation records the one in flight."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            r = await send()
            out.add(time.perf_counter() - started, str(r.status_code))
        except httpx.HTTPError as e:
            out.add(time.perf_counter() - started, outcome(e), cut=isinstance(e, httpx.TimeoutException))
        except asyncio.CancelledError:
            out.add(time.perf_counter() - started, "cut", cut=True)
            raise
        if answered is not None:
            answered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)


def error_message(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = r.json().get("error")
        if isinstance(error, dict):
            return str(error.get("message"))
        return str(r.json().get("detail") or error)
    return r.text


async def measure(
    row: Row, base: str, headers: dict[str, str], hostile: Hostile | None, args: argparse.Namespace
) -> None:
    """The hostile request (or `--baseline` seconds of nothing) with both pollers running beside it."""
    stop, polled = asyncio.Event(), asyncio.Event()
    body = json.dumps(hostile.body()).encode() if hostile else b""  # encoded before the clock starts
    timeout = httpx.Timeout(args.timeout, connect=10)
    async with (
        httpx.AsyncClient(timeout=timeout) as probe,
        httpx.AsyncClient(timeout=timeout, headers=headers) as chatter,
        httpx.AsyncClient(timeout=timeout, headers={**headers, "Content-Type": "application/json"}) as attacker,
    ):
        pollers = [
            asyncio.create_task(loop(stop, row.health, lambda: probe.get(f"{base}/health"), 0.05, polled)),
            asyncio.create_task(
                loop(stop, row.chats, lambda: chatter.post(f"{base}/v1/chat/completions", json=CHAT), 0)
            ),
        ]
        try:
            with contextlib.suppress(TimeoutError):  # the probe has had its first answer: the hostile request next
                await asyncio.wait_for(polled.wait(), 10)
            if hostile is None:
                await asyncio.sleep(args.baseline)
            else:
                started = time.perf_counter()
                try:
                    r = await attacker.post(f"{base}{hostile.path}", content=body)
                    row.status = str(r.status_code)
                    if r.status_code != 200:
                        row.notes.append(f"hostile {r.status_code}: {error_message(r)[:160]}")
                except httpx.HTTPError as e:
                    row.status = outcome(e)
                    row.notes.append(f"hostile: {type(e).__name__} {str(e)[:120]}".rstrip())
                row.seconds = time.perf_counter() - started
                await asyncio.sleep(args.window - row.seconds)  # work left behind after a quick answer shows too
        finally:
            stop.set()
            _, pending = await asyncio.wait(pollers, timeout=args.grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
    for what, samples in (("/health", row.health), ("chat", row.chats)):
        if samples.errors:
            row.notes.append(f"{what} not 200: " + ", ".join(f"{k} x{n}" for k, n in sorted(samples.errors.items())))


# --- servers
class Server:
    """`llamaserve serve` (from `source`'s checkout, or this one) with a data dir of its own; restartable."""

    def __init__(self, name: str, source: str | None, threads: int) -> None:
        self.name, self.source, self.threads = name, source, threads
        self.stack = contextlib.ExitStack()
        self.base, self.headers = "", {}
        try:
            self.start()
        except BaseException:
            self.stack.close()
            raise

    def start(self) -> None:
        data = self.stack.enter_context(tempfile.TemporaryDirectory(prefix=f"hostile_{self.name}_"))
        args = ("serve", "--threads", str(self.threads), "--data-dir", data)
        self.base = self.stack.enter_context(process(*args, source=self.source))
        self.headers = {"Authorization": f"Bearer {(Path(data) / 'default.key').read_text().strip()}"}
        # first decode allocates the compute buffers: not the first case's cost
        httpx.post(f"{self.base}/v1/chat/completions", json=CHAT, headers=self.headers, timeout=60).raise_for_status()

    def restart(self) -> None:
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self.start()

    def settle(self, limit: float) -> tuple[bool, float, str]:
        """Wait until /health answers in under QUIET_MS three times in a row: (quiet, seconds waited, last error)."""
        started, streak, last = time.perf_counter(), 0, ""
        while time.perf_counter() - started < limit:
            t0 = time.perf_counter()
            try:
                ok = httpx.get(f"{self.base}/health", timeout=min(5.0, limit)).status_code == 200
            except httpx.HTTPError as e:
                ok, last = False, type(e).__name__
                if isinstance(e, httpx.ConnectError):
                    return False, time.perf_counter() - started, "not listening (exited?)"
            streak = streak + 1 if ok and (time.perf_counter() - t0) * 1000 < QUIET_MS else 0
            if streak == 3:
                return True, time.perf_counter() - started, ""
            time.sleep(0.1)
        return False, time.perf_counter() - started, last or f"/health not under {QUIET_MS:.0f} ms"

    def close(self) -> None:
        self.stack.close()


def run_case(server: Server, hostile: Hostile | None, args: argparse.Namespace) -> Row:
    row = Row(hostile.name if hostile else "baseline", server.name)
    quiet, waited, why = server.settle(args.settle)
    if not quiet:
        row.notes.append(f"not quiet before the case ({why}, {waited:.0f} s): restarted")
        server.restart()
    elif waited > 1:
        row.notes.append(f"quiet only {waited:.1f} s after the previous case")
    asyncio.run(measure(row, server.base, server.headers, hostile, args))
    return row


def report(rows: list[Row], cases: list[Hostile]) -> None:
    print("| case | server | hostile status | hostile s | /health p50 / max ms | chat p50 / max ms | chats done |")
    print("|---" * 7 + "|")
    for r in rows:
        seconds = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        print(
            f"| {r.case} | {r.server} | {r.status} | {seconds} | {r.health.cell()} | {r.chats.cell()} | {r.chats.ok} |"
        )
    print("\nCases: " + "; ".join(f"{h.name}: {h.what}" for h in cases))
    notes = [f"- {r.case} / {r.server}: {n}" for r in rows for n in r.notes]
    if notes:
        print("\nNotes:\n" + "\n".join(notes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="also a server from this checkout (e.g. a `git worktree` of an older commit)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads of each server")
    p.add_argument("--cases", default=",".join(h.name for h in HOSTILE), help="comma-separated hostile cases")
    p.add_argument("--timeout", type=float, default=60, help="client timeout of every request, seconds")
    p.add_argument("--baseline", type=float, default=3, help="seconds of polling without a hostile request")
    p.add_argument("--window", type=float, default=1, help="seconds polled at least, from the hostile request's start")
    p.add_argument("--grace", type=float, default=5, help="seconds a poll may finish after the hostile request ends")
    p.add_argument("--settle", type=float, default=30, help="seconds a server may take to be quiet between cases")
    p.add_argument("--memory-gb", type=float, default=8, help="address-space cap of this process and its servers")
    args = p.parse_args()
    by_name = {h.name: h for h in HOSTILE}
    if unknown := set(args.cases.split(",")) - set(by_name):
        p.error(f"--cases: unknown {', '.join(sorted(unknown))}")
    cases = [by_name[name] for name in args.cases.split(",")]
    if args.memory_gb > 0:
        cap = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    started = time.perf_counter()
    servers: list[Server] = []
    rows: list[Row] = []
    try:
        servers.append(Server("after", None, args.threads))
        if args.before:
            servers.append(Server("before", args.before, args.threads))
        for hostile in [None, *cases]:
            for server in servers:
                rows.append(run_case(server, hostile, args))
    finally:
        for server in servers:
            server.close()
        report(rows, cases)  # what was measured, even when a later case failed
        print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; --threads {args.threads}")


if __name__ == "__main__":
    main()
