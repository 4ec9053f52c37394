"""Faults under real processes: an upstream engine SIGKILLed mid-stream, the gateway SIGKILLed while streams run
and restarted on its data, the database out of reach for a moment, a client that stops reading, a client that
trickles its body. Each ends with the books checked: no open hold, every charge matched by its usage row,
nothing charged twice.

Covered elsewhere and not repeated here: a dead engine taken out by the health probe and probed back in after a
restart (test_gateway.py::test_dead_engine_is_taken_out_and_probed_back_in), a request retried on the other
engine when one is dead before any byte (test_gateway.py::test_killed_engine_fails_over), a gateway killed
between requests keeps its settled charges (test_platform.py::test_a_killed_gateway_keeps_every_settled_charge),
a body that stops arriving is 408 (test_lifecycle.py::test_slow_body_is_408).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, free_port, postgres_database, redis_url, start_server, wait_for
from tests.forkserver import fork_server
from tests.test_gateway import ENGINE, GATEWAY_MODEL, metric_samples, registry

ADMIN = "faults-admin-key"
PRICED = ("--admin-key", ADMIN, "--price-input", "1000", "--price-output", "1000")  # 1,000 micro-credits a token
MESSAGES = [{"role": "user", "content": "Count from one to one hundred."}]


def balance(server: Server, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(f"{server.v1}/account/balance", headers={"Authorization": f"Bearer {key or server.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()


def usage(server: Server, key: str | None = None) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.v1}/account/usage", headers={"Authorization": f"Bearer {key or server.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def settled(server: Server, key: str | None = None, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (b := balance(server, key))["open_holds"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b["open_holds"] == 0, b
    return b


def new_account(server: Server, name: str, credits: str, plan: str = "unlimited") -> str:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as admin:
        assert admin.post("/admin/accounts", json={"name": name, "plan": plan, "credits": credits}).status_code == 201
        r = admin.post(f"/admin/accounts/{name}/keys", json={"name": "faults"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


def chat(server: Server, key: str, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.v1}/chat/completions", json=payload, headers=headers, timeout=60)


def chats_at_once(server: Server, key: str, n: int, **body: Any) -> list[int]:
    """The statuses of n chats sent side by side."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: chat(server, key, **body).status_code, range(n)))


@contextmanager
def servers_at_once(*starts: AbstractContextManager[Server]) -> Iterator[list[Server]]:
    """Servers started side by side (their model loads overlap; the fork server forks them one at a time), stopped
    in reverse order at the end of the block."""
    fork_server()  # made once, here: two threads must not each start one
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(starts)) as pool:
            futures = [pool.submit(start.__enter__) for start in starts]
        servers, failure = [], None
        for start, future in zip(starts, futures, strict=True):
            try:
                servers.append(future.result())
            except BaseException as e:  # the others that started are stopped all the same
                failure = failure or e
            else:
                stack.push(start)
        if failure is not None:
            raise failure
        yield servers


class Stream:
    """A streamed chat in a thread: its text, events and how it ended; `started` is set at its first content."""

    def __init__(self, url: str, key: str, model: str = MODEL, max_tokens: int = 2000) -> None:
        self.body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True}
        self.url, self.key = url, key
        self.text, self.events, self.done, self.failure = "", [], False, ""
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            body = {**self.body, "stream": True}
            with httpx.stream("POST", f"{self.url}/chat/completions", json=body, headers=headers, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        self.events.append(event)
                        for choice in event.get("choices") or []:
                            self.text += choice["delta"].get("content") or ""
                        if self.text:
                            self.started.set()
        except httpx.HTTPError as e:
            self.failure = repr(e)
        finally:
            self.started.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream hung"


# --- an upstream engine killed mid-stream --------------------------------------------------------------------------
@pytest.mark.slow
def test_engine_killed_mid_stream_ends_it_with_an_error_charges_what_was_delivered(tmp_path: Path) -> None:
    engines = (start_server(*ENGINE, command="engine") for _ in range(2))
    with servers_at_once(*engines) as (a, b):
        # Probed every 0.5 s (not 2): the dead engine is found out sooner.
        model = {"id": GATEWAY_MODEL, "upstreams": [a.v1, b.v1], "health_interval": 0.5}
        path = registry(tmp_path / "llamaserve.toml", [model])
        with start_server("--config", str(path)) as gw:
            before = settled(gw)["balance_micro"]
            stream = Stream(gw.v1, gw.api_key, GATEWAY_MODEL)
            assert stream.started.wait(60) and not stream.failure, stream.failure
            wait_for(lambda: len(stream.events) >= 10 or not stream.thread.is_alive(), "a few more tokens", 60)
            victim, survivor = (a, b) if a.engine_stats()["running"] else (b, a)
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.wait()
            stream.join(30)

            # A terminal error event in OpenAI's shape, then the end: no hang, no [DONE], no transport error.
            assert not stream.done and not stream.failure, stream.failure
            assert stream.events[-1]["error"]["code"] == "bad_gateway" and "choices" not in stream.events[-1]
            # Charged for what reached the client: its text's bytes / 4 (no usage came), not the 2000 held; the
            # prompt at the same 4 bytes a token (plus 8 a message), not at its bound (a token a byte + 512).
            b_after = settled(gw)
            [record] = usage(gw)
            assert record["status"] == "error"
            assert record["completion_tokens"] == math.ceil(len(stream.text.encode()) / 4) < 2000
            assert record["prompt_tokens"] == math.ceil(len(MESSAGES[0]["content"].encode()) / 4) + 8
            assert record["cost_micro"] == (record["prompt_tokens"] + record["completion_tokens"]) * 1000
            assert b_after["balance_micro"] == before - record["cost_micro"]

            # The router takes the dead engine out and the next requests are served by the other one.
            deadline = time.monotonic() + 10
            while healthy(gw, victim.v1):
                assert time.monotonic() < deadline, "the dead engine is still marked healthy"
                time.sleep(0.05)
            served = survivor.engine_stats()["sequences_finished"]
            assert chats_at_once(gw, gw.api_key, 3, model=GATEWAY_MODEL, max_tokens=2) == [200] * 3
            assert survivor.engine_stats()["sequences_finished"] == served + 3


# --- the gateway killed while streams run ----------------------------------------------------------------------
def healthy(gateway: Server, upstream: str) -> bool:
    """Whether the gateway's /metrics has `upstream` as healthy."""
    samples = metric_samples(httpx.get(f"{gateway.base_url}/metrics").text)
    [value] = [s.value for s in samples if s.name == "llamaserve_upstream_healthy" and s.labels["backend"] == upstream]
    return value == 1


def sqlite_books(data_dir: Path) -> dict[str, Any]:
    """What the SQLite file says, read directly: open holds, balance vs ledger, charges per hold and request."""
    con = sqlite3.connect(f"file:{data_dir / 'llamaserve.db'}?mode=ro", uri=True)
    try:
        one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "open_holds": one("SELECT count(*) FROM holds WHERE status = 'open'"),
            "balance_minus_ledger": one(
                "SELECT sum(balance) - (SELECT sum(amount) FROM ledger) FROM accounts"
            ),  # every balance change has its ledger row
            "holds_charged_twice": one(
                "SELECT count(*) FROM (SELECT hold_id FROM ledger WHERE kind = 'charge' GROUP BY hold_id "
                "HAVING count(*) > 1)"
            ),
            "charges_without_usage": one(
                "SELECT count(*) FROM ledger l JOIN holds h ON h.id = l.hold_id WHERE l.kind = 'charge' "
                "AND l.amount != 0 AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.request_id = h.request_id "
                "AND u.cost = -l.amount)"
            ),
            "usage_without_charge": one(
                "SELECT count(*) FROM usage u WHERE NOT EXISTS (SELECT 1 FROM holds h JOIN ledger l ON "
                "l.hold_id = h.id AND l.kind = 'charge' WHERE h.request_id = u.request_id AND -l.amount = u.cost)"
            ),
        }
    finally:
        con.close()


CONSISTENT = {
    "open_holds": 0,
    "balance_minus_ledger": 0,
    "holds_charged_twice": 0,
    "charges_without_usage": 0,
    "usage_without_charge": 0,
}


@pytest.mark.slow
def test_gateway_killed_under_load_restarts_with_consistent_books(tmp_path: Path) -> None:
    """SIGKILL the gateway while four streams run; restarted on the same data, it releases their holds (charging
    nothing: what they produced was never settled) within seconds, and the books hold every settled charge once."""
    port = free_port()
    with start_server("--parallel", "4", *PRICED, data_dir=tmp_path, port=port) as server:
        key = new_account(server, "crash", "100")
        assert chats_at_once(server, key, 2) == [200, 200]
        settled(server, key)
        streams = [Stream(server.v1, key) for _ in range(4)]
        for stream in streams:
            assert stream.started.wait(60) and not stream.failure, stream.failure
        assert balance(server, key)["open_holds"] == 4
        server.process.kill()
        server.process.wait()
        for stream in streams:
            stream.join(10)
            assert not stream.done and stream.failure  # the connection broke: the client knows
    # One slot is all the restarted gateway needs, and a small context: it serves one short chat.
    with start_server("--parallel", "1", "--ctx", "1024", *PRICED, data_dir=tmp_path, port=port) as server:
        # The dead process's holds: released once it missed its beats. That takes the restarted process's own
        # beats going through for DEAD_AFTER (10 s), most of this test's time.
        b = settled(server, key, timeout=30)
        records = usage(server, key)
        assert len(records) == 2 and len({r["request_id"] for r in records}) == 2
        assert all(r["status"] == "ok" for r in records)
        assert b["balance_micro"] == 100_000_000 - sum(r["cost_micro"] for r in records)
        assert chat(server, key).status_code == 200  # and it serves on
        settled(server, key)
        assert sqlite_books(tmp_path) == CONSISTENT


# --- the database out of reach -------------------------------------------------------------------------------------
class CuttableProxy:
    """A TCP proxy in front of PostgreSQL or Redis: `cut()` resets every connection and refuses new ones (the database
    went away), `restore()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        # shutdown() before close(): a socket another thread waits on (accept, recv) is only closed by it.
        assert self.listener is not None
        with self.lock:
            for s in [self.listener, *self.conns]:
                _shut(s)
                s.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:  # closed by cut()
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            _shut(a)
            _shut(b)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already, or never connected
        pass


def postgres_books(url: str) -> dict[str, Any]:
    import asyncpg

    async def read() -> dict[str, Any]:
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            return {
                "open_holds": await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open'"),
                "balance_minus_ledger": await conn.fetchval(
                    "SELECT sum(balance) - (SELECT sum(amount) FROM ledger) FROM accounts"
                ),
                "holds_charged_twice": await conn.fetchval(
                    "SELECT count(*) FROM (SELECT hold_id FROM ledger WHERE kind = 'charge' GROUP BY hold_id "
                    "HAVING count(*) > 1) t"
                ),
                "charges_without_usage": await conn.fetchval(
                    "SELECT count(*) FROM ledger l JOIN holds h ON h.id = l.hold_id WHERE l.kind = 'charge' "
                    "AND l.amount != 0 AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.request_id = h.request_id "
                    "AND u.cost = -l.amount)"
                ),
                "usage_without_charge": await conn.fetchval(
                    "SELECT count(*) FROM usage u WHERE NOT EXISTS (SELECT 1 FROM holds h JOIN ledger l ON "
                    "l.hold_id = h.id AND l.kind = 'charge' WHERE h.request_id = u.request_id AND -l.amount = u.cost)"
                ),
            }
        finally:
            await conn.close()

    return asyncio.run(read())


def settle_retried(server: Server) -> bool:
    """Whether a settlement found the database away and is to be tried again (the server logged it)."""
    return any(
        line.get("message", "").startswith("settling hold") and "database unavailable" in line["message"]
        for line in server.log_lines()
    )


def unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "database_unavailable", error
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"] in error["message"]


@pytest.mark.slow
def test_database_outage_is_503_then_recovers_without_restart() -> None:
    with postgres_database() as url:
        proxy = CuttableProxy(("127.0.0.1", 5432))
        via_proxy = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert via_proxy != url
        with start_server("--parallel", "2", "--ctx", "1024", *PRICED, "--database-url", via_proxy) as server:
            key = new_account(server, "outage", "100")
            assert chat(server, key).status_code == 200
            in_flight = Stream(server.v1, key, max_tokens=80)  # settles while the database is away
            assert in_flight.started.wait(60)
            proxy.cut()
            started = time.monotonic()
            unavailable(chat(server, key))
            unavailable(chat(server, key, stream=True))
            unavailable(httpx.get(f"{server.v1}/account/balance", headers={"Authorization": f"Bearer {key}"}))
            assert time.monotonic() - started < 15  # refused promptly, not after a hang
            assert httpx.get(f"{server.base_url}/ready").json()["checks"]["database"] is False
            in_flight.join(60)
            assert in_flight.done  # the client got its whole answer; the settlement waits for the database
            wait_for(lambda: settle_retried(server), "the in-flight stream's settlement tried and failed")
            proxy.restore()
            deadline = time.monotonic() + 15
            while (r := chat(server, key)).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            b = settled(server, key, timeout=60)  # the in-flight stream's settlement went through on a retry
            records = usage(server, key)
            assert [r["status"] for r in records].count("ok") >= 3
            assert b["balance_micro"] == 100_000_000 - sum(r["cost_micro"] for r in records)
        assert postgres_books(url) == CONSISTENT


@pytest.mark.slow
def test_redis_outage_is_503_then_recovers_without_restart() -> None:
    """The shared rate limits live in Redis: without it nothing can be admitted (503, never a hang or a 500),
    and with it back requests go through again, with the same process."""
    proxy = CuttableProxy(("127.0.0.1", 6379))
    via_proxy = redis_url().replace("127.0.0.1:6379", f"127.0.0.1:{proxy.port}")
    assert f":{proxy.port}" in via_proxy
    with start_server("--parallel", "2", "--ctx", "1024", *PRICED, "--redis-url", via_proxy) as server:
        key = new_account(server, "limited", "100", plan="pro")  # a plan with limits: every request asks Redis
        assert chat(server, key).status_code == 200
        proxy.cut()
        started = time.monotonic()
        unavailable(chat(server, key))
        unavailable(chat(server, key, stream=True))
        assert time.monotonic() - started < 15  # refused promptly, not after a hang
        proxy.restore()
        deadline = time.monotonic() + 15
        while (r := chat(server, key)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        b = settled(server, key)
        records = usage(server, key)
        assert [r["status"] for r in records] == ["ok", "ok"] and b["open_holds"] == 0  # the refused held nothing
        assert b["balance_micro"] == 100_000_000 - sum(r["cost_micro"] for r in records)


# --- slow clients --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_limits() -> Iterator[Server]:
    with start_server("--parallel", "4", "--body-timeout", "1", "--write-timeout", "300") as server:
        yield server


def raw_request(server: Server, body: bytes, rcvbuf: int | None = None, send_body: bool = True) -> socket.socket:
    """A chat request on a raw socket (optionally with a small receive buffer); the body sent now or not."""
    host, port = server.base_url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf is not None:  # before connect, so the window the server sees stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + (body if send_body else b""))
    return s


@pytest.mark.slow
def test_a_client_that_stops_reading_stalls_only_its_own_stream(slow_limits: Server) -> None:
    """Backpressure is per stream: the stalled client's response waits in its own socket and queue, others
    stream on, and its generation runs to its end without waiting for the reader (it holds no engine slot)."""
    server = slow_limits
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 150, "ignore_eos": True, "stream": True}
    body |= {"logprobs": True, "top_logprobs": 20}  # about 2 KB an event: the socket buffers fill
    generated = server.engine_stats()["generated_tokens"]
    stalled = raw_request(server, json.dumps(body).encode(), rcvbuf=4096)
    try:
        # 20 events (40 KB) for a receive buffer of 4 KB: the client's window is shut, its stream stalled.
        wait_for(lambda: server.engine_stats()["generated_tokens"] >= generated + 20, "its first events", 60)
        started = time.monotonic()
        others = [Stream(server.v1, server.api_key, max_tokens=32) for _ in range(3)]
        for stream in others:
            stream.join(60)
            assert stream.done and not stream.failure, stream.failure
        assert time.monotonic() - started < 60
        stats = server.wait_idle(timeout=60)  # the stalled request's 150 tokens are generated without a reader
        assert stats["running"] == 0
        received = b""
        stalled.settimeout(30)
        while b"data: [DONE]" not in received:  # nothing was lost while it waited
            chunk = stalled.recv(1 << 20)
            assert chunk, "the server closed the stalled stream"
            received += chunk
        events = [json.loads(x[6:]) for x in received.decode().split("\r\n") if x.startswith("data: {")]
        tokens = sum(len((c.get("logprobs") or {}).get("content") or []) for e in events for c in e["choices"])
        assert tokens == 150
    finally:
        stalled.close()


@pytest.mark.slow
def test_a_client_that_reads_nothing_is_cut_off_after_the_write_timeout() -> None:
    """Its buffers full and nothing read for --write-timeout seconds: the connection is closed, generation stops
    and the request settles as cancelled (its hold released, what was generated charged)."""
    with start_server("--parallel", "2", "--write-timeout", "1") as server:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        body |= {"logprobs": True, "top_logprobs": 20}  # about 2 KB an event: its window shuts within 10 tokens
        stalled = raw_request(server, json.dumps(body).encode(), rcvbuf=4096)
        try:
            # Admitted (generating 1000 tokens takes far longer than the 1 s write timeout): its hold open, or on a
            # slow poll already settled.
            wait_for(lambda: balance(server)["open_holds"] or usage(server), "the request's admission")
            b = settled(server, timeout=60)  # the cut-off request's hold is released
            [record] = usage(server)
            assert record["status"] == "cancelled" and 0 < record["completion_tokens"] < 1000, record
            assert server.wait_idle(timeout=30)["running"] == 0  # generation stopped
            assert b["balance_micro"] == balance(server)["balance_micro"]  # settled once
            stalled.settimeout(30)
            received = b""
            with pytest.raises(ConnectionResetError):  # what was buffered, then the cut: the end never comes
                while chunk := stalled.recv(1 << 20):
                    received += chunk
                raise ConnectionResetError("closed")  # a FIN is a cut too
            assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received
        finally:
            stalled.close()


@pytest.mark.slow
def test_a_stalled_client_of_the_gateway_is_cut_off_and_its_engine_stays_healthy(tmp_path: Path) -> None:
    """The gateway stops reading the engine's stream while its client reads nothing; the gateway's write timeout
    (here 1 s, the engine's 120 s) cuts the client first: the engine's generation is stopped, the request settled
    as cancelled, and the engine is not blamed."""
    with start_server("--parallel", "2", command="engine") as engine:
        path = registry(tmp_path / "llamaserve.toml", [{"id": GATEWAY_MODEL, "upstreams": [engine.v1]}])
        with start_server("--config", str(path), "--write-timeout", "1") as gw:
            body = {"model": GATEWAY_MODEL, "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True}
            body |= {"stream": True, "logprobs": True, "top_logprobs": 20}
            stalled = raw_request(gw, json.dumps(body).encode(), rcvbuf=4096)
            try:
                wait_for(lambda: balance(gw)["open_holds"] or usage(gw), "the request's admission")
                settled(gw, timeout=60)
                [record] = usage(gw)
                assert record["status"] == "cancelled" and record["completion_tokens"] < 1000, record
                assert engine.wait_idle(timeout=30)["running"] == 0  # the engine stopped generating for it
                assert healthy(gw, engine.v1)
                r = httpx.post(
                    f"{gw.v1}/chat/completions",
                    json={"model": GATEWAY_MODEL, "messages": MESSAGES, "max_tokens": 2},
                    headers=gw.auth,
                    timeout=60,
                )
                assert r.status_code == 200, r.text
            finally:
                stalled.close()


def test_a_body_trickled_a_byte_at_a_time_is_408_within_the_body_timeout(slow_limits: Server) -> None:
    """Each byte arrives in time, the whole body does not: the limit is on the body, not on each read."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2}).encode()
    s = raw_request(slow_limits, body, send_body=False)
    started = time.monotonic()
    try:
        s.settimeout(0.25)
        reply = b""
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # the server answered and closed
                break
            try:
                if reply := s.recv(65536):
                    break
            except TimeoutError:
                continue
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):  # to the end: the server closes after a 408
                reply += chunk
        except ConnectionResetError:  # closed too, with a byte sent as the 408 left unread: a reset, not a FIN
            pass
    finally:
        s.close()
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply
    # Sent whole, the body would take its length × 0.25 s (over 20 s): 10 s leaves room for a loaded machine.
    assert b'"code":"timeout"' in reply.replace(b" ", b"") and 0.95 <= elapsed < 10, elapsed
