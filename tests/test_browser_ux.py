"""What a newcomer sees in the dashboard (issue 15), in a real headless Chromium against a farm
of one real worker: the batch bar in the states' colours, buttons enabled by state, a confirmed
Cancel, errors at the right box, the Hardware choices, the favicon and the localhost notice.
Screenshots go to test-artifacts/."""

from __future__ import annotations

from renderfarm.schema import BatchRecord, JobState
from tests.test_browser import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    browser_page,
    farm_holds,
    running_farm,
)

pytest_plugins = ["tests.dashboard_fixtures"]

SLOW = {"model": "tiny", "width": 64, "height": 64, "steps": 6, "scheduler": "euler"}


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
        running_farm, browser_page, farm_holds):  # noqa: F811
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    client = FarmClient(farm.settings)
    holds = farm_holds
    # steps differ: no two share a pipeline call; whichever the one worker takes first stops
    # at step 2 (a test hold) and the other three wait in the queue until the cancel
    jobs = [{**SLOW, "steps": 6 + i, "prompt": f"slow {i}"} for i in range(4)]
    for job in jobs:
        holds.hold_step(job["prompt"], 2)
    batch = client.submit_batch(jobs)
    point, held_id, _ = holds.wait_held()
    assert point == "step" and held_id in batch.job_ids
    _cancel_on_the_page(page, base, client, batch)
    holds.release_all()
    batch.wait(timeout=120)
    page.goto(f"{base}/batches/{batch.id}")
    record = client.records.batch(batch.id)
    cancelled = record.counts.get(JobState.cancelled, 0)
    assert cancelled == 4 and record.total == 4  # the held one too: none had ended
    done = page.inner_text("#batch-done")
    assert done.startswith("0/4 succeeded") and "4 cancelled" in done
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


def _cancel_on_the_page(page, base: str, client, batch) -> None:
    """Cancel, dismissed then confirmed, while one job is held rendering and three queued."""
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
    # the three queued jobs at once; the held one when it goes on to its next step
    assert client.records.batch(batch.id).counts.get(JobState.cancelled, 0) == 3


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


def test_speed_text_says_images_per_minute_while_running_and_total_time_when_done():
    from dashboard.api import images_per_minute

    running = BatchRecord(id="b", created_at=100, total=4, started_at=110, images=6,
                          counts={JobState.succeeded: 2, JobState.rendering: 1,
                                  JobState.queued: 1})
    assert images_per_minute(running, now=140) == 12.0  # 6 images in the 30 s since the start
    assert images_per_minute(running.model_copy(update={"started_at": None}), now=140) is None


def _wait(check, timeout: float, what):
    import time

    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what()}: not after {timeout} s"
        time.sleep(0.1)
    return found


def test_batches_list_tells_batches_apart_and_a_job_of_four_images_keeps_one_tile(
        running_farm, browser_page, farm_holds):  # noqa: F811
    """The batches list shows the label, first prompt and first image of each batch, images/min
    while it runs and its total time once done; a job of num_images=4 is a 2x2 mosaic in one
    tile of the usual size; the job page has its parameters beside the image at 1280x800 and
    previous / next links within the batch."""
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    client = FarmClient(farm.settings)
    fast = {"model": "tiny", "width": 64, "height": 64, "scheduler": "euler"}
    holds = farm_holds  # the slow job renders until it is cancelled
    slow_hold = holds.hold_step("a slow lighthouse", 2)
    batch = client.submit_batch([
        {**fast, "steps": 2, "seed": 40, "num_images": 4, "prompt": "four lighthouses at dusk"},
        {**fast, "steps": 3, "seed": 50, "prompt": "one lighthouse"},
        # the lowest priority: the one worker takes it last, and it stays held at step 2
        {**SLOW, "steps": 20, "prompt": "a slow lighthouse", "priority": 0},
    ], label="lighthouses")
    four, one, slow = batch.job_ids
    _wait(lambda: all(client.records.job(j).state is JobState.succeeded for j in (four, one)),
          240, lambda: "the two fast jobs succeeded: " + repr(
              [(r.state.value, r.step, r.error) for r in client.records.jobs(batch.job_ids)]))

    page.goto(f"{base}/batches")
    row = page.locator(f"tr[data-id='{batch.id}']")
    assert row.locator(".label").inner_text() == "lighthouses"
    prompt = row.locator(".prompt")
    assert prompt.inner_text() == "four lighthouses at dusk"
    assert prompt.get_attribute("title") == "four lighthouses at dusk"
    thumb = row.locator(".thumb img")
    thumb.evaluate("i => i.complete || new Promise(r => i.onload = r)")
    assert thumb.evaluate("i => i.naturalWidth") == 64
    assert row.locator(".tput").inner_text().endswith(" images/min")  # 5 images stored so far
    page.screenshot(path=str(ARTIFACTS / "ux-batches-running.png"), full_page=True)

    assert client.records.job(slow).state is JobState.rendering
    client.cancel([slow])
    holds.release(slow_hold)
    batch.wait(timeout=120)
    page.goto(f"{base}/batches")
    speed = page.locator(f"tr[data-id='{batch.id}'] .tput").inner_text()
    assert speed.startswith("took ") and "done" not in speed and "/min" not in speed
    page.screenshot(path=str(ARTIFACTS / "ux-batches-done.png"), full_page=True)

    page.goto(f"{base}/batches/{batch.id}")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tile img')].every(i => i.complete)")
    tile = page.locator(f".tile[data-id='{four}'] .thumb")
    single = page.locator(f".tile[data-id='{one}'] .thumb")
    box, other = tile.bounding_box(), single.bounding_box()
    assert tile.locator("img").count() == 4
    assert abs(box["height"] - other["height"]) < 1 and abs(box["height"] - box["width"]) < 1
    for img in tile.locator("img").all():  # a 2x2 mosaic: each image a quarter of the tile
        b = img.bounding_box()
        assert b["width"] < box["width"] / 2 + 1 and b["height"] < box["height"] / 2 + 1
    page.screenshot(path=str(ARTIFACTS / "ux-mosaic-tile.png"), full_page=True)

    page.set_viewport_size({"width": 1280, "height": 800})
    try:
        page.goto(f"{base}/jobs/{one}")
        image = page.locator("#job-images img").first.bounding_box()
        parameters = page.locator("#parameters").bounding_box()
        assert parameters["y"] + parameters["height"] <= 800  # above the fold
        assert parameters["x"] >= image["x"] + image["width"]  # beside the image
        assert "job 2 of 3" in page.inner_text("h1")
        page.screenshot(path=str(ARTIFACTS / "ux-job-page.png"))
        page.click("#job-previous")
        page.wait_for_url(f"{base}/jobs/{four}")
        assert page.locator("a#job-previous").count() == 0  # the first job has none
        page.click("#job-next")
        page.wait_for_url(f"{base}/jobs/{one}")
        page.click("#job-next")
        page.wait_for_url(f"{base}/jobs/{slow}")
        assert page.locator("a#job-next").count() == 0  # nor the last a next one
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_a_csv_upload_takes_job_fields_as_columns_and_refuses_unknown_ones(
        running_farm, browser_page, tmp_path):  # noqa: F811
    from producer import FarmClient

    base, farm = running_farm
    page = browser_page
    client = FarmClient(farm.settings)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,colour\na cat,red\n")
    page.goto(f"{base}/submit")
    page.set_input_files("#prompts_file", str(jobs))
    page.select_option("#size", "64x64")
    page.fill("#steps", "2")
    page.click("button[type=submit].primary")
    error = page.inner_text("#field-prompts_file .error")
    assert "unknown column(s) 'colour'" in error
    page.screenshot(path=str(ARTIFACTS / "ux-csv-unknown-column.png"), full_page=True)

    jobs.write_text("prompt,seed,negative_prompt\na cat,77,ugly\na dog,,\n")
    page.set_input_files("#prompts_file", str(jobs))
    page.click("button[type=submit].primary")
    page.wait_for_url(f"{base}/batches/*")
    batch_id = page.url.rsplit("/", 1)[-1].split("?")[0]
    records = client.batch(batch_id).records()
    assert [(r.request.prompt, r.request.negative_prompt) for r in records] == [
        ("a cat", "ugly"), ("a dog", "")]
    assert records[0].request.seed == 77 and records[0].request.steps == 2
    assert page.locator(".tile .seed").first.inner_text() == "seed 77"
    client.cancel([r.id for r in records])


def test_models_page_shows_family_hash_workers_and_loras(
        running_farm, browser_page, models_dir):  # noqa: F811
    from producer import FarmClient
    from renderfarm.fleet import live_workers
    from worker.modelgen import make_lora

    base, farm = running_farm
    page = browser_page
    client = FarmClient(farm.settings)
    lora = make_lora(models_dir / "tiny", models_dir / "loras" / "ux_ink.safetensors", seed=4)

    def advertised(present: bool):
        workers = live_workers(client.redis)
        return workers and all(("ux_ink" in w.loras) is present and "tiny" in w.hashes
                               for w in workers) and workers

    try:
        (worker,) = _wait(lambda: advertised(True), 30, lambda: "the LoRA advertised")
        page.goto(f"{base}/models")
        row = page.locator("tr[data-model='tiny']")
        assert row.locator(".family").inner_text() == "sd15"
        digest = worker.hashes["tiny"]
        assert row.locator(".hash code").inner_text() == digest[:10]
        assert row.locator(".hash code").get_attribute("title") == f"SHA-256 {digest}"
        assert row.locator(".workers").inner_text() == worker.id
        pill = row.locator(".loras .pill", has_text="ux_ink")
        assert pill.get_attribute("title") == worker.id
        lora_row = page.locator("tr[data-lora='ux_ink']")
        assert lora_row.locator(".family").inner_text() == "sd15"
        assert lora_row.locator(".workers").inner_text() == worker.id
        page.screenshot(path=str(ARTIFACTS / "ux-models.png"), full_page=True)
    finally:
        lora.unlink()  # the session's models dir: other modules count its LoRAs
        _wait(lambda: advertised(False), 30, lambda: "the LoRA dropped")
