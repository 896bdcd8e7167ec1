"""The admin as an operator sees it: headless Chromium on a live server, screenshots kept for CI.

Debian's chromium is driven through playwright (its own browser download does not work offline).
Screenshots go to $SCREENSHOTS_DIR, by default artifacts/screenshots/ at the top of the checkout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from accounts.models import ApiKey, User
from tests.test_usage import seeded  # noqa: F401  (the fixture: 110 calls with known figures)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(os.environ.get("SCREENSHOTS_DIR", Path(__file__).resolve().parent.parent / "artifacts/screenshots"))
SECRET_PATTERN = re.compile(r"sk-[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"No Chromium at {CHROMIUM}: `make install-dev` installs Debian's chromium."
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def sync_orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API keeps an event loop on the test's thread; the test's ORM calls are still
    plain sync calls on that thread, which Django would refuse only because it sees that loop."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def admin_page(
    sync_orm_beside_playwright: None, browser: Browser, gateway_server: Any, transactional_db: None, admin_user: User
) -> Iterator[Page]:
    """A browser tab logged in to the live server's admin as the superuser."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=gateway_server.url)
    page = context.new_page()
    page.goto("/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "admin-pass-123")
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")
    yield page
    context.close()


def shoot(page: Page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_the_dashboard_shows_the_seeded_figures_and_draws_its_charts(admin_page: Page, seeded: dict) -> None:  # noqa: F811
    page = admin_page
    shoot(page, "index")
    assert page.locator("#site-name").inner_text() == "dwctl admin"
    page.click("text=Dashboard")
    page.wait_for_selector(".uplot canvas")
    figures = {
        label: page.locator(f'[data-figure="{label}"]').inner_text()
        for label in ("Requests", "Error rate", "Tokens in", "Spend (credits)")
    }
    p50 = float(page.locator('[data-figure="p50 latency"]').inner_text().removesuffix(" ms"))
    assert p50 == pytest.approx(50.5, rel=0.01)
    assert figures == {
        "Requests": "110",
        "Error rate": "9.1 %",
        "Tokens in": "1,000",
        "Spend (credits)": "0.595",
    }
    assert page.locator(".uplot").count() == 4  # the vendored library loaded and drew every chart
    assert page.locator(".usage-top").first.locator("tbody tr").first.inner_text().split("\t") == ["bob", "5", "0.5"]
    shoot(page, "usage-24h")
    page.click('a[data-period="7d"]')
    page.wait_for_selector(".uplot canvas")
    assert page.locator('[data-figure="Requests"]').inner_text() == "111"
    shoot(page, "usage-7d")


def test_a_key_created_from_the_user_page_shows_its_secret_once(admin_page: Page, seeded: dict) -> None:  # noqa: F811
    page = admin_page
    bob = User.objects.get(username="bob")
    page.goto(f"/admin/accounts/user/{bob.pk}/change/")
    shoot(page, "user-page")
    page.click("text=Create key")
    page.wait_for_selector("#id_name")
    assert "bob" in page.locator(".field-owner").inner_text()  # the owner is filled in
    page.fill("#id_name", "from-the-browser")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    message = page.locator(".messagelist").inner_text()
    secrets = SECRET_PATTERN.findall(message)
    assert len(secrets) == 1, message
    shoot(page, "key-created")
    key = ApiKey.objects.get(name="from-the-browser")
    assert key.owner == bob
    assert secrets[0].startswith(key.prefix)
    page.goto(f"/admin/accounts/apikey/{key.pk}/change/")
    assert secrets[0] not in page.content()
    page.reload()
    assert not SECRET_PATTERN.search(page.content())
    shoot(page, "key-page")


def test_the_request_log_narrows_to_today_and_an_error_code(admin_page: Page, seeded: dict) -> None:  # noqa: F811
    page = admin_page
    page.goto("/admin/gateway/requestlog/")
    assert "111 request logs" in page.locator(".paginator").inner_text()  # the call two days ago too
    # Each click loads a new page: wait for it (a slow machine may still show the old one, or none).
    page.click("#changelist-filter >> text=Today")
    page.wait_for_url("**created_at__gte=*")
    assert "110 request logs" in page.locator(".paginator").inner_text()
    page.click("#changelist-filter >> text=invalid_api_key")
    page.wait_for_url("**error_code=invalid_api_key*")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 10
    assert set(rows.locator("td.field-status_code").all_inner_texts()) == {"401"}
    shoot(page, "request-log-today-401")
