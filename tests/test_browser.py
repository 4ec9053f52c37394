"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser
download): sign up, log out and in, create a key, disable it and see the API refuse it (403), enable it and see the
API accept it, chat in the playground with streamed output, find that request in the usage page with its tokens
and cost, a batch made with the key listed there with its output to download, the admin view, log out. A
screenshot of each page goes to tests/artifacts/dashboard/ (or $LLAMASERVE_TEST_ARTIFACTS/dashboard/). Without
Chromium or Playwright the test is skipped, except under CI=1."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import MODEL, Server, start_server, unavailable, wait_for
from tests.test_dashboard import ADMIN_EMAIL, ADMIN_PASSWORD, PRICES, create_admin

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path(os.environ.get("LLAMASERVE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("LLAMASERVE_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts") / "dashboard"
EMAIL = "dana@example.com"
PASSWORD = "a browser-typed password"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="llamaserve-browser-") as tmp:
        create_admin(Path(tmp))
        with start_server("--parallel", "2", *PRICES, data_dir=Path(tmp)) as s:
            yield s


@pytest.fixture
def page(server: Server) -> Iterator[Page]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        unavailable("Playwright (pip install playwright)", e)
    if not CHROMIUM.exists():
        unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium)", FileNotFoundError(CHROMIUM))
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        context = browser.new_context(base_url=server.base_url, viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
        page = context.new_page()
        # Any script error or refused resource (a Content-Security-Policy violation included) fails the test.
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        try:
            yield page
        finally:
            browser.close()
    assert problems == [], "\n".join(problems)


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    print(f"screenshot: {ARTIFACTS / f'{name}.png'}")


def chat(server: Server, key: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.v1}/chat/completions", json=body, headers=headers, timeout=120)


def log_in(page: Page, email: str, password: str) -> None:
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#submit")
    page.wait_for_url(re.compile(r"/$"))


def run_one_line_batch(server: Server, key: str) -> str:
    """A completed batch of one chat line, made with `key`; its id."""
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    }
    with httpx.Client(base_url=server.v1, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        files = {"file": ("in.jsonl", json.dumps(line).encode())}
        file_id = api.post("/files", files=files, data={"purpose": "batch"}).json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch_id = api.post("/batches", json=body).json()["id"]
        wait_for(lambda: api.get(f"/batches/{batch_id}").json()["status"] == "completed", "the batch", 60)
    return batch_id


def test_dashboard_end_to_end(server: Server, page: Page) -> None:
    from playwright.sync_api import expect

    # Sign up: the dashboard sends a visitor to log in; new accounts get the starter credits (3).
    page.goto("/")
    page.wait_for_url(re.compile(r"/login"))
    shot(page, "01-login")
    page.click("#signup-link")
    page.wait_for_url(re.compile(r"/signup$"))
    log_in(page, EMAIL, PASSWORD)
    expect(page.locator("#balance")).to_have_text("3.000000")
    expect(page.locator("#who")).to_have_text(EMAIL)
    expect(page.locator("#nav-admin")).to_be_hidden()

    # Log out and back in.
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    log_in(page, EMAIL, PASSWORD)

    # A logged-in visitor sent to log in goes on to `next`, on this site only ("/\host" is "//host" to browsers;
    # the host here is another loopback address, where nothing listens).
    for target in ("/%5C127.0.0.2:9/", "//127.0.0.2:9/", "http://127.0.0.2:9/"):
        page.goto(f"/login?next={target}")
        page.wait_for_url(re.compile(r"^" + re.escape(server.base_url) + r"/$"))

    # A key: generated, shown once, copied.
    page.click("[data-nav=keys]")
    page.fill("#key-name", "browser")
    page.click("#create-key")
    expect(page.locator("#new-key-value")).to_have_text(re.compile(r"^ls-[a-z0-9]{10}_[A-Za-z0-9]{32}$"))
    key = page.locator("#new-key-value").inner_text()
    page.click("#copy-key")
    assert page.evaluate("navigator.clipboard.readText()") == key
    prefix = key[3:13]
    row = page.locator(f'tr[data-prefix="{prefix}"]')
    expect(row.locator(".key-name")).to_contain_text("browser")
    shot(page, "02-keys-new")

    # Disabled in the UI: the API refuses the key with 403; enabled again: accepted.
    row.locator("button.toggle").click()
    expect(row).to_have_attribute("data-state", "disabled")
    refused = chat(server, key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "api_key_disabled", refused.text
    shot(page, "03-keys-disabled")
    row.locator("button.toggle").click()
    expect(row).to_have_attribute("data-state", "enabled")
    assert chat(server, key).status_code == 200

    # Playground: a streamed reply, and the same request as curl and Python.
    page.click("[data-nav=playground]")
    page.wait_for_selector("body[data-ready]")
    expect(page.locator("#model")).to_have_value(MODEL)
    page.fill("#system", "You are terse.")
    page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Name three colours.")
    # Count how often the reply's text changes while it arrives: streamed means several updates.
    page.evaluate(
        """() => { window.updates = 0; new MutationObserver(() => window.updates++)
             .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }"""
    )
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done]", timeout=60_000)
    reply = page.locator(".message.assistant .text").inner_text()
    assert reply.strip(), "no text streamed"
    assert page.evaluate("window.updates") >= 3
    usage_text = page.locator("#chat-usage").inner_text()
    match = re.fullmatch(r"(\d+) prompt \+ (\d+) completion tokens", usage_text)
    assert match is not None, usage_text
    prompt_tokens, completion_tokens = int(match.group(1)), int(match.group(2))
    curl = page.locator("#snippet-curl").inner_text()
    assert "$LLAMASERVE_API_KEY" in curl and '"max_tokens": 24' in curl and "You are terse." in curl
    assert f"{server.base_url}/v1/chat/completions" in curl
    page.click("[data-tab=python]")
    python = page.locator("#snippet-python").inner_text()
    assert 'api_key=os.environ["LLAMASERVE_API_KEY"]' in python and "temperature=0," in python
    assert python.rstrip().endswith("print()") and '"content": "Name three colours."\n' in python
    assert "Hello!" not in python and "assistant" not in python  # the request just sent, not the next one
    shot(page, "04-playground")

    # Usage: the playground's request with its tokens and cost (1,000 micro-credits a token here), and a chart.
    page.click("[data-nav=usage]")
    page.wait_for_selector("body[data-loaded]")
    newest = page.locator("#recent tbody tr").first
    expect(newest).to_contain_text("playground")
    expect(newest.locator(".prompt-tokens")).to_have_text(str(prompt_tokens))
    expect(newest.locator(".completion-tokens")).to_have_text(str(completion_tokens))
    cost = (prompt_tokens + completion_tokens) * 1000
    expect(newest.locator(".cost")).to_have_text(f"{cost / 1e6:.6f}")
    expect(page.locator("#total-requests")).to_have_text("2")
    assert page.evaluate("Chart.getChart(document.getElementById('chart')).data.datasets.length") == 1
    page.select_option("#group", "key")
    assert page.evaluate("Chart.getChart(document.getElementById('chart')).data.datasets.length") == 2
    shot(page, "05-usage")

    # A batch of one line through the Batch API, with the key: listed on the usage page, its output downloadable.
    batch = run_one_line_batch(server, key)
    page.click("#refresh")
    row = page.locator(f'#batches tr[data-batch-id="{batch}"]')
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text("1 / 1")
    with page.expect_download() as download:
        row.locator("a", has_text="output").click()
    assert json.loads(Path(download.value.path()).read_text())["custom_id"] == "one"

    # The admin view, for the admin only: grant credits, disable the account (its key is refused), enable it.
    page.goto("/admin")
    expect(page.locator("#flash")).to_contain_text("admin accounts")
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    log_in(page, ADMIN_EMAIL, ADMIN_PASSWORD)
    page.click("#nav-admin")
    page.wait_for_selector("body[data-loaded]")
    account = page.locator(f'tr[data-account="{EMAIL}"]')
    account.locator("form.grant input").fill("1.5")
    account.locator("form.grant button").click()
    expect(page.locator("#flash")).to_contain_text("Granted 1.5 credits")
    shot(page, "06-admin")
    account.locator("button.danger").click()
    expect(account).to_contain_text("suspended")
    assert chat(server, key).json()["error"]["code"] == "account_suspended"
    account.locator("button", has_text="Enable").click()
    expect(account).to_contain_text("active")
    assert chat(server, key).status_code == 200

    # Log out: the pages send the visitor back to log in.
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    page.goto("/keys")
    page.wait_for_url(re.compile(r"/login\?next=%2Fkeys"))
    shot(page, "07-logged-out")
