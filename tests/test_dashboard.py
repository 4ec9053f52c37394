"""The dashboard's APIs and their security, through real servers: sign-up, log-in and log-out; session cookies
and their flags; CSRF on every state-changing call; log-in rate limits; one account never seeing or changing
another's keys or usage; the playground's session key; admin sessions on the /admin API; passwords and session
tokens never stored or logged. The store's new functions run on SQLite and PostgreSQL.

httpx will not send a Secure cookie back over http://, as browsers do for 127.0.0.1, so `Visitor` keeps the
cookies itself (tests/test_browser.py drives a real browser)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text

from llamaserve.billing.migrations import alembic_config
from llamaserve.billing.models import UsageRecord
from llamaserve.billing.store import AuthError, Store, StoreError, Usage
from tests import test_store
from tests.conftest import MODEL, Server, start_server
from tests.test_store import all_rows, backdate

ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "correct horse battery staple"
PASSWORD = "hunter2-but-longer"
PRICES = ("--price-input", "1000", "--price-output", "1000", "--starter-credits", "3")
MESSAGES = [{"role": "user", "content": "Say hi."}]
url = test_store.url  # fixtures: a fresh database on SQLite and on PostgreSQL, and a Store migrated on it
store = test_store.store


class Visitor:
    """One browser: its cookies, its CSRF token (from the last response that had one) and its Origin."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base_url, timeout=60)
        self.cookies: dict[str, str] = {}
        self.csrf = ""
        self.set_cookies: list[str] = []  # every Set-Cookie header received

    def request(self, method: str, path: str, *, csrf: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method != "GET":
            headers.setdefault("X-CSRF-Token", self.csrf if csrf is None else csrf)
        r = self.http.request(method, path, headers=headers, **kwargs)
        for header in r.headers.get_list("set-cookie"):
            self.set_cookies.append(header)
            for name, morsel in SimpleCookie(header).items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            if isinstance(body, dict) and isinstance(body.get("csrf_token"), str):
                self.csrf = body["csrf_token"]
        return r

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, json=body if body is not None else {}, **kwargs)

    def patch(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", path, json=body, **kwargs)

    def signup(self, email: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/auth/session")  # the pre-login CSRF cookie and token, as the page gets them
        return self.post("/auth/signup", {"email": email, "password": password})

    def login(self, email: str, password: str = PASSWORD) -> httpx.Response:
        self.get("/auth/session")
        return self.post("/auth/login", {"email": email, "password": password})

    def new_key(self, name: str = "test", **body: Any) -> dict[str, Any]:
        r = self.post("/v1/dashboard/keys", {"name": name, **body})
        assert r.status_code == 201, r.text
        return r.json()


def error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    return body


def chat(server: Server, key: str, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, **body}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.v1}/chat/completions", json=payload, headers=headers, timeout=120)


def create_admin(data_dir: Path, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> None:
    """An admin account made with the CLI, as an operator would before the first start."""
    cmd = [sys.executable, "-m", "llamaserve.cli", "accounts", "create", "root", "--plan", "unlimited"]
    cmd += ["--email", email, "--admin", "--password-stdin", "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, input=password + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server whose store has an admin account (made by the CLI) and no --admin-key."""
    with tempfile.TemporaryDirectory(prefix="llamaserve-dashboard-") as tmp:
        create_admin(Path(tmp))
        with start_server("--parallel", "4", *PRICES, "--signups-per-hour", "0", data_dir=Path(tmp)) as s:
            yield s


def wait_settled(visitor: Visitor, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (account := visitor.get("/v1/dashboard/account").json())["open_holds"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return account


# --- sign-up, log-in, log-out ----------------------------------------------------------------------------------
def test_signup_logs_in_with_starter_credits_and_logout_ends_the_session(server: Server) -> None:
    v = Visitor(server)
    before = v.get("/auth/session").json()
    assert before["authenticated"] is False and before["signup_enabled"] is True and before["csrf_token"]
    r = v.signup("Ann@Example.com")
    assert r.status_code == 201, r.text
    assert r.json()["account"] == "ann@example.com" and r.json()["email"] == "ann@example.com"
    assert v.get("/auth/session").json()["authenticated"] is True
    account = v.get("/v1/dashboard/account").json()
    assert (account["balance_micro"], account["plan"], account["is_admin"]) == (3_000_000, "free", False)
    old = dict(v.cookies)
    assert v.post("/auth/logout").status_code == 200
    assert "ls_session" not in v.cookies
    replay = Visitor(server)
    replay.cookies = old  # the cookie of the ended session, replayed
    error(replay.get("/v1/dashboard/keys"), 401, "not_logged_in")
    assert replay.get("/auth/session").json()["authenticated"] is False
    assert v.login("ann@example.com").status_code == 200
    assert v.get("/v1/dashboard/account").status_code == 200


def test_signup_validates_and_refuses_a_taken_email(server: Server) -> None:
    v = Visitor(server)
    assert error(v.signup("not-an-email"), 400, "invalid_value")["param"] == "email"
    assert error(v.signup("short@example.com", "1234567"), 400, "invalid_value")["param"] == "password"
    assert v.signup("taken@example.com").status_code == 201
    error(Visitor(server).signup("TAKEN@example.com"), 409, "email_taken")


def test_wrong_password_and_unknown_email_look_the_same(server: Server) -> None:
    Visitor(server).signup("bea@example.com")
    wrong = error(Visitor(server).login("bea@example.com", "wrong password!"), 401, "invalid_credentials")
    unknown = error(Visitor(server).login("nobody@example.com"), 401, "invalid_credentials")
    assert wrong["message"] == unknown["message"]


def test_session_cookies_are_secure_httponly_samesite(server: Server) -> None:
    v = Visitor(server)
    v.signup("flags@example.com")
    cookies = {SimpleCookie(h).popitem()[0]: h.lower() for h in v.set_cookies}
    assert {"ls_session", "ls_csrf"} <= set(cookies)
    for header in cookies.values():
        attributes = {part.strip() for part in header.split(";")}
        assert {"secure", "httponly", "samesite=strict", "path=/"} <= attributes, header


def test_login_attempts_are_rate_limited(server: Server) -> None:
    Visitor(server).signup("target@example.com")
    for _ in range(5):
        error(Visitor(server).login("target@example.com", "guess-guess"), 401, "invalid_credentials")
    r = Visitor(server).login("target@example.com")  # even the right password, until the window passes
    error(r, 429, "too_many_login_attempts")
    assert 1 <= int(r.headers["Retry-After"]) <= 300
    Visitor(server).signup("neighbour@example.com")
    assert Visitor(server).login("neighbour@example.com").status_code == 200  # per email: others are unaffected


def test_x_forwarded_for_does_not_reset_the_login_limiter(server: Server) -> None:
    """Forwarded headers are believed only from the proxies --forwarded-allow-ips names (none here): a client that
    sends a new X-Forwarded-For with each guess is still one client (uvicorn believed it from 127.0.0.1)."""
    Visitor(server).signup("forged@example.com")

    def guess(i: int, password: str = "guess-guess") -> httpx.Response:
        v = Visitor(server)
        v.get("/auth/session")
        forged = {"X-Forwarded-For": f"203.0.113.{i}", "X-Forwarded-Proto": "https"}
        return v.post("/auth/login", {"email": "forged@example.com", "password": password}, headers=forged)

    for i in range(5):
        error(guess(i), 401, "invalid_credentials")
    error(guess(99, PASSWORD), 429, "too_many_login_attempts")


def test_no_swagger_page_loads_scripts_from_a_cdn(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/docs").status_code == 404
    assert httpx.get(f"{server.base_url}/redoc").status_code == 404
    assert httpx.get(f"{server.base_url}/openapi.json").status_code == 200


# --- CSRF ----------------------------------------------------------------------------------------------------
def test_csrf_token_is_required_on_every_state_change(server: Server) -> None:
    v = Visitor(server)
    v.get("/auth/session")
    credentials = {"email": "csrf@example.com", "password": PASSWORD}
    error(v.post("/auth/signup", credentials, csrf=""), 403, "csrf_failed")
    error(v.post("/auth/signup", credentials, csrf="x" * 43), 403, "csrf_failed")
    assert v.signup("csrf@example.com").status_code == 201
    key = v.new_key()["prefix"]
    for method, path, body in [
        ("POST", "/v1/dashboard/keys", {"name": "sneaky"}),
        ("PATCH", f"/v1/dashboard/keys/{key}", {"enabled": False}),
        ("POST", f"/v1/dashboard/keys/{key}/revoke", {}),
        ("POST", "/v1/dashboard/playground/key", {}),
        ("POST", "/auth/logout", {}),
    ]:
        error(v.request(method, path, json=body, csrf=""), 403, "csrf_failed")
        error(v.request(method, path, json=body, csrf="0" * 64), 403, "csrf_failed")
        # The right token from a page on another site (a browser names it in Origin) is refused too.
        foreign = {"Origin": "https://evil.example"}
        error(v.request(method, path, json=body, headers=foreign), 403, "csrf_failed")
    [only] = v.get("/v1/dashboard/keys").json()["data"]
    assert (only["prefix"], only["enabled"], only["revoked"]) == (key, True, False)  # nothing changed
    assert v.get("/auth/session").json()["authenticated"] is True  # still logged in
    # A pre-login token is no session's token.
    pre = Visitor(server).get("/auth/session").json()["csrf_token"]
    error(v.post("/v1/dashboard/keys", {"name": "x"}, csrf=pre), 403, "csrf_failed")


def test_login_needs_the_csrf_cookie_and_header_to_match(server: Server) -> None:
    Visitor(server).signup("fixation@example.com")
    attacker = Visitor(server)
    token = attacker.get("/auth/session").json()["csrf_token"]
    victim = Visitor(server)  # has no ls_csrf cookie: a cross-site form or fetch cannot supply one
    r = victim.post("/auth/login", {"email": "fixation@example.com", "password": PASSWORD}, csrf=token)
    error(r, 403, "csrf_failed")


# --- one account never sees or changes another's ---------------------------------------------------------------
def test_another_accounts_keys_and_usage_are_out_of_reach(server: Server) -> None:
    alice, bob = Visitor(server), Visitor(server)
    alice.signup("alice@example.com")
    bob.signup("bob@example.com")
    key = alice.new_key("alice's")
    assert chat(server, key["key"]).status_code == 200
    wait_settled(alice)
    assert [k["prefix"] for k in bob.get("/v1/dashboard/keys").json()["data"]] == []
    error(bob.patch(f"/v1/dashboard/keys/{key['prefix']}", {"enabled": False}), 404, "not_found")
    error(bob.patch(f"/v1/dashboard/keys/{key['prefix']}", {"name": "mine now"}), 404, "not_found")
    error(bob.post(f"/v1/dashboard/keys/{key['prefix']}/revoke"), 404, "not_found")
    unknown = error(bob.post("/v1/dashboard/keys/zzzzzzzzzz/revoke"), 404, "not_found")
    assert "alice" not in unknown["message"]  # the same answer as for a key that does not exist
    assert bob.get("/v1/dashboard/usage").json()["data"] == []
    assert bob.get("/v1/dashboard/usage/summary").json()["data"] == []
    assert bob.get("/v1/dashboard/account").json()["balance_micro"] == 3_000_000
    for method, path in [("GET", "/admin/accounts"), ("PATCH", "/admin/accounts/alice@example.com")]:
        error(bob.request(method, path, json={"status": "suspended"}), 403, "not_admin")
    # Alice's key is untouched and still works; her usage is hers.
    [mine] = alice.get("/v1/dashboard/keys").json()["data"]
    assert (mine["name"], mine["enabled"], mine["revoked"]) == ("alice's", True, False)
    assert chat(server, key["key"]).status_code == 200
    wait_settled(alice)
    [record, _] = alice.get("/v1/dashboard/usage").json()["data"]
    assert record["key"] == key["prefix"] and record["key_name"] == "alice's"
    # A key is no session: the dashboard API wants the cookie.
    r = httpx.get(f"{server.base_url}/v1/dashboard/keys", headers={"Authorization": f"Bearer {key['key']}"})
    error(r, 401, "not_logged_in")


# --- keys ----------------------------------------------------------------------------------------------------
def test_dashboard_key_lifecycle_is_enforced_by_the_api_at_once(server: Server) -> None:
    v = Visitor(server)
    v.signup("keys@example.com")
    key = v.new_key("laptop")
    assert key["key"].startswith(f"ls-{key['prefix']}_") and key["expires"] is None
    assert "key" not in v.get("/v1/dashboard/keys").json()["data"][0]  # shown once: never listed
    assert chat(server, key["key"]).status_code == 200
    assert v.patch(f"/v1/dashboard/keys/{key['prefix']}", {"enabled": False}).json()["enabled"] is False
    assert chat(server, key["key"]).json()["error"]["code"] == "api_key_disabled"  # no 5 s cache delay
    v.patch(f"/v1/dashboard/keys/{key['prefix']}", {"enabled": True})
    assert chat(server, key["key"]).status_code == 200
    assert v.patch(f"/v1/dashboard/keys/{key['prefix']}", {"name": "desktop"}).json()["name"] == "desktop"
    v.post(f"/v1/dashboard/keys/{key['prefix']}/revoke")
    assert chat(server, key["key"]).status_code == 401
    listed = v.get("/v1/dashboard/keys").json()["data"]
    assert [(k["name"], k["revoked"]) for k in listed] == [("desktop", True)] and listed[0]["last_used"]


def test_allowed_models_must_be_served_and_are_enforced(server: Server) -> None:
    v = Visitor(server)
    v.signup("models@example.com")
    r = v.post("/v1/dashboard/keys", {"allowed_models": ["gpt-5"]})
    assert error(r, 400, "model_not_found")["param"] == "allowed_models[0]"
    assert v.get("/v1/dashboard/models").json()["data"] == [{"id": MODEL}]
    key = v.new_key(allowed_models=[MODEL])
    assert key["allowed_models"] == [MODEL] and chat(server, key["key"]).status_code == 200


# --- playground ----------------------------------------------------------------------------------------------
def test_playground_key_is_billed_to_the_account_and_dies_with_the_session(server: Server) -> None:
    v = Visitor(server)
    v.signup("play@example.com")
    first = v.post("/v1/dashboard/playground/key").json()
    assert first["name"] == "playground" and first["expires"] > time.time() + 3600
    assert chat(server, first["key"]).status_code == 200
    second = v.post("/v1/dashboard/playground/key").json()
    assert chat(server, first["key"]).status_code == 401  # replaced: one live playground key per session
    r = chat(server, second["key"], max_tokens=5)
    assert r.status_code == 200
    account = wait_settled(v)
    records = v.get("/v1/dashboard/usage").json()["data"]
    assert [rec["key_name"] for rec in records] == ["playground", "playground"]
    assert sum(rec["cost_micro"] for rec in records) == 3_000_000 - account["balance_micro"]
    usage = r.json()["usage"]
    assert records[0]["cost_micro"] == (usage["prompt_tokens"] + usage["completion_tokens"]) * 1000
    assert v.get("/v1/dashboard/keys").json()["data"] == []  # not among the user's keys
    other = Visitor(server)
    other.login("play@example.com")
    third = other.post("/v1/dashboard/playground/key").json()
    v.post("/auth/logout")
    assert chat(server, second["key"]).status_code == 401  # revoked with its session
    assert chat(server, third["key"]).status_code == 200  # another session's key lives on


def test_concurrent_playground_keys_all_die_with_the_session(server: Server) -> None:
    """8 at once in one session: each revokes the one before it, and the log-out the last (5 of 8 outlived it)."""
    from concurrent.futures import ThreadPoolExecutor

    v = Visitor(server)
    v.signup("race@example.com")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: v.post("/v1/dashboard/playground/key"), range(8)))
    keys = [r.json()["key"] for r in replies if r.status_code == 201]
    assert len(keys) == 8, [r.text for r in replies]
    assert sum(chat(server, key).status_code == 200 for key in keys) == 1  # one live key per session
    v.post("/auth/logout")
    assert [chat(server, key).status_code for key in keys] == [401] * 8


# --- usage ---------------------------------------------------------------------------------------------------
def test_usage_summary_adds_up_to_the_records(server: Server) -> None:
    v = Visitor(server)
    v.signup("usage@example.com")
    one, two = v.new_key("one"), v.new_key("two")
    for key in (one, one, two):
        assert chat(server, key["key"]).status_code == 200
    wait_settled(v)
    records = v.get("/v1/dashboard/usage").json()["data"]
    for bucket in ("hour", "day"):
        since = str(int(time.time()) - 86400)
        summary = v.get("/v1/dashboard/usage/summary", params={"bucket": bucket, "since": since}).json()
        assert summary["bucket_seconds"] == {"hour": 3600, "day": 86400}[bucket]
        by_key = {row["key"]: row for row in summary["data"]}
        assert by_key[one["prefix"]]["requests"] == 2 and by_key[two["prefix"]]["requests"] == 1
        assert sum(row["cost_micro"] for row in summary["data"]) == sum(r["cost_micro"] for r in records)
        assert {row["start"] % summary["bucket_seconds"] for row in summary["data"]} == {0}
        assert {k["name"] for k in summary["keys"]} == {"one", "two"}
    r = v.get("/v1/dashboard/usage/summary", params={"since": "0", "bucket": "hour"})
    assert error(r, 400, "invalid_value")["param"] == "since"  # 56 years of hours: too many buckets


# --- admin ---------------------------------------------------------------------------------------------------
def test_admin_session_drives_the_admin_api(server: Server) -> None:
    admin = Visitor(server)
    assert admin.login(ADMIN_EMAIL, ADMIN_PASSWORD).json()["is_admin"] is True
    user = Visitor(server)
    user.signup("managed@example.com")
    key = user.new_key()["key"]
    accounts = {a["name"]: a for a in admin.get("/admin/accounts").json()["data"]}  # no --admin-key needed
    assert accounts["managed@example.com"]["email"] == "managed@example.com"
    error(admin.post("/admin/accounts/managed@example.com/credits", {"amount": "2"}, csrf=""), 403, "csrf_failed")
    r = admin.post("/admin/accounts/managed@example.com/credits", {"amount": "2"})
    assert r.json()["balance_micro"] == 5_000_000
    assert admin.patch("/admin/accounts/managed@example.com", {"plan": "pro"}).json()["plan"] == "pro"
    admin.patch("/admin/accounts/managed@example.com", {"status": "suspended"})
    assert chat(server, key).json()["error"]["code"] == "account_suspended"
    error(user.get("/v1/dashboard/keys"), 401, "not_logged_in")  # a suspended account's sessions end
    error(Visitor(server).login("managed@example.com"), 403, "account_suspended")
    # A wrong password is answered alike: the answer must not confirm a suspended account's password.
    error(Visitor(server).login("managed@example.com", "not-the-password"), 403, "account_suspended")
    admin.patch("/admin/accounts/managed@example.com", {"status": "active"})
    assert Visitor(server).login("managed@example.com").status_code == 200


def test_no_signup_leaves_account_creation_to_admins() -> None:
    with tempfile.TemporaryDirectory(prefix="llamaserve-dashboard-") as tmp:
        create_admin(Path(tmp))
        with start_server("--parallel", "1", "--no-signup", data_dir=Path(tmp)) as private:
            v = Visitor(private)
            assert v.get("/auth/session").json()["signup_enabled"] is False
            error(v.signup("walk-in@example.com"), 403, "signup_disabled")
            assert httpx.get(f"{private.base_url}/signup", follow_redirects=True).url.path == "/login"
            assert "Sign up" not in httpx.get(f"{private.base_url}/login").text
            admin = Visitor(private)
            admin.login(ADMIN_EMAIL, ADMIN_PASSWORD)
            body = {"name": "carol", "email": "carol@example.com", "password": PASSWORD, "credits": "1"}
            assert admin.post("/admin/accounts", body).status_code == 201
            carol = Visitor(private)
            assert carol.login("carol@example.com").json()["account"] == "carol"
            assert carol.get("/v1/dashboard/account").json()["balance_micro"] == 1_000_000


def test_cli_gives_an_existing_account_a_login(server: Server) -> None:
    def cli(*args: str, stdin: str = "") -> str:
        cmd = [sys.executable, "-m", "llamaserve.cli", "accounts", *args, "--data-dir", str(server.data_dir)]
        wide = {**os.environ, "COLUMNS": "200"}  # rich would cut the table's cells to 80 columns
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, env=wide)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    cli("create", "erin")  # the server is running: the CLI works on the same store
    error(Visitor(server).login("erin@example.com"), 401, "invalid_credentials")
    out = cli("set-login", "erin", "--email", "Erin@Example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert "erin@example.com" in out and PASSWORD not in out
    v = Visitor(server)
    assert v.login("erin@example.com").json()["is_admin"] is False
    cli("set-login", "erin", "--admin")
    assert Visitor(server).login("erin@example.com").json()["is_admin"] is True
    assert "erin@example.com" in cli("list")


# --- secrets never stored or logged ----------------------------------------------------------------------------
def test_passwords_and_session_tokens_are_never_stored_or_logged() -> None:
    password = "Plain-Text-Never-" + str(time.time_ns())
    with start_server("--parallel", "1") as s:
        v = Visitor(s)
        assert v.signup("secret@example.com", password).status_code == 201
        error(Visitor(s).login("secret@example.com", password + "x"), 401, "invalid_credentials")
        assert Visitor(s).login("secret@example.com", password).status_code == 200
        session = v.cookies["ls_session"]
        stored = b"".join(p.read_bytes() for p in s.data_dir.glob("llamaserve.db*"))
        assert b"secret@example.com" in stored and b"$argon2id$" in stored  # the right files
        assert password.encode() not in stored and session.encode() not in stored
    output = s.log_text()
    assert "llamaserve.access" in output  # the right output: the requests were logged
    assert password not in output and session not in output


# --- pages and the spec --------------------------------------------------------------------------------------
def test_pages_and_assets_are_served_with_a_strict_policy(server: Server) -> None:
    for path in ("/", "/login", "/signup", "/keys", "/playground", "/admin"):
        r = httpx.get(f"{server.base_url}{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        assert "<script>" not in r.text  # no inline script (the policy would block it)
    chart = httpx.get(f"{server.base_url}/static/vendor/chart.umd.min.js")
    assert chart.status_code == 200 and chart.text.startswith("/*!\n * Chart.js v4")
    assert httpx.get(f"{server.base_url}/static/js/api.js").status_code == 200


def test_openapi_documents_the_dashboard_apis(server: Server) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    paths = ["/auth/session", "/auth/signup", "/auth/login", "/auth/logout", "/v1/dashboard/keys"]
    paths += ["/v1/dashboard/keys/{prefix}", "/v1/dashboard/usage/summary", "/v1/dashboard/playground/key"]
    for path in paths:
        assert path in spec["paths"], path
    schemes = spec["components"]["securitySchemes"]
    assert {"in": "cookie", "name": "ls_session"}.items() <= schemes["session"].items()
    assert {"in": "header", "name": "X-CSRF-Token"}.items() <= schemes["csrf"].items()
    assert "/" not in spec["paths"] and "/keys" not in spec["paths"]  # pages are not API


# --- the store's side, on SQLite and PostgreSQL --------------------------------------------------------------
@pytest.mark.anyio
async def test_sessions_keep_only_a_hash_and_expire(store: Store) -> None:
    account = await store.create_account("s", "free", email="s@example.com", password_hash="$argon2id$x")
    token = await store.create_session(account.id, dt.timedelta(hours=1))
    found = await store.session(token)
    assert found is not None and found[1].id == account.id
    assert await store.session(token + "x") is None
    assert all(token not in str(value) for row in (await all_rows(store))["sessions"] for value in row)
    expired = await store.create_session(account.id, dt.timedelta(seconds=-1))
    assert await store.session(expired) is None
    await store.update_account("s", status="suspended")
    assert await store.session(token) is None
    await store.update_account("s", status="active")
    key, _ = await store.playground_key(token)
    assert (await store.authenticate(key)).account_id == account.id
    await store.end_session(token)
    assert await store.session(token) is None
    with pytest.raises(AuthError):
        await store.authenticate(key)


@pytest.mark.anyio
async def test_expired_keys_are_refused(store: Store) -> None:
    await store.create_account("e", "free")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    full, _ = await store.create_key("e", expires_at=past)
    with pytest.raises(AuthError) as info:
        await store.authenticate(full)
    assert info.value.status == 401


@pytest.mark.anyio
async def test_set_key_with_an_account_changes_only_its_own_keys(store: Store) -> None:
    owner = await store.create_account("owner", "free")
    other = await store.create_account("other", "free")
    _, key = await store.create_key("owner")
    with pytest.raises(StoreError):
        await store.set_key(key.prefix, enabled=False, account_id=other.id)
    assert (await store.key(key.prefix)).enabled is True
    assert (await store.set_key(key.prefix, enabled=False, account_id=owner.id)).enabled is False


@pytest.mark.anyio
async def test_email_is_unique(store: Store) -> None:
    await store.create_account("one", "free", email="x@example.com")
    with pytest.raises(StoreError):
        await store.create_account("two", "free", email="x@example.com")
    await store.create_account("two", "free")
    with pytest.raises(StoreError):
        await store.update_account("two", email="x@example.com")
    assert await store.account_by_email("x@example.com") is not None


@pytest.mark.anyio
async def test_usage_summary_buckets_by_time_model_and_key(store: Store) -> None:
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)

    account = await store.create_account("u", "free", 10**9)
    _, k1 = await store.create_key("u")
    _, k2 = await store.create_key("u")
    spec = [
        ("a", k1.id, 0),
        ("a", k1.id, 59 * 60 + 59.9),
        ("b", k1.id, 600),
        ("a", k2.id, 3600),
        ("a", k1.id, 86400),
    ]
    for i, (model, key_id, _) in enumerate(spec):
        hold = await store.hold(account.id, 100, f"r{i}")
        assert hold is not None
        await store.settle(hold, 10 + i, Usage(f"r{i}", model, 1, 2, "ok", 5), key_id)
    async with store.engine.connect() as conn:
        ids = dict((await conn.execute(text("SELECT request_id, id FROM usage"))).all())
    for i, (_, _, offset) in enumerate(spec):
        await backdate(store, UsageRecord, ids[f"r{i}"], t0 + dt.timedelta(seconds=offset))
    rows = await store.usage_summary(account.id, t0, t0 + dt.timedelta(days=1), 3600)
    got = {(r.start - int(t0.timestamp()), r.model, r.key_prefix): (r.requests, r.cost) for r in rows}
    assert got == {
        (0, "a", k1.prefix): (2, 10 + 11),  # 12:59:59.9 is still the 12:00 bucket
        (0, "b", k1.prefix): (1, 12),
        (3600, "a", k2.prefix): (1, 13),
    }  # the last record is at until: outside
    days = await store.usage_summary(account.id, t0, t0 + dt.timedelta(days=2), 86400)
    day_rows = sorted((r.start - int(t0.timestamp()) + 43200, r.requests) for r in days)
    assert day_rows == [(0, 1), (0, 1), (0, 2), (86400, 1)]  # buckets start at midnight UTC


@pytest.mark.anyio
async def test_migration_0002_upgrades_an_existing_store(url: str) -> None:
    """A store made by 0001, with an account in it, upgrades: nobody is an admin, nobody has a login."""

    store = Store(url)
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0001"))
            insert = "INSERT INTO accounts (name, plan, status, balance, created_at) VALUES (:n, :p, :s, 5, :t)"
            await conn.execute(text(insert), {"n": "old", "p": "pro", "s": "active", "t": dt.datetime.now(dt.UTC)})
        await store.migrate()
        old = await store.account("old")
        assert (old.is_admin, old.email, old.password_hash, old.balance) == (False, None, None, 5)
    finally:
        await store.close()
