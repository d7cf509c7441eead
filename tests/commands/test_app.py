"""The demo app: the analysis function directly, and the page served on loopback in headless Chromium."""
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from giseg.commands.app import Analyser, shown_on_page
from conftest import ROOT
from giseg.training.config import TrainConfig
from giseg.training.loop import train


@pytest.fixture(scope="module")
def model_dir(demo_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(out / "r"),
                      image_size=128, epochs=6, lr=3e-3, num_workers=0, n_folds=3, cache_dir=str(out / "c")))
    # (128 px: at 64 px the tiny model still predicts nothing after 6 epochs of independently drawn augmentations)
    return out / "r" / "best"


def test_analysis_of_a_data_slice_has_overlay_areas_and_dice(model_dir, demo_dir):
    analyser = Analyser(model_dir, demo_dir, device="cpu")
    ids = analyser.slice_ids()
    assert ids and "case7_day3_slice_0004" in set(analyser.index["id"])
    a = analyser.analyse_id("case7_day3_slice_0004")  # a 360 x 310 scan
    assert a.overlay.shape == (310, 360, 3) and a.overlay.dtype == np.uint8
    assert a.masks.shape == (3, 310, 360)
    assert list(a.table["organ"]) == ["large_bowel", "small_bowel", "stomach"]
    assert a.table["dice"].notna().all() and ((a.table["dice"] >= 0) & (a.table["dice"] <= 1)).all()
    np.testing.assert_allclose(a.table["area_mm2"], a.table["pixels"] * 1.5 * 1.5, atol=0.05)


def test_analysis_of_uploaded_16bit_and_8bit_images(model_dir, demo_dir, tmp_path):
    import cv2

    analyser = Analyser(model_dir, device="cpu")
    scan = next((demo_dir / "train" / "case2").rglob("*.png"))
    a = analyser.analyse_file(scan)
    assert a.overlay.shape[:2] == (266, 266) and a.table["dice"].isna().all()
    assert a.table["area_mm2"].notna().all()  # spacing from the competition file name
    jpg = tmp_path / "photo.png"
    cv2.imwrite(str(jpg), np.full((40, 50, 3), 128, np.uint8))
    with pytest.warns(UserWarning) as caught:  # the user is told what was converted
        b = analyser.analyse_file(jpg)
    said = " ".join(str(w.message) for w in caught)
    assert "colour scans converted to gray" in said and "8-bit scans (expected 16-bit)" in said
    assert b.overlay.shape == (40, 50, 3) and b.table["area_mm2"].isna().all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    """Headless Chromium driven over the DevTools protocol (its own websocket; no browser download)."""

    def __init__(self, binary: str, profile):
        import json

        from websockets.sync.client import connect

        port = _free_port()
        self.proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--remote-debugging-port={port}", "--remote-allow-origins=*",
                                      "--window-size=1280,900", f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        self._connection = connect(url, max_size=None, open_timeout=20)
        self.ws, self.n = self._connection.__enter__(), 0

    def call(self, method: str, **params):
        import json

        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self._connection.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_page_answers_on_loopback_with_an_overlay_in_headless_chromium(model_dir, demo_dir, tmp_path):
    import base64

    import cv2

    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "giseg", "app", "--model", str(model_dir), "--data_dir",
                               str(demo_dir), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT)
    chrome = None
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the app did not answer on loopback: " + (server.stdout.read() or ""))
                time.sleep(0.5)
        chrome = Chromium(browser, tmp_path / "profile")
        chrome.call("Page.enable")
        chrome.call("Page.navigate", url=url)
        ready = ("(() => { const img = document.querySelector('#overlay img');"
                 " return !!(img && img.complete && img.naturalWidth > 0); })()")
        deadline = time.monotonic() + 90
        while not chrome.evaluate(ready):  # the page loads the first slice and shows its overlay
            assert time.monotonic() < deadline, "no overlay image appeared on the page"
            time.sleep(0.5)
        table = chrome.evaluate("document.querySelector('#areas').innerText")
        src = chrome.evaluate("document.querySelector('#overlay img').src")
        shown = urllib.request.urlopen(src, timeout=10).read()  # the image the page displays
        shot = base64.b64decode(chrome.call("Page.captureScreenshot", format="png")["data"])
    finally:
        if chrome is not None:
            chrome.close()
        server.terminate()
        server.wait(timeout=30)
    said = server.stdout.read()
    assert f"on http://127.0.0.1:{port}" in said and "share=True" not in said  # no hint for an option it lacks
    assert all(organ in table for organ in ("large_bowel", "small_bowel", "stomach")) and "area_mm2" in table
    (tmp_path / "page.png").write_bytes(shot)  # for a look by eye
    page_img = cv2.imdecode(np.frombuffer(shown, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(int)  # RGB
    analyser = Analyser(model_dir, demo_dir, device="cpu")
    expected = analyser.analyse_id(analyser.slice_ids()[0]).overlay.astype(int)  # the page's first slice
    assert page_img.shape == expected.shape  # the scan's own size, 266 x 266 for the first demo slice
    assert np.abs(page_img - expected).mean() < 3  # the page shows this prediction's overlay (lossy encoding)
    organ = np.abs(expected - expected.mean(-1, keepdims=True)).max(-1) > 40  # tinted, not gray
    assert organ.sum() > 100, "the demo model predicted no organ on the first slice"


def test_our_message_reaches_the_page_instead_of_gradios_generic_error():
    import gradio as gr

    from giseg.utils.errors import UserError

    def handler(slice_id):
        raise UserError(f"slice {slice_id!r} is not in the data folder")

    with pytest.raises(gr.Error, match="slice 'x' is not in the data folder"):
        shown_on_page(handler)("x")


def test_the_page_sends_no_usage_analytics(model_dir, demo_dir):
    """A medical-imaging page must not phone home: gradio's usage analytics are off for the page we build."""
    from giseg.commands.app import build_demo

    demo = build_demo(Analyser(model_dir, demo_dir, device="cpu"))
    assert demo.analytics_enabled is False
