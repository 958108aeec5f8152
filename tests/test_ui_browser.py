"""``kandinsky ui --weights tiny`` in a subprocess, driven by headless Chromium through Playwright (marker
``browser``; run with ``pytest -m browser tests/test_ui_browser.py``).

Needs the ``playwright`` Python package and a Chromium: Debian's ``/usr/bin/chromium`` (or
``$KANDINSKY_CHROMIUM``); Playwright never downloads a browser here. Screenshots of every tab go to
``$KANDINSKY_UI_SCREENSHOTS`` (``KANDINSKY_UI_SCREENSHOTS=docs/ui`` refreshes the documentation's), by default
a temporary folder. Every wait is bounded.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.pipeline import Kandinsky21
from kandinsky.png import read_png_metadata

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

CHROMIUM = os.environ.get("KANDINSKY_CHROMIUM", "/usr/bin/chromium")
STARTUP_S = 180  # the server's start: imports, tiny weights
GENERATE_S = 90  # one small generation, queue included
ROOT = Path(__file__).resolve().parent.parent
_screenshots: list[Path] = []  # the folder, made on the first screenshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, as a user starts it, on a free port of 127.0.0.1: (url, process, output folder, log path)."""
    port = _free_port()
    output = tmp_path_factory.mktemp("ui-out")
    log_path = output.parent / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "kandinsky", "ui", "--weights", "tiny", "--port", str(port),
                                    "--host", "127.0.0.1", "--device", "cpu", "--output-dir", str(output)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, process, output, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KANDINSKY_CHROMIUM)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (a new session) on the server; requests that leave 127.0.0.1 are recorded."""
    url = server[0]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.outside = []
    page.on("request", lambda r: page.outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(url, timeout=60_000)
    page.locator("#text2img-generate").wait_for(timeout=60_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): the same sums, the same pixels
    return Kandinsky21.from_pretrained("tiny", progress=False)


def screenshot(page, name: str) -> None:
    """A full-page screenshot, as a 256-colour PNG (the docs' are in git)."""
    if not _screenshots:
        folder = os.environ.get("KANDINSKY_UI_SCREENSHOTS") or tempfile.mkdtemp(prefix="kandinsky-ui-screenshots-")
        _screenshots.append(Path(folder))
        _screenshots[0].mkdir(parents=True, exist_ok=True)
    time.sleep(0.8)  # let the toasts and the progress animations settle
    picture = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(_screenshots[0] / f"{name}.png", optimize=True)


# ---- page helpers ------------------------------------------------------------------------------------------------


def fill(page, task: str, control: str, value) -> None:
    """Type ``value`` into a control of a task tab (a text box, a number field or a slider's number box)."""
    box = page.locator(f"#{task}-{control}").locator("textarea, input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def image_src(page, task: str) -> str | None:
    images = page.locator(f"#{task}-gallery img")
    return images.first.get_attribute("src") if images.count() else None


def generate(page, task: str, timeout: float = GENERATE_S) -> tuple[bytes, str]:
    """Click the tab's Generate and wait for a new first image: (its bytes as served, the seed shown)."""
    before = image_src(page, task)
    page.locator(f"#{task}-generate").click()
    deadline = time.monotonic() + timeout
    while (src := image_src(page, task)) in (None, before):
        assert time.monotonic() < deadline, f"no image within {timeout} s"
        time.sleep(0.2)
    shown = page.locator(f"#{task}-seed-used textarea")
    while not shown.input_value():
        assert time.monotonic() < deadline, "no seed shown"
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while read_png_metadata(io.BytesIO(download(page, src)))["seed"] != int(shown.input_value() or -1):
        assert time.monotonic() < deadline, "the seed shown is not the image's"
        time.sleep(0.2)
    return download(page, src), shown.input_value()


def download(page, src: str) -> bytes:
    response = page.request.get(src)
    assert response.ok, response.status
    return response.body()


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def text_to_image(page, *, prompt="a red cat", seed=1234, steps=2, width=128, height=128) -> bytes:
    fill(page, "text2img", "prompt", prompt)
    fill(page, "text2img", "seed", seed)
    fill(page, "text2img", "steps", steps)
    fill(page, "text2img", "prior-steps", 2)
    fill(page, "text2img", "width", width)
    fill(page, "text2img", "height", height)
    return generate(page, "text2img")[0]


# ---- the tests ---------------------------------------------------------------------------------------------------


def test_the_server_binds_localhost_only_and_shares_nothing(server):
    psutil = pytest.importorskip("psutil")
    url, process, _, log_path = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    assert any(address.port == port for address in listening)
    log = log_path.read_text()
    assert f"http://127.0.0.1:{port}" in log and "gradio.live" not in log


def test_text_to_image_size_seed_and_metadata(page):
    data = text_to_image(page, seed=1234, width=192, height=100)
    image = open_png(data)
    assert image.size == (192, 128)  # 100 px rounded up to 128, as the note says
    assert "192 × 100 px is made as 192 × 128 px" in page.locator("#text2img-size-note").inner_text()
    metadata = read_png_metadata(io.BytesIO(data))  # the downloaded file keeps the CLI's metadata
    assert metadata["seed"] == 1234 and metadata["prompt"] == "a red cat"
    assert metadata["settings"]["task"] == "text2img" and metadata["settings"]["height"] == 100
    assert page.locator("#text2img-seed-used textarea").input_value() == "1234"
    assert "rounded up to multiples of 64" in page.locator("#text2img-info").inner_text()
    fill(page, "text2img", "width", 128)
    fill(page, "text2img", "height", 128)
    page.locator("#text2img-size-note").get_by_text("128 × 128 px").wait_for(timeout=10_000)
    screenshot(page, "text2img")
    assert page.outside == [], f"the page loaded from outside: {page.outside}"


def test_a_random_seed_is_shown(page):
    data = text_to_image(page, seed=-1)
    shown = page.locator("#text2img-seed-used textarea").input_value()
    assert int(shown) >= 0 and read_png_metadata(io.BytesIO(data))["seed"] == int(shown)
    page.get_by_role("button", name="Reuse seed").first.click()
    seed = page.locator("#text2img-seed input")
    deadline = time.monotonic() + 10
    while seed.input_value() != shown:
        assert time.monotonic() < deadline, "Reuse seed did not fill in the seed"
        time.sleep(0.2)


def test_an_invalid_value_shows_a_message_and_the_next_request_works(page):
    fill(page, "text2img", "prompt", "a cat")
    fill(page, "text2img", "steps", 0)
    page.locator("#text2img-generate").click()
    page.get_by_text("Steps: expected an integer in 1..999").first.wait_for(timeout=GENERATE_S * 1000)
    screenshot(page, "error")
    data = text_to_image(page, seed=5)
    assert read_png_metadata(io.BytesIO(data))["seed"] == 5


def test_inpaint_sends_exactly_the_painted_mask(page, pipe):
    source = text_to_image(page, seed=1234, width=128, height=128)
    page.locator("#text2img-to-inpaint").click()
    editor = page.locator("#inpaint-editor")
    editor.locator("canvas").first.wait_for()
    time.sleep(1.5)  # the background is drawn
    # the image is drawn centred in the canvas at the zoom the editor shows
    zoom = float(editor.locator(".zoom-number span").inner_text().strip().rstrip("%")) / 100
    box = editor.locator("canvas").first.bounding_box()
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def at(u, v):
        return centre_x + (u - 64) * zoom, centre_y + (v - 64) * zoom

    page.mouse.move(*at(40, 64))
    page.mouse.down()
    page.mouse.move(*at(88, 64), steps=12)
    page.mouse.up()
    time.sleep(0.5)
    fill(page, "inpaint", "prompt", "a hat")
    fill(page, "inpaint", "seed", 77)
    fill(page, "inpaint", "steps", 2)
    fill(page, "inpaint", "prior-steps", 2)
    data, shown = generate(page, "inpaint")
    assert shown == "77"
    mask_img = page.locator("#inpaint-mask img").first
    mask_img.wait_for(timeout=10_000)
    mask = open_png(download(page, mask_img.get_attribute("src")))
    painted = np.asarray(mask) > 0
    assert mask.size == (128, 128) and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert painted[64, 40:89].all()  # the stroke
    assert not painted[:20].any() and not painted[108:].any() and not painted[:, :8].any()  # far from it
    # the page sent the image and exactly that mask: the same pixels as the pipeline called directly
    expected = pipe.inpaint("a hat", open_png(source).convert("RGB"), mask, num_inference_steps=2,
                            prior_num_inference_steps=2, height=128, width=128,
                            generator=torch.Generator().manual_seed(77))[0]
    result = open_png(data)
    assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(expected))
    assert read_png_metadata(io.BytesIO(data))["settings"]["task"] == "inpaint"
    screenshot(page, "inpaint")


def test_image_to_image_from_a_result(page):
    text_to_image(page, seed=3, width=128, height=192)
    page.locator("#text2img-to-img2img").click()
    page.locator("#img2img-image img").first.wait_for(timeout=10_000)
    fill(page, "img2img", "prompt", "a frog")
    fill(page, "img2img", "seed", 9)
    fill(page, "img2img", "steps", 4)
    fill(page, "img2img", "prior-steps", 2)
    fill(page, "img2img", "strength", 0.5)
    data, _ = generate(page, "img2img")
    assert open_png(data).size == (128, 192)  # the size of the image sent
    settings = read_png_metadata(io.BytesIO(data))["settings"]
    assert settings["task"] == "img2img" and settings["strength"] == 0.5
    screenshot(page, "img2img")


def test_mix_and_history(page):
    fill(page, "text2img", "num-images", 3)
    text_to_image(page, seed=8)
    assert page.locator("#text2img-gallery img").count() == 3
    page.get_by_role("tab", name="Mix").click()
    fill(page, "mix", "prompt1", "a cat")
    fill(page, "mix", "prompt2", "a dog")
    fill(page, "mix", "seed", 4)
    fill(page, "mix", "steps", 2)
    fill(page, "mix", "prior-steps", 2)
    fill(page, "mix", "width", 128)
    fill(page, "mix", "height", 128)
    data, _ = generate(page, "mix")
    metadata = read_png_metadata(io.BytesIO(data))
    assert metadata["prompt"] == "a cat | a dog" and metadata["settings"]["mix_weights"] == [0.5, 0.5]
    screenshot(page, "mix")
    page.get_by_role("tab", name="History").click()
    page.locator("#history-gallery img").first.wait_for(timeout=10_000)
    assert page.locator("#history-gallery img").count() == 4  # the session's images, newest first
    screenshot(page, "history")


def test_stop_ends_a_long_run(page):
    fill(page, "text2img", "prompt", "a long one")
    fill(page, "text2img", "seed", 1)
    fill(page, "text2img", "steps", 999)
    fill(page, "text2img", "width", 256)
    fill(page, "text2img", "height", 256)
    started = time.monotonic()
    page.locator("#text2img-generate").click()
    page.locator("#text2img-gallery").get_by_text("/999").first.wait_for(timeout=GENERATE_S * 1000)  # the bar
    screenshot(page, "progress")
    page.locator("#text2img-stop").click()
    stopped = time.monotonic()
    page.get_by_text("Generation stopped after decoder step").first.wait_for(timeout=30_000)
    assert time.monotonic() - stopped < 30 and time.monotonic() - started < GENERATE_S * 2
    assert image_src(page, "text2img") is None  # nothing was made
    data = text_to_image(page, seed=2)  # the queue is free again
    assert read_png_metadata(io.BytesIO(data))["seed"] == 2
