"""End to end: `jumpflow serve` in a subprocess on a free loopback port, the page in headless Chromium, a control
moved as a person would, a new picture. Skipped without Playwright or Chromium, unless JUMPFLOW_REQUIRE_BROWSER=1
(CI), where a missing browser fails."""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REQUIRED = os.environ.get("JUMPFLOW_REQUIRE_BROWSER") == "1"
SCREENSHOT = Path("/tmp/serve_page.png")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def need(ok: bool, why: str) -> None:
    if not ok:
        (pytest.fail if REQUIRED else pytest.skip)(why + ("" if REQUIRED else " (JUMPFLOW_REQUIRE_BROWSER=1 fails)"))


def chromium() -> str:
    path = os.environ.get("JUMPFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    need(Path(path).is_file(), f"no Chromium at {path} (Debian: apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def server(vector_run, teacher_run):
    """`jumpflow serve` on port 0 (a free port, printed in its banner); stopped at the end of the module."""
    pytest.importorskip("uvicorn")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jumpflow", "serve", "--ckpt", str(vector_run), "--teacher",
                             str(teacher_run), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            banner = lines.get(timeout=120)
        except queue.Empty:
            banner = ""
        assert "http://127.0.0.1:" in banner, f"no banner; stderr: {proc.stderr.read() if proc.poll() else ''}"
        url = banner.split("at ", 1)[1].split()[0]
        for _ in range(600):  # the socket is bound before the banner; wait until the app answers
            try:
                with urllib.request.urlopen(url + "health", timeout=5) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read()}")
            threading.Event().wait(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_served_api_answers_over_http(server):
    request = urllib.request.Request(server + "generate", data=json.dumps({"n": 3, "seed": 2, "format": "json"})
                                     .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200 and len(json.loads(r.read())["samples"]) == 3
    bad = urllib.request.Request(server + "generate", data=b'{"n": 0}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=30)
    assert refused.value.code == 400 and "n must be in" in json.loads(refused.value.read())["error"]


def test_moving_the_seed_slider_shows_new_samples(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed (pip install playwright)")
    executable = chromium()
    responses = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 680})
            page.on("response", lambda r: responses.append(r) if r.url.endswith("/generate") else None)
            page.goto(server, wait_until="domcontentloaded")
            shown = "() => { const img = document.getElementById('samples'); " \
                    "return img.complete && img.naturalWidth > 0 && img.dataset.seed === '%s'; }"
            page.wait_for_function(shown % "0", timeout=60_000)
            first_src = page.get_attribute("#samples", "src")
            assert "generated in" in page.inner_text("#gen-time") and " ms " in page.inner_text("#gen-time")
            assert page.inner_text("#title") == "jumpflow \u00b7 meanflow"
            assert not page.is_visible("#class-row") and not page.is_visible("#guidance-row")  # unconditional

            page.focus("#seed")
            page.keyboard.press("ArrowRight")  # the slider moves to seed 1
            page.wait_for_function(shown % "1", timeout=60_000)
            assert page.get_attribute("#samples", "src") != first_src
            assert page.inner_text("#seed-value") == "1" and page.inner_text("#error") == ""

            for _ in range(5):  # fast moves: stale requests are aborted or dropped, the last seed wins
                page.keyboard.press("ArrowRight")
            page.wait_for_function(shown % "6", timeout=60_000)
            assert page.inner_text("#seed-value") == "6"

            page.select_option("#steps", "teacher")
            page.wait_for_function("() => document.getElementById('gen-time').textContent"
                                   ".includes('flow_matching, 100 steps')", timeout=60_000)
            page.select_option("#steps", "1")
            page.wait_for_function("() => document.getElementById('gen-time').textContent.startsWith('1 step')",
                                   timeout=60_000)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    seeds = [r.headers.get("x-seed") for r in responses if r.status == 200]
    assert {"0", "1", "6"} <= set(seeds)
    assert SCREENSHOT.stat().st_size > 0
