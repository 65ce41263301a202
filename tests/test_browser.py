"""JupyterLab driven like a student, in a real browser: open notebooks 01 and 03 (copies), Run All, wait for the
kernel, assert no error output, move an explorer widget and assert its figure redraws within REDRAW_S seconds.
Screenshots go to build/browser/ (CI keeps them as artifacts). Needs Debian's chromium (.ci/run installs it with
apt-get) and the playwright package (dev extras); skips with the reason where either is missing.

How (learned the hard way, ../shared/NOTES.md): `/lab/tree/NAME?reset` (no restored tabs), selectors scoped to the
visible notebook panel, the status bar's "| Idle" (the toolbar indicator reports idle too early), Run All done
when no prompt shows `*` for three checks a second apart."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "build" / "browser"
RUN_ALL_S = 240  # 03 takes ~80 s on an idle 2-core machine
REDRAW_S = 5.0   # a redraw is 0.4-0.7 s of Python; the rest is the browser and the widget round trip
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"

if os.environ.get("ATOM_LAB_BROWSER") != "1":
    # Not yet part of `make test`: written on a machine loaded 7x over, where Run All of 01 did not finish in 240 s,
    # so it has not passed once. Run it with ATOM_LAB_BROWSER=1 and enable it in .ci/run once it passes there.
    pytest.skip("the browser test runs only with ATOM_LAB_BROWSER=1 (not yet verified)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extras)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no browser: {CHROMIUM} is missing (as root: apt-get update && apt-get install -y chromium)",
                allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    for name in ("01_outlier_analysis.ipynb", "03_group_quantization.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, work / name)  # JupyterLab autosaves what it runs: never the originals
    port, token = _free_port(), os.urandom(12).hex()
    env = dict(os.environ, JUPYTERLAB_WORKSPACES_DIR=str(work / ".ws"), JUPYTER_RUNTIME_DIR=str(work / ".rt"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as a student gets
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.open_browser=False"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(work / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                pytest.fail("jupyter lab did not start:\n" + (work / "lab.log").read_text()[-2000:])
            time.sleep(0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser, url, token
        browser.close()
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _idle(page):
    return "| Idle" in page.locator(".jp-StatusBar-Widget").all_inner_texts().__str__()


def _wait_run_all(page, timeout):
    start, quiet = time.time(), 0
    while quiet < 3:
        if time.time() - start > timeout:
            page.screenshot(path=str(ARTIFACTS / "run_all_timeout.png"))
            raise AssertionError(f"Run All did not finish in {timeout} s")
        busy = any("*" in t for t in page.locator(f"{PANEL} .jp-InputPrompt").all_inner_texts())
        quiet = 0 if busy or not _idle(page) else quiet + 1
        time.sleep(1)
    return time.time() - start


@pytest.mark.parametrize("name, widget", [("01_outlier_analysis", 0), ("03_group_quantization", 0)])
def test_run_all_and_move_explorer(lab, name, widget):
    browser, url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/lab/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=60_000)
    deadline = time.time() + 60
    while not _idle(page):
        assert time.time() < deadline, "the kernel never became idle"
        time.sleep(0.5)
    page.screenshot(path=str(ARTIFACTS / f"{name}_opened.png"))
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    took = _wait_run_all(page, RUN_ALL_S)
    print(f"{name}: Run All in {took:.0f} s")
    outputs = page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts()
    errors = [t[:300] for t in outputs if "Traceback (most recent call last)" in t or "Error:" in t.split("\n")[0]]
    assert not errors, errors
    explorer = page.locator(f"{PANEL} .widget-vbox").last
    explorer.scroll_into_view_if_needed()
    img = explorer.locator("img").first
    img.wait_for(timeout=30_000)
    before = img.get_attribute("src")
    page.screenshot(path=str(ARTIFACTS / f"{name}_ran.png"))
    select = explorer.locator("select").nth(widget)
    values = select.locator("option").evaluate_all("os => os.map(o => o.value)")
    current = select.input_value()
    select.select_option(next(v for v in values if v != current))
    t0 = time.time()
    while img.get_attribute("src") == before:
        assert time.time() - t0 < REDRAW_S, f"the explorer did not redraw within {REDRAW_S} s"
        time.sleep(0.05)
    print(f"{name}: explorer redrew in {time.time() - t0:.2f} s (browser included)")
    explorer.screenshot(path=str(ARTIFACTS / f"{name}_explorer_changed.png"))
    page.close()
