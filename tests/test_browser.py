"""JupyterLab driven like a student, in a real browser (Debian's chromium through playwright): open notebooks 01 and
03 (copies: JupyterLab autosaves what it runs), Run All, wait until the kernel is idle, assert that no cell shows an
error, change an explorer dropdown and assert that its figure redraws.

Two numbers per notebook are printed and written to build/browser/timings.json beside the screenshots:
- the kernel's CPU time for one redraw (process CPU time across the widget change, read in the kernel): it must be
  under REDRAW_CPU_S = 1 s. CPU time, not wall time, because this machine and CI are shared 2-core boxes where a
  loaded kernel waits for a core; CPU time does not depend on that wait.
- the kernel's wall time for it (busy -> idle of the kernel's comm message, from the kernel's own timestamps) and the
  time until the browser shows the new image, which must be under IMAGE_S (generous: it includes the wait for a core
  and the browser's round trip).

Runtime (it runs in `make test`): 437 s here at load 3-5 (Run All 89 s for 01, 300 s for 03; redraws 0.48 s and
0.30 s of kernel CPU); on an idle 2-core CI machine about 2.5 min (Run All 19 s and 79 s, ../shared/NOTES.md).

Every wait is a poll for a state ("kernel idle", "no cell queued", "image changed") with a bounded timeout, never a
fixed sleep. Skips, saying why, only where no browser can be installed; `.ci/run` installs chromium with apt-get and
playwright comes with the dev extras. How to drive JupyterLab 4 this way: ../shared/NOTES.md ("Teaching
infrastructure"): `?reset` (no restored tabs), selectors scoped to the visible notebook panel, the kernel's status
read from the session (the toolbar's indicator reports idle before the kernel has started)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "build" / "browser"  # git-ignored (build/); CI keeps it
START_S = 120     # jupyter lab up, notebook open, kernel idle
RUN_ALL_S = 600   # Run All of 03 takes ~80 s on an idle 2-core machine; this allows for a machine loaded 6x over
IMAGE_S = 20.0    # widget change -> new image on screen, wall clock (a loaded machine included)
REDRAW_CPU_S = 1.0  # the kernel's CPU time for one redraw
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# notebook -> description of the explorer dropdown the test changes
EXPLORERS = {"01_outlier_analysis": "input of", "03_group_quantization": "layer"}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no browser: {CHROMIUM} is missing (as root: apt-get update && apt-get install -y chromium; "
                ".ci/run does this)", allow_module_level=True)
if os.environ.get("CI"):  # playwright is a dev dependency: in CI its absence is a broken install, not a skip
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extras)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(what, timeout, check, page=None, every=0.25):
    """Poll check() until it returns something truthy; fail after timeout seconds with a screenshot."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            if page is not None:
                shot = ARTIFACTS / f"timeout_{what.replace(' ', '_')}.png"
                page.screenshot(path=str(shot))
                what += f" (screenshot {shot})"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    for name in EXPLORERS:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", work / f"{name}.ipynb")
    port, token = _free_port(), os.urandom(12).hex()
    env = dict(os.environ, JUPYTERLAB_WORKSPACES_DIR=str(work / ".ws"), JUPYTERLAB_SETTINGS_DIR=str(work / ".st"),
               JUPYTER_RUNTIME_DIR=str(work / ".rt"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as a student gets
    # expose_app_in_browser: window.jupyterapp, to read the kernel's status and time a redraw in the kernel
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log_path = work / "lab.log"
    server = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert server.poll() is None, "jupyter lab exited:\n" + log_path.read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5).status == 200
        except OSError:
            return False

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    timings = {}
    try:
        _poll("jupyter lab to answer", START_S, up)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-dev-shm-usage"])
            yield browser, url, token, timings
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
        shutil.copy(log_path, ARTIFACTS / "lab.log")
        print(f"\nbrowser test artifacts (screenshots, timings.json, lab.log): {ARTIFACTS}")


KERNEL = "window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel"

# Run code in the notebook's kernel outside any cell (nothing is added to the notebook) and return what it printed.
EXECUTE = """async (code) => {
  const kernel = %s;
  const future = kernel.requestExecute({code, store_history: false});
  let text = "";
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === "stream") text += msg.content.text;
    if (msg.header.msg_type === "error") text += msg.content.ename + ": " + msg.content.evalue;
  };
  await future.done;
  return text;
}""" % KERNEL

# Record the kernel's busy/idle timestamps of every widget (comm) message from now on.
RECORD_COMM = """() => {
  const kernel = %s;
  window.__comm = [];
  kernel.iopubMessage.connect((_, msg) => {
    if (msg.header.msg_type === "status" && msg.parent_header.msg_type === "comm_msg")
      window.__comm.push([msg.parent_header.msg_id, msg.content.execution_state, msg.header.date]);
  });
}""" % KERNEL


# Every code cell of the visible notebook: its execution count and the error outputs it holds (from the model, so
# a warning on stderr does not count as an error).
CELLS = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .filter((cell) => cell.model.type === "code")
  .map((cell) => ({count: cell.model.executionCount,
                   errors: cell.model.outputs.toJSON().filter((o) => o.output_type === "error")
                             .map((o) => o.ename + ": " + o.evalue)}))"""


def _kernel_idle(page):
    return page.evaluate(f"() => {{ const k = {KERNEL}; return !!k && k.connectionStatus === 'connected' "
                         "&& k.status === 'idle'; }")


def _comm_wall_s(records):
    """Kernel wall time of each comm message (busy -> idle, the kernel's own clock)."""
    busy, spans = {}, []
    for msg_id, state, date in records:
        t = datetime.fromisoformat(date.replace("Z", "+00:00")).timestamp()
        if state == "busy":
            busy[msg_id] = t
        elif state == "idle" and msg_id in busy:
            spans.append(t - busy.pop(msg_id))
    return spans


@pytest.mark.parametrize("name", list(EXPLORERS))
def test_run_all_and_move_explorer(lab, name):
    browser, url, token, timings = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    t_open = time.monotonic()
    page.goto(f"{url}/lab/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=START_S * 1000)
    _poll("the page to expose jupyterapp", START_S, lambda: page.evaluate("() => !!window.jupyterapp"), page)
    _poll(f"the kernel of {name} to start and be idle", START_S, lambda: _kernel_idle(page), page)
    opened_s = time.monotonic() - t_open
    page.screenshot(path=str(ARTIFACTS / f"{name}_opened.png"))

    # Like a student: the Run menu, Run All Cells.
    n_code = page.evaluate(CELLS).__len__()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    t_run = time.monotonic()
    # Run All marks every code cell [*] at once and numbers each as it finishes; a fresh kernel numbers them 1..n.
    # Done when the last cell reads n, nothing is queued and the kernel is idle; or when a cell failed (Run All
    # stops there).
    prompts = page.locator(f"{PANEL} .jp-CodeCell .jp-InputPrompt")

    def finished():
        cells = page.evaluate(CELLS)
        queued = any("*" in t for t in prompts.all_inner_texts())
        return (cells[-1]["count"] == n_code or any(c["errors"] for c in cells)) and not queued \
            and _kernel_idle(page) and cells

    cells = _poll(f"Run All of {name}", RUN_ALL_S, finished, page, every=1.0)
    run_all_s = time.monotonic() - t_run
    page.screenshot(path=str(ARTIFACTS / f"{name}_ran.png"), full_page=True)
    errors = [f"cell [{c['count']}]: {e}" for c in cells for e in c["errors"]]
    assert not errors, f"{name}: error output after Run All:\n" + "\n".join(errors)
    assert [c["count"] for c in cells] == list(range(1, n_code + 1)), f"{name}: Run All did not run every cell once"

    # The explorer: a VBox of controls and the figure (an <img>); change its dropdown.
    explorer = page.locator(f"{PANEL} .widget-vbox", has=page.locator("select")).last
    explorer.scroll_into_view_if_needed()
    img = explorer.locator("img").first
    img.wait_for(state="visible")
    label = page.locator(f'label.widget-label:text-is("{EXPLORERS[name]}")')
    select = explorer.locator(".widget-dropdown").filter(has=label).locator("select")
    values = select.locator("option").evaluate_all("os => os.map(o => o.value)")
    new_value = next(v for v in values if v != select.input_value())
    before = img.get_attribute("src")
    explorer.screenshot(path=str(ARTIFACTS / f"{name}_explorer_before.png"))
    page.evaluate(RECORD_COMM)
    cpu0 = float(page.evaluate(EXECUTE, "import time as _t\nprint(_t.process_time())"))
    t0 = time.monotonic()
    select.select_option(new_value)
    _poll(f"the {name} explorer to redraw", IMAGE_S,
          lambda: (src := img.get_attribute("src")) and src != before, page, every=0.05)
    image_s = time.monotonic() - t0
    _poll("the kernel to be idle after the redraw", IMAGE_S, lambda: _kernel_idle(page), page)
    cpu_s = float(page.evaluate(EXECUTE, "print(_t.process_time())")) - cpu0
    walls = _comm_wall_s(page.evaluate("() => window.__comm"))
    explorer.screenshot(path=str(ARTIFACTS / f"{name}_explorer_after.png"))
    page.close()

    timings[name] = dict(open_s=round(opened_s, 1), run_all_s=round(run_all_s, 1), image_s=round(image_s, 2),
                         redraw_kernel_cpu_s=round(cpu_s, 3), redraw_kernel_wall_s=round(max(walls), 3),
                         comm_messages=len(walls), load_avg=os.getloadavg()[0])
    print(f"{name}: opened in {opened_s:.0f} s, Run All in {run_all_s:.0f} s; {EXPLORERS[name]!r} -> {new_value!r}: "
          f"new image after {image_s:.2f} s, kernel {cpu_s:.2f} s CPU / {max(walls):.2f} s wall "
          f"(load {os.getloadavg()[0]:.1f})")
    assert walls, "no widget message reached the kernel"
    assert cpu_s < REDRAW_CPU_S, f"{name}: a redraw took {cpu_s:.2f} s of kernel CPU time (> {REDRAW_CPU_S} s)"
