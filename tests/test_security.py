"""One account cannot reach another's data through any route, and admin routes refuse user credentials.

Two accounts, A and B, each with a dashboard login, keys and usage. With A's key and A's dashboard session,
every route of /openapi.json is tried with B's things (key prefixes, account name, email) wherever a route
takes one: the answer is 401, 403 or 404, or A's own data, never B's; and B is unchanged afterwards. The routes
come from the spec itself, and each must be classified below: a new route fails this test until someone says
how it keeps accounts apart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, start_server
from tests.test_dashboard import Visitor

ADMIN = "security-admin-key"
PASSWORD = "a long enough password"


@dataclass
class Account:
    name: str
    email: str
    key: str  # a whole API key
    prefix: str
    visitor: Visitor  # logged in to the dashboard
    request_ids: set[str] = field(default_factory=set)
    balance_micro: int = 0  # after its own requests
    file_id: str = ""  # a batch input file
    batch_id: str = ""  # a batch of it, completed


@dataclass
class World:
    server: Server
    a: Account
    b: Account

    def key_get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.server.base_url}{path}", params=params, headers=bearer(self.a.key), timeout=60)

    def key_send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        url = f"{self.server.base_url}{path}"
        return httpx.request(method, url, json=body, headers=bearer(self.a.key), timeout=120)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_account(server: Server, name: str) -> Account:
    admin = httpx.Client(base_url=server.base_url, headers=bearer(ADMIN), timeout=60)
    body = {"name": name, "plan": "unlimited", "credits": "10", "email": f"{name}@example.com", "password": PASSWORD}
    assert admin.post("/admin/accounts", json=body).status_code == 201
    key = admin.post(f"/admin/accounts/{name}/keys", json={"name": f"{name}'s key"}).json()
    visitor = Visitor(server)
    assert visitor.login(f"{name}@example.com", PASSWORD).status_code == 200
    account = Account(name, f"{name}@example.com", key["key"], key["prefix"], visitor)
    for _ in range(2):
        r = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers=bearer(account.key),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        account.request_ids.add(r.headers["x-request-id"])
    run_batch(server, account)
    account.balance_micro = settled(server, account)["balance_micro"]
    return account


BATCH_LINE = {
    "custom_id": "one",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
}


def upload(server: Server, key: str) -> httpx.Response:
    files = {"file": ("in.jsonl", json.dumps(BATCH_LINE).encode())}
    return httpx.post(f"{server.v1}/files", files=files, data={"purpose": "batch"}, headers=bearer(key), timeout=60)


def run_batch(server: Server, account: Account) -> None:
    """A batch of one line, run to its end: the account's file, batch, output file and one more usage record."""
    client = httpx.Client(base_url=server.v1, headers=bearer(account.key), timeout=60)
    account.file_id = upload(server, account.key).json()["id"]
    body = {"input_file_id": account.file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    account.batch_id = client.post("/batches", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while (batch := client.get(f"/batches/{account.batch_id}").json())["status"] != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    output = client.get(f"/files/{batch['output_file_id']}/content").json()
    account.request_ids.add(output["response"]["request_id"])


def settled(server: Server, account: Account) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        balance = httpx.get(f"{server.v1}/account/balance", headers=bearer(account.key)).json()
        if not balance["open_holds"] or time.monotonic() > deadline:
            return balance


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with start_server("--parallel", "2", "--admin-key", ADMIN) as server:
        yield World(server, make_account(server, "alice"), make_account(server, "bob"))


def refused(r: httpx.Response, *statuses: int) -> None:
    assert r.status_code in statuses, (r.request.method, r.request.url, r.status_code, r.text[:300])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def no_trace_of_b(world: World, r: httpx.Response) -> None:
    """Nothing of B's in a response: not its name, email, key prefix or request ids."""
    text = r.text
    b = world.b
    for secret in (b.name, b.email, b.prefix, b.file_id, b.batch_id, *b.request_ids):
        assert secret not in text, (r.request.url, secret)


# --- the probes, one per route ---------------------------------------------------------------------------------
def chat(world: World) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "user": world.b.name}
    r = world.key_send("POST", "/v1/chat/completions", body)
    assert r.status_code == 200  # billed to A: B's balance is checked at the end
    no_trace_of_b(world, r)


def chat_by_path(world: World) -> None:
    r = world.key_send("POST", f"/v1/{MODEL}", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert r.status_code == 200  # billed to A
    no_trace_of_b(world, r)


def completions(world: World) -> None:
    r = world.key_send("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200
    no_trace_of_b(world, r)


def public(path: str, method: str = "GET", body: Any = None) -> Callable[[World], None]:
    """A route that serves no account's data, whoever calls it."""

    def probe(world: World) -> None:
        r = httpx.request(method, f"{world.server.base_url}{path}", json=body, timeout=60)
        assert r.status_code < 400, r.text
        no_trace_of_b(world, r)

    return probe


def key_post(path: str, body: Any) -> Callable[[World], None]:
    """Model work that serves no account's data, for a key only (it costs CPU like a request)."""

    def probe(world: World) -> None:
        r = world.key_send("POST", path, body)
        assert r.status_code == 200, r.text
        no_trace_of_b(world, r)
        refused(httpx.post(f"{world.server.base_url}{path}", json=body, timeout=60), 401)

    return probe


def key_get(path: str) -> Callable[[World], None]:
    def probe(world: World) -> None:
        r = world.key_get(path)
        assert r.status_code == 200
        no_trace_of_b(world, r)

    return probe


def balance(world: World) -> None:
    r = world.key_get("/v1/account/balance")
    assert r.json()["account"] == world.a.name
    no_trace_of_b(world, r)


def usage(world: World) -> None:
    for params in ({}, {"model": MODEL}, {"since": "0", "limit": "10000"}):
        r = world.key_get("/v1/account/usage", **params)
        ids = {item["request_id"] for item in r.json()["data"]}
        assert ids and not ids & world.b.request_ids, params
        no_trace_of_b(world, r)


def upload_file(world: World) -> None:
    r = upload(world.server, world.a.key)
    assert r.status_code == 200, r.text
    no_trace_of_b(world, r)


def list_files(world: World) -> None:
    r = world.key_get("/v1/files")
    assert world.a.file_id in r.text
    no_trace_of_b(world, r)


def list_batches(world: World) -> None:
    r = world.key_get("/v1/batches")
    assert world.a.batch_id in r.text
    no_trace_of_b(world, r)


def create_batch(world: World) -> None:
    """B's input file is as absent as a file that does not exist."""
    body = {"input_file_id": world.b.file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    refused(world.key_send("POST", "/v1/batches", body), 404)


def b_object(method: str, path: str) -> Callable[[World], None]:
    """B's file or batch in the path: 404, exactly as for one that does not exist."""

    def probe(world: World) -> None:
        url = path.format(file_id=world.b.file_id, batch_id=world.b.batch_id)
        refused(world.key_send(method, url), 404)

    return probe


def admin_route(method: str, path: str, body: Any = None) -> Callable[[World], None]:
    """Admin routes with B's things in the path: A's key is not the admin key (401), A's session is not an
    admin's (403), and B's key in the path changes nothing."""

    def probe(world: World) -> None:
        url = path.format(name=world.b.name, prefix=world.b.prefix, action="revoke")
        refused(world.key_send(method, url, body), 401)
        refused(world.a.visitor.request(method, url, json=body), 403)
        r = httpx.request(method, f"{world.server.base_url}{url}", json=body, timeout=60)  # nobody at all
        refused(r, 401, 403)

    return probe


def dashboard_get(path: str) -> Callable[[World], None]:
    """The session's own account only; an API key is no session."""

    def probe(world: World) -> None:
        r = world.a.visitor.get(path)
        assert r.status_code == 200, r.text
        no_trace_of_b(world, r)
        refused(world.key_get(path), 401)

    return probe


def dashboard_keys(world: World) -> None:
    dashboard_get("/v1/dashboard/keys")(world)
    keys = world.a.visitor.get("/v1/dashboard/keys").json()["data"]
    assert {k["account"] for k in keys} == {world.a.name}


def dashboard_usage(world: World) -> None:
    dashboard_get("/v1/dashboard/usage")(world)
    ids = {item["request_id"] for item in world.a.visitor.get("/v1/dashboard/usage").json()["data"]}
    assert ids and not ids & world.b.request_ids


def dashboard_change(method: str, path: str, body: Any = None) -> Callable[[World], None]:
    """B's key prefix in the path: 404, exactly as for a key that does not exist."""

    def probe(world: World) -> None:
        url = path.format(prefix=world.b.prefix)
        refused(world.a.visitor.request(method, url, json=body), 404)
        refused(world.key_send(method, url, body), 401)

    return probe


def dashboard_batches(world: World) -> None:
    dashboard_get("/v1/dashboard/batches")(world)
    assert [b["id"] for b in world.a.visitor.get("/v1/dashboard/batches").json()["data"]] == [world.a.batch_id]


def dashboard_file(world: World) -> None:
    """A's own file downloads; B's is 404, as one that does not exist; an API key is no session."""
    assert world.a.visitor.get(f"/v1/dashboard/files/{world.a.file_id}/content").status_code == 200
    refused(world.a.visitor.get(f"/v1/dashboard/files/{world.b.file_id}/content"), 404)
    refused(world.key_get(f"/v1/dashboard/files/{world.a.file_id}/content"), 401)


def new_key(world: World) -> None:
    r = world.a.visitor.post("/v1/dashboard/keys", {"name": "new"})
    assert r.status_code == 201 and r.json()["account"] == world.a.name
    refused(world.key_send("POST", "/v1/dashboard/keys", {"name": "by key"}), 401)


def playground_key(world: World) -> None:
    r = world.a.visitor.post("/v1/dashboard/playground/key")
    assert r.status_code == 201 and r.json()["account"] == world.a.name
    refused(world.key_send("POST", "/v1/dashboard/playground/key"), 401)


def signup(world: World) -> None:
    """B's email is taken; the answer says so and nothing more."""
    visitor = Visitor(world.server)
    r = visitor.signup(world.b.email, "another long password")
    refused(r, 409)
    assert world.b.name not in r.text.replace(world.b.email, "")


def login(world: World) -> None:
    refused(Visitor(world.server).login(world.b.email, "wrong password"), 401)
    refused(Visitor(world.server).login(world.b.email, world.b.key), 401)  # a key is no password


def logout(world: World) -> None:
    """A's log-out ends A's session only (a fresh one: the sweep goes on with the first)."""
    other = Visitor(world.server)
    assert other.login(world.a.email, PASSWORD).status_code == 200
    assert other.post("/auth/logout").status_code == 200
    assert world.b.visitor.get("/v1/dashboard/account").status_code == 200


SWEEP: dict[tuple[str, str], Callable[[World], None]] = {
    ("POST", "/v1/chat/completions"): chat,
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/{model}"): chat_by_path,
    ("GET", "/v1/models"): key_get("/v1/models"),
    ("GET", "/v1/models/{model_id}"): key_get(f"/v1/models/{MODEL}"),
    ("POST", "/tokenize"): key_post("/tokenize", {"prompt": "bob"}),
    ("POST", "/detokenize"): key_post("/detokenize", {"tokens": [1, 2]}),
    ("GET", "/v1/account/balance"): balance,
    ("GET", "/v1/account/usage"): usage,
    ("POST", "/v1/files"): upload_file,
    ("GET", "/v1/files"): list_files,
    ("GET", "/v1/files/{file_id}"): b_object("GET", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"): b_object("GET", "/v1/files/{file_id}/content"),
    ("DELETE", "/v1/files/{file_id}"): b_object("DELETE", "/v1/files/{file_id}"),
    ("POST", "/v1/batches"): create_batch,
    ("GET", "/v1/batches"): list_batches,
    ("GET", "/v1/batches/{batch_id}"): b_object("GET", "/v1/batches/{batch_id}"),
    ("POST", "/v1/batches/{batch_id}/cancel"): b_object("POST", "/v1/batches/{batch_id}/cancel"),
    ("GET", "/admin/accounts"): admin_route("GET", "/admin/accounts"),
    ("POST", "/admin/accounts"): admin_route("POST", "/admin/accounts", {"name": "mallory"}),
    ("PATCH", "/admin/accounts/{name}"): admin_route("PATCH", "/admin/accounts/{name}", {"status": "suspended"}),
    ("POST", "/admin/accounts/{name}/credits"): admin_route(
        "POST", "/admin/accounts/{name}/credits", {"amount": "-10"}
    ),
    ("GET", "/admin/accounts/{name}/keys"): admin_route("GET", "/admin/accounts/{name}/keys"),
    ("POST", "/admin/accounts/{name}/keys"): admin_route("POST", "/admin/accounts/{name}/keys", {}),
    ("POST", "/admin/keys/{prefix}/{action}"): admin_route("POST", "/admin/keys/{prefix}/{action}"),
    ("POST", "/admin/engine/reset-prefix-cache"): admin_route("POST", "/admin/engine/reset-prefix-cache"),
    ("GET", "/auth/session"): public("/auth/session"),
    ("POST", "/auth/signup"): signup,
    ("POST", "/auth/login"): login,
    ("POST", "/auth/logout"): logout,
    ("GET", "/v1/dashboard/account"): dashboard_get("/v1/dashboard/account"),
    ("GET", "/v1/dashboard/plans"): dashboard_get("/v1/dashboard/plans"),
    ("GET", "/v1/dashboard/models"): dashboard_get("/v1/dashboard/models"),
    ("GET", "/v1/dashboard/keys"): dashboard_keys,
    ("POST", "/v1/dashboard/keys"): new_key,
    ("PATCH", "/v1/dashboard/keys/{prefix}"): dashboard_change(
        "PATCH", "/v1/dashboard/keys/{prefix}", {"enabled": False}
    ),
    ("POST", "/v1/dashboard/keys/{prefix}/revoke"): dashboard_change("POST", "/v1/dashboard/keys/{prefix}/revoke"),
    ("POST", "/v1/dashboard/playground/key"): playground_key,
    ("GET", "/v1/dashboard/usage"): dashboard_usage,
    ("GET", "/v1/dashboard/usage/summary"): dashboard_get("/v1/dashboard/usage/summary"),
    ("GET", "/v1/dashboard/batches"): dashboard_batches,
    ("GET", "/v1/dashboard/files/{file_id}/content"): dashboard_file,
    ("GET", "/health"): public("/health"),
    ("GET", "/ready"): public("/ready"),
    ("GET", "/metrics"): public("/metrics"),
}


def test_every_route_is_classified(world: World) -> None:
    spec = httpx.get(f"{world.server.base_url}/openapi.json").json()
    routes = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    assert routes - set(SWEEP) == set(), "routes nobody has said how they keep accounts apart"
    assert set(SWEEP) - routes == set(), "classified routes the server no longer has"


@pytest.mark.parametrize("route", list(SWEEP), ids=[f"{m} {p}" for m, p in SWEEP])
def test_no_route_reaches_another_accounts_data(world: World, route: tuple[str, str]) -> None:
    SWEEP[route](world)


def test_b_is_unchanged_after_the_sweep(world: World) -> None:
    b = world.b
    assert settled(world.server, b)["balance_micro"] == b.balance_micro
    usage = httpx.get(f"{world.server.v1}/account/usage", headers=bearer(b.key)).json()["data"]
    assert {item["request_id"] for item in usage} == b.request_ids
    assert httpx.get(f"{world.server.v1}/files/{b.file_id}", headers=bearer(b.key)).status_code == 200
    batch = httpx.get(f"{world.server.v1}/batches/{b.batch_id}", headers=bearer(b.key)).json()
    assert batch["status"] == "completed" and batch["cancelling_at"] is None
    [key] = b.visitor.get("/v1/dashboard/keys").json()["data"]
    assert (key["prefix"], key["enabled"], key["revoked"], key["name"]) == (b.prefix, True, False, "bob's key")
    account = b.visitor.get("/v1/dashboard/account").json()
    assert account["plan"] == "unlimited" and account["account"] == b.name
    with httpx.Client(base_url=world.server.base_url, headers=bearer(ADMIN)) as admin:
        [view] = [a for a in admin.get("/admin/accounts").json()["data"] if a["name"] == b.name]
    assert view["status"] == "active"
