"""A real headless Chromium submits 3 prompts through the dashboard of a running farm and
watches the 3 images appear in the batch grid. Screenshots go to test-artifacts/.

Needs Debian's chromium (``apt-get install chromium``) and the ``playwright`` package; it is
skipped, saying which is missing, without them. Never ``playwright install``: we drive the
system browser.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from renderfarm.settings import Settings
from tests.fault_fixtures import HoldControl
from worker import testhooks

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytest_plugins = ["tests.dashboard_fixtures"]


def _require_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install playwright")
    return sync_playwright


@pytest.fixture(scope="module")
def running_farm(module_redis_url, models_dir, tmp_path_factory):
    """A farm of one real worker process, local storage, and its dashboard on waitress."""
    _require_browser()

    from dashboard import create_app
    from dashboard.serve import make_server
    from renderfarm.farm import EmbeddedFarm

    url = module_redis_url
    data = tmp_path_factory.mktemp("browser-farm")
    settings = Settings(redis_url=url, data_dir=data, models_dir=models_dir,
                        storage_url=(data / "images").as_uri(), lease_seconds=5)
    # test holds on (worker/testhooks.py): a test stops a job at a step to look at the page
    farm = EmbeddedFarm(settings, workers=1, profile="cpu", preload=["tiny"],
                        extra_env={testhooks.ENABLE_ENV: testhooks.ENABLE_VALUE})
    farm.start()
    server = make_server(create_app({"SETTINGS": settings}), port=0)
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", farm
    finally:
        server.close()
        farm.stop()


@pytest.fixture
def farm_holds(running_farm):
    """Test holds on the farm's worker (worker/testhooks.py); released after the test, so a
    failed test never leaves the module's one worker waiting."""
    from producer import FarmClient

    control = HoldControl(FarmClient(running_farm[1].settings).redis)
    yield control
    control.release_all()


@pytest.fixture(scope="module")
def browser_page(running_farm):
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the pages: {errors}"


def test_submit_three_prompts_and_watch_them_render(running_farm, browser_page):
    base, _farm = running_farm
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)

    page.goto(f"{base}/submit")
    page.fill("#prompts", "a red cube\na blue sphere\na green cone")
    page.select_option("#size", "64x64")
    assert page.locator("#width").is_hidden()  # custom width/height only for "custom"
    page.fill("#steps", "4")
    page.fill("#label", "browser test")
    page.select_option("#scheduler", "euler")
    page.screenshot(path=str(ARTIFACTS / "dashboard-submit.png"), full_page=True)
    page.click("button[type=submit].primary")

    page.wait_for_url(f"{base}/batches/*")
    assert page.locator(".tile").count() == 3
    # The grid fills in by polling, with no reload: the images arrive in the same document.
    page.evaluate("window.__same_document = true")
    # (img.preview: a live preview while a job renders, not its image)
    page.wait_for_function(
        "() => document.querySelectorAll('.tile img:not(.preview)').length === 3 && "
        "[...document.querySelectorAll('.tile img:not(.preview)')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=180_000,
    )
    assert page.evaluate("window.__same_document") is True
    page.wait_for_function(
        "() => document.getElementById('batch-done').textContent.startsWith('3/3')",
        timeout=60_000)
    states = page.locator(".tile .state").all_text_contents()
    assert states == ["succeeded"] * 3
    assert page.locator(".tile img").first.evaluate("i => i.naturalWidth") == 64
    page.screenshot(path=str(ARTIFACTS / "dashboard-batch.png"), full_page=True)

    page.locator(".tile").first.click()
    page.wait_for_selector("#parameters")
    assert "Sampler: Euler" in page.inner_text("#parameters")
    page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)

    page.goto(f"{base}/workers")
    assert page.locator("#worker-rows tr.w-live").count() == 1
    page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"), full_page=True)

    page.goto(f"{base}/batches")
    assert "browser test" in page.inner_text("#batch-rows")
    page.screenshot(path=str(ARTIFACTS / "dashboard-batches.png"), full_page=True)
    assert (ARTIFACTS / "dashboard-batch.png").stat().st_size > 0


def test_upload_jsonl_and_watch_the_step_bar_move_then_upload_csv(running_farm, browser_page,
                                                                  farm_holds, tmp_path):
    """The Submit page's file upload (README: "upload a .txt/.csv/.jsonl file") and the batch's
    live per-step progress: a ``.jsonl`` job held at step 2 of 6 shows "step 2/6" and a steps
    part of 2/6 of a job's width; the hold moved to step 4 (worker/testhooks.py), the same
    document shows "step 4/6" and a wider part; then a ``.csv`` with a header row."""
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    client = FarmClient(farm.settings)
    holds = farm_holds
    held = "uploaded in jsonl, held"
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(f'{{"prompt": "{held}", "seed": 31, "steps": 6}}\n'
                     '{"prompt": "uploaded in jsonl, second", "seed": 32, "steps": 2}\n')
    holds.hold_step(held, 2)
    page.goto(f"{base}/submit")
    page.set_input_files("#prompts_file", str(jsonl))
    page.select_option("#size", "64x64")
    page.select_option("#scheduler", "euler")
    page.click("button[type=submit].primary")
    page.wait_for_url(f"{base}/batches/*")
    batch_id = page.url.rsplit("/", 1)[1].split("?")[0]
    jobs = client.records.batch_jobs(batch_id)
    assert [(j.request.prompt, j.request.seed, j.request.steps) for j in jobs] == [
        (held, 31, 6), ("uploaded in jsonl, second", 32, 2)]
    assert holds.wait_held() == ("step", jobs[0].id, 2)
    page.evaluate("window.__same_document = true")

    tile_step = f".tile[data-id='{jobs[0].id}'] .step"

    def steps_shown(step: int) -> float:
        """Wait until the page polled step ``step``; the steps part's share of the bar."""
        page.wait_for_function(
            f"() => document.querySelector(\"{tile_step}\").textContent === 'step {step}/6'",
            timeout=60_000)
        page.wait_for_function(
            f"() => Math.abs(parseFloat(document.querySelector('#batch-progress .p-steps')"
            f".style.width) - {step / 6 / 2 * 100}) < 0.01", timeout=60_000)
        return page.locator("#batch-progress .p-steps").evaluate(
            "e => e.getBoundingClientRect().width / e.parentElement.clientWidth")

    at_two = steps_shown(2)
    page.screenshot(path=str(ARTIFACTS / "dashboard-step-2.png"), full_page=True)
    holds.move_hold(held, 4)
    assert holds.wait_held() == ("step", jobs[0].id, 4)
    at_four = steps_shown(4)
    assert abs(at_two - 2 / 12) < 0.02 and abs(at_four - 4 / 12) < 0.02, (at_two, at_four)
    assert page.evaluate("window.__same_document") is True  # no reload: the page polled
    holds.release_all()
    page.wait_for_function(
        "() => document.getElementById('batch-done').textContent.startsWith('2/2')",
        timeout=120_000)

    csv = tmp_path / "jobs.csv"
    csv.write_text("prompt,seed,steps\nuploaded in csv,41,2\n\"a csv, with a comma\",42,3\n")
    page.goto(f"{base}/submit")
    page.set_input_files("#prompts_file", str(csv))
    page.select_option("#size", "64x64")
    page.click("button[type=submit].primary")
    page.wait_for_url(f"{base}/batches/*")
    batch_id = page.url.rsplit("/", 1)[1].split("?")[0]
    assert [(j.request.prompt, j.request.seed, j.request.steps, j.request.width)
            for j in client.records.batch_jobs(batch_id)] == [
        ("uploaded in csv", 41, 2, 64), ("a csv, with a comma", 42, 3, 64)]
    page.wait_for_function(
        "() => document.getElementById('batch-done').textContent.startsWith('2/2')",
        timeout=120_000)
    assert page.locator(".tile .seed").all_text_contents() == ["seed 41", "seed 42"]


def test_a_plot_from_the_submit_page_shows_its_grid_on_the_batch_page(running_farm,
                                                                      browser_page):
    """The submit page's X axis (a range, 2 cells of 2 steps at 64x64): the batch page shows
    the cells, then, with no reload, the grid once the worker has drawn it."""
    base, _farm = running_farm
    page = browser_page
    page.goto(f"{base}/submit")
    page.fill("#prompts", "a plot in chromium")
    page.select_option("#size", "64x64")
    page.fill("#steps", "2")
    page.select_option("#scheduler", "euler")
    page.fill("#x_field", "seed")
    page.fill("#x_values", "7-8")
    page.click("button[type=submit].primary")

    page.wait_for_url(f"{base}/batches/*")
    assert page.locator(".tile").count() == 2
    assert page.locator("#plot-grids").count() == 1
    page.evaluate("window.__same_document = true")
    page.wait_for_function(
        "() => { const g = document.querySelector('#plot-grids img.plot-grid');"
        " return g && g.complete && g.naturalWidth > 0; }", timeout=180_000)
    assert page.evaluate("window.__same_document") is True
    grid = page.locator("#plot-grids img.plot-grid")
    assert grid.count() == 1
    batch_id = page.url.rsplit("/", 1)[-1]
    assert grid.get_attribute("alt") == f"grid {batch_id}/grid.png"
    width, height = grid.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert (width, height > 64) == (2 * 64, True)  # two cells side by side under their labels
    assert page.locator(".tile .state").all_text_contents() == ["succeeded"] * 2
    page.screenshot(path=str(ARTIFACTS / "dashboard-plot.png"), full_page=True)
