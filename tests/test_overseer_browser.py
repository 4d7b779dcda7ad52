"""The dashboard as a person uses it: real headless Chromium (Debian's `chromium`, driven by
Playwright for Python pointed at that binary), a real Redis, real workers.

Saves screenshots of each page: under docs/screenshots/ (the README's) when
UPDATE_SCREENSHOTS=1, else under the system temp dir, so a test run leaves the tree clean.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import ROOT, wait_until
from tests.overseer_support import AUTH, TOKEN, Dashboard, dashboard, enqueue, finished

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "app-screenshots")

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM=/path/to/chromium)")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Any:
    context = browser.new_context(viewport={"width": 1360, "height": 720})
    tab = context.new_page()
    tab.errors = []
    tab.on("console", lambda message: tab.errors.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    yield tab
    context.close()


def shot(tab: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def waiting(make_settings: Any) -> None:
    """Jobs that wait: plain ones on load_test (no worker), routed ones per group and priority."""
    from app.components.worker.api import JobRequest, SyncWorkerClient

    client = SyncWorkerClient(make_settings())
    try:
        client.enqueue_many([JobRequest("noop", queue="load_test")] * 40)
        for n in range(12):
            client.enqueue("step", f"t{n}", _worker_group="gpu" if n % 3 else None,
                           _priority="high" if n % 4 == 0 else None)
    finally:
        client.close()


def stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def feed_row(tab: Any, job_id: str, kind: str) -> Any:
    return tab.locator(f'#events tr[data-job="{job_id}"][data-type="{kind}"]')


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
def test_live_feed_shows_a_job_start_then_complete_without_reload(
    engine: str, env: dict[str, str], start_worker: Any, page: Any, tmp_path: Path, make_settings: Any
) -> None:
    start_worker("contract", engine)
    env = {**env, "WORKER_BACKEND_CONTRACT": engine}
    with dashboard(env) as board:
        page.goto(f"{board.url}/events")
        expect(page.locator("#feed-state")).to_have_text("live")
        page.evaluate("window.sameDocument = true")
        gate = tmp_path / "go"
        job_id = enqueue(env, "wait_for_file", "--", f"path={gate}")
        expect(feed_row(page, job_id, "job.started")).to_have_count(1, timeout=20_000)
        expect(feed_row(page, job_id, "job.completed")).to_have_count(0)
        if engine == "arq":
            shot(page, "events")
        gate.touch()
        expect(feed_row(page, job_id, "job.completed")).to_have_count(1, timeout=20_000)
        assert page.evaluate("window.sameDocument") is True, "the page reloaded"
        assert page.evaluate("window.overseer.duplicates") == 0
        assert page.errors == []
        if engine == "arq":  # the other pages, for the README, with some work waiting
            enqueue(env, "add", "--", "a=1", "b=2")
            waiting(make_settings)
            assert httpx.post(f"{board.url}/api/queues/load_test/pause", headers=AUTH).status_code == 200
            page.goto(f"{board.url}/")
            expect(page.locator('#queues tr[data-queue="contract"] .engine')).to_have_text(engine)
            expect(page.locator('#queues tr[data-queue="load_test"] .paused-state')).to_have_text("paused")
            shot(page, "overview")
            page.fill("#token", TOKEN)  # resume it from the page
            page.click("#token-form button")
            page.locator('#queues tr[data-queue="load_test"] button').click()
            expect(page.locator("#notice")).to_contain_text("paused false")
            expect(page.locator('#queues tr[data-queue="load_test"] .paused-state')).to_have_text("running")
            page.goto(f"{board.url}/jobs?queue=contract")
            expect(page.locator(f'#jobs tr[data-job="{job_id}"] .status')).to_have_text("completed")
            shot(page, "jobs")
            page.goto(f"{board.url}/dead")
            expect(page.locator("#dead")).to_be_visible()
            assert page.errors == []


def test_sigkilled_worker_turns_warning_then_offline(env: dict[str, str], start_worker: Any, page: Any) -> None:
    # warning lasts 3 s: several page refreshes see it, even on a slow machine
    thresholds = {"worker_warning_after": "1", "worker_unhealthy_after": "4", "worker_offline_after": "6"}
    worker = start_worker("contract", "arq", **thresholds)
    start_worker("contract", "arq", "--id", "eu-1", "--label", "region=eu", **thresholds)
    with dashboard(env, **thresholds) as board:
        page.goto(f"{board.url}/workers")
        row = page.locator(f'#workers tr[data-worker="{socket.gethostname()}@{worker.proc.pid}"]')
        expect(row).to_have_attribute("data-state", "healthy")
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        expect(row).to_have_attribute("data-state", "warning", timeout=10_000)
        expect(row).to_have_attribute("data-state", "offline", timeout=15_000)
        expect(page.locator('#workers tr[data-worker="eu-1"]')).to_have_attribute("data-state", "healthy")
        shot(page, "workers")
        assert page.errors == []


def test_job_page_of_a_failed_job_shows_its_error(env: dict[str, str], start_worker: Any, page: Any) -> None:
    start_worker("contract", "arq")
    with dashboard(env) as board:
        job_id = enqueue(env, "always_fails", "--", "message=the disk is full")
        page.goto(f"{board.url}/jobs/{job_id}")
        expect(page.locator("#job-status")).to_have_text("failed", timeout=20_000)  # refreshed in place
        expect(page.locator("#job-error")).to_have_text("ValueError: the disk is full")
        expect(page.locator("#trail tbody tr")).to_have_count(7)
        shot(page, "job")
        page.goto(f"{board.url}/jobs")
        page.fill("header .find input[name=id]", job_id)
        page.press("header .find input[name=id]", "Enter")
        expect(page.locator("#job-error")).to_contain_text("the disk is full")
        assert page.errors == []


def test_dead_job_is_retried_from_the_page_with_the_token_only(
    env: dict[str, str], start_worker: Any, page: Any
) -> None:
    start_worker("contract", "arq")
    with dashboard(env) as board:
        job_id = enqueue(env, "always_fails", "--", "message=dead on arrival")
        other = enqueue(env, "always_fails", "--", "message=the upstream API answered 503")
        wait_until(lambda: finished(board.url, other), 30, what="the other job to die")
        died = wait_until(lambda: finished(board.url, job_id), 30, what="the job to die")
        page.goto(f"{board.url}/dead")
        retry = page.locator(f'#dead tr[data-job="{job_id}"] button')
        retry.click()
        expect(page.locator("#notice")).to_contain_text("refused (401)")
        expect(page.locator("#dead tbody tr")).to_have_count(2)
        shot(page, "dead")
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.locator(f'#dead tr[data-job="{job_id}"] button').click()
        expect(page.locator("#notice")).to_contain_text("done")
        def ran_again() -> bool:
            job = finished(board.url, job_id)
            return bool(job and job["enqueued_at"] > died["enqueued_at"] and job["events"][0]["type"] == "job.enqueued")

        wait_until(ran_again, 30, what="the job to run again")
        # the refused POST is the only thing the browser reports
        assert [e for e in page.errors if "401 (Unauthorized)" not in e] == [] and len(page.errors) == 1


def test_feed_resumes_without_gap_or_duplicate_after_the_connection_is_cut(
    env: dict[str, str], redis_url: str, prefix: str, start_worker: Any, page: Any
) -> None:
    start_worker("contract", "arq")
    client = redis.Redis.from_url(redis_url)
    board = Dashboard(env).start()
    try:
        page.goto(f"{board.url}/events")
        expect(page.locator("#feed-state")).to_have_text("live")
        first = enqueue(env, "add", "--", "a=1", "b=1")
        expect(feed_row(page, first, "job.completed")).to_have_count(1, timeout=20_000)
        board.stop(signal.SIGKILL)  # the connection is cut; the browser retries
        expect(page.locator("#feed-state")).to_have_text("reconnecting")
        missed = [enqueue(env, "add", "--", f"a={n}", "b=2") for n in range(3)]
        wait_until(lambda: all(client.exists(f"{prefix}:result:{j}") for j in missed), 30, what="jobs done")
        board = Dashboard(env, port=board.port).start()
        for job_id in missed:
            expect(feed_row(page, job_id, "job.completed")).to_have_count(1, timeout=20_000)
        after = page.get_attribute("#events", "data-after")
        shown = page.eval_on_selector_all("#events tbody tr", "rows => rows.map(r => r.dataset.id)")
        stored = [entry[0].decode() for entry in client.xrange(f"{prefix}:events", min=f"({after}")]
        assert len(shown) == len(set(shown)), "an event is shown twice"
        since_load = {i for i in shown if stream_id(i) > stream_id(after)}
        assert since_load == set(stored), f"missing from the feed: {sorted(set(stored) - since_load)}"
        assert page.evaluate("window.overseer.duplicates") == 0
    finally:
        board.stop()
        client.close()
