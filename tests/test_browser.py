"""The course in a real browser: JupyterLab from a fresh checkout, driven by Chromium.

Reference: what a student and an instructor do by hand, through Playwright (Python) driving
Debian's ``chromium`` (``make test`` installs it with apt where it is missing and it can: see the
Makefile's ``browser-deps``). One JupyterLab, started with the README's ``make lab`` in a copy of
the checkout, serves every check:

* lesson 00 with Run All: every code cell runs, no error output, the matplotlib figures are
  images the browser decoded, every ipywidgets control is drawn (no "Loading widget..." or
  "Error displaying widget"), and moving the bit-width slider changes what it prints;
* nbgrader's Validate button on the released lab 00 runs the validator (the untouched release
  fails validation, cell by cell);
* the Formgrader lists every lab.

A failure saves a screenshot and names its path. Skips, with what to install, where Playwright
or Chromium is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from test_lab_server import _copy_checkout, make_lab

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.name.startswith("lab"))
LESSON = "lessons/00_welcome.ipynb"  # the quickest lesson with figures and a slider
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STEP_MS = 120_000

playwright = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is missing: `make setup` installs it (the test extra)")
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is missing: `sudo apt-get install chromium` (Debian/Ubuntu), "
                             "or run `make browser-deps` as root")]

# JupyterLab settings for the test's browser: every cell in the DOM (no windowing, so each
# cell's prompt and output can be read), no news pop-up.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``make lab`` on a fresh copy of the checkout: (base URL, token, course folder)."""
    tmp = tmp_path_factory.mktemp("browser")
    course = _copy_checkout(tmp / "course")
    settings = tmp / "settings"
    for name, value in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    env = dict(os.environ, PYTHONPATH=str(course), JUPYTER_CONFIG_PATH="", QLIB_FAST="1",
               QLIB_QUIET="1", JUPYTERLAB_SETTINGS_DIR=str(settings),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    token = "qlib-browser"
    with make_lab(course, env, token) as (port, _):
        yield f"http://127.0.0.1:{port}", token, course


@pytest.fixture
def page(lab, tmp_path, request):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(STEP_MS)
        try:
            yield tab
        finally:
            failed = getattr(request.node, "rep_call", None)
            if failed is not None and failed.failed:
                shot = tmp_path / f"{request.node.name}.png"
                tab.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot of the failure: {shot}")
            browser.close()


def open_notebook(page, lab, path: str):
    base, token, _ = lab
    page.goto(f"{base}/lab/tree/{path}?reset&token={token}")  # reset: not the last test's tabs
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    try:  # a fresh workspace may ask which kernel to start: the notebook's own
        page.get_by_role("button", name="Select", exact=True).click(timeout=5000)
    except Exception:  # noqa: BLE001 (no dialog: the kernel started by itself)
        pass
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator')"
                           " || document.querySelector('.jp-KernelStatus')")
    return page


def run_all(page) -> None:
    """The Run menu's "Run All Cells", then wait until every code cell has its execution count."""
    page.locator(".jp-Notebook").first.click()
    page.locator('.lm-MenuBar-item:has-text("Run")').first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.time() + 300
    while True:
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
                              has_text="Traceback").count()
        assert errors == 0, "a cell raised: " + page.locator(
            '[data-mime-type="application/vnd.jupyter.stderr"]').first.inner_text()[-2000:]
        if prompts and not any("*" in p or "[ ]" in p for p in prompts):
            return
        assert time.time() < deadline, f"Run All did not finish in 300 s: prompts {prompts}"
        time.sleep(1)


def test_lesson_runs_all_with_figures_and_live_widgets(lab, page):
    open_notebook(page, lab, LESSON)
    run_all(page)
    # matplotlib figures: PNG images the browser decoded
    sizes = page.eval_on_selector_all(".jp-OutputArea-output img",
                                      "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes and all(w > 0 and h > 0 for w, h in sizes), sizes
    # every widget view rendered
    body = page.locator(".jp-Notebook").inner_text()
    assert "Loading widget" not in body and "Error displaying widget" not in body
    views = page.locator(".jp-OutputArea-output .jupyter-widgets").count()
    assert views > 0, "no ipywidgets control was drawn"
    # the bit-width slider drives its printout
    cell = page.locator(".jp-CodeCell", has=page.locator(".widget-slider")).first
    printed = cell.locator(".widget-html")
    before = printed.inner_text()
    handle = cell.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first
    handle.focus()
    for _ in range(4):
        handle.press("ArrowLeft")
    page.wait_for_function("([el, old]) => el.innerText !== old", arg=[printed.element_handle(), before])
    after = printed.inner_text()
    assert after != before and "bits" in after, (before, after)


def test_validate_button_runs_nbgrader_validate(lab, page):
    _, _, course = lab
    open_notebook(page, lab, "labs/lab00_warmup/lab00_warmup.ipynb")
    page.locator(".jp-NotebookPanel:visible .validate-button").first.click()
    dialog = page.locator(".jp-Dialog", has_text="Validation Results")
    dialog.wait_for()
    text = dialog.inner_text()
    # the untouched release: its answers raise NotImplementedError, so validation fails per cell
    assert "The following cell failed" in text and "not implemented yet" in text, text[:2000]
    assert "check.lab00.size_in_bytes" in text  # the failing self-check, named
    assert not list((course / "labs" / "lab00_warmup").glob("*.py")), "saving wrote a jupytext twin"


def test_formgrader_lists_every_lab(lab, page):
    base, token, _ = lab
    page.goto(f"{base}/formgrader?token={token}")
    page.wait_for_selector("text=" + LABS[0])
    listed = page.locator("body").inner_text()
    missing = [name for name in LABS if name not in listed]
    assert not missing, f"the Formgrader does not list {missing}"
