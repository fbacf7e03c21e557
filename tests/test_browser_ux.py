"""What a newcomer sees in the dashboard (issue 15), in a real headless Chromium against a farm
of one real worker: the batch bar in the states' colours, buttons enabled by state, a confirmed
Cancel, errors at the right box, the Hardware choices, the favicon and the localhost notice.
Screenshots go to test-artifacts/."""

from __future__ import annotations

from renderfarm.schema import BatchRecord, JobState
from tests.test_browser import ARTIFACTS, browser_page, running_farm  # noqa: F401 (fixtures)

pytest_plugins = ["tests.dashboard_fixtures"]

SLOW = {"model": "tiny", "width": 128, "height": 128, "steps": 30, "scheduler": "euler"}


def test_bar_parts_count_steps_of_running_jobs_and_keep_an_empty_part():
    from dashboard.api import progress_bar

    batch = BatchRecord(id="b", created_at=0, total=8, counts={
        JobState.succeeded: 2, JobState.cancelled: 1, JobState.rendering: 2, JobState.queued: 3})
    parts = {p["part"]: p for p in progress_bar(batch, steps=0.5)}
    assert parts["succeeded"]["width"] == 25 and parts["cancelled"]["width"] == 12.5
    assert parts["steps"]["width"] == 6.25 and parts["running"]["jobs"] == 1.5
    assert parts["queued"]["width"] == 37.5 and parts["failed"]["width"] == 0
    assert sum(p["width"] for p in parts.values()) == 100


def test_cancel_is_confirmed_and_a_cancelled_batch_does_not_look_like_a_success(
        running_farm, browser_page):  # noqa: F811
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    client = FarmClient(farm.settings)
    # steps differ: no two share a pipeline call, so while one renders the others wait
    batch = client.submit_batch([{**SLOW, "steps": 30 + i, "prompt": f"slow {i}"}
                                 for i in range(4)])
    page.goto(f"{base}/batches/{batch.id}")
    assert page.locator("#retry-batch").is_disabled()  # nothing failed or cancelled yet
    assert page.locator("#cancel-batch").is_enabled()
    queued = page.locator("#batch-progress .p-queued")
    assert queued.evaluate("e => e.getBoundingClientRect().width") > 0  # a visible empty part
    assert page.locator("#batch-progress").evaluate(
        "e => getComputedStyle(e).borderTopWidth") != "0px"

    dialogs: list[str] = []

    def answer(dialog, accept: bool) -> None:
        dialogs.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda d: answer(d, False))
    page.click("#cancel-batch")
    assert dialogs == ["Cancel every unfinished job of this batch?"]
    assert client.records.batch(batch.id).counts.get(JobState.cancelled, 0) == 0
    page.once("dialog", lambda d: answer(d, True))
    page.click("#cancel-batch")
    page.wait_for_url(f"{base}/batches/{batch.id}*")
    batch.wait(timeout=120)
    page.goto(f"{base}/batches/{batch.id}")
    record = client.records.batch(batch.id)
    cancelled = record.counts.get(JobState.cancelled, 0)
    assert cancelled >= 3
    done = page.inner_text("#batch-done")
    assert f"{cancelled} cancelled" in done and done.startswith(
        f"{record.counts.get(JobState.succeeded, 0)}/4 succeeded")
    part = page.locator("#batch-progress .p-cancelled")
    assert part.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(201, 138, 18)"
    assert part.evaluate("e => e.getBoundingClientRect().width") > 0
    assert page.locator("#cancel-batch").is_disabled()  # every job has ended
    assert page.locator("#retry-batch").is_enabled()
    page.screenshot(path=str(ARTIFACTS / "ux-cancelled-batch.png"), full_page=True)
    page.goto(f"{base}/batches")
    row = page.locator(f"tr[data-id='{batch.id}']")
    assert f"{cancelled} cancelled" in row.inner_text()
    assert row.locator(".p-cancelled").count() == 1


def test_submit_form_errors_choices_favicon_and_localhost_notice(
        running_farm, browser_page):  # noqa: F811
    base, _farm = running_farm
    page = browser_page
    page.goto(f"{base}/submit")
    assert "reachable from this machine only" in page.inner_text("#reach")
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert page.request.get(f"{base}{icon}").status == 200
    options = page.locator("#hardware option").all_text_contents()
    assert "mps" in options

    page.click("button[type=submit].primary")  # nothing filled in
    error = page.inner_text("#field-prompts .error")
    assert "needs at least one prompt" in error and "got" not in error

    page.fill("#prompts", "a red cube")
    page.select_option("#size", "custom")
    page.fill("#width", "500")
    page.fill("#height", "64")
    page.evaluate("document.querySelector('form').noValidate = true")  # the server's check
    page.click("button[type=submit].primary")
    assert "width must be a multiple of 8, got 500" in page.inner_text("#field-width .error")
    assert page.locator("#field-size .error").count() == 0
    page.screenshot(path=str(ARTIFACTS / "ux-width-error.png"), full_page=True)


def test_tiles_show_seed_and_prompt_and_img2img_carries_the_settings(
        running_farm, browser_page):  # noqa: F811
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    client = FarmClient(farm.settings)
    prompt = "a very long prompt about a lighthouse on a cliff at dawn, seen from the sea"
    job = client.submit({"model": "tiny", "width": 64, "height": 64, "steps": 3, "seed": 1234,
                         "scheduler": "euler", "prompt": prompt, "negative_prompt": "ugly"})
    job.wait(timeout=120)
    page.goto(f"{base}/batches/{job.status().batch_id}")
    assert page.inner_text(".tile .seed") == "seed 1234"
    assert page.locator(".tile .prompt").get_attribute("title") == prompt
    page.goto(f"{base}/jobs/{job.id}")
    page.click("text=Use as img2img input")
    page.wait_for_url(f"{base}/submit?**")
    assert page.input_value("#prompts") == prompt
    assert page.input_value("#negative_prompt") == "ugly"
    assert page.input_value("#size") == "64x64" and page.input_value("#steps") == "3"
    assert page.input_value("#scheduler") == "euler"
    assert page.locator("#init_ref").get_attribute("value").startswith("key:")
    page.screenshot(path=str(ARTIFACTS / "ux-img2img-carried.png"), full_page=True)
