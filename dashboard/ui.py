"""The pages: submit, batches, batch, job, workers, queues; and /files/ for local images.

Pages are rendered on the server; the small scripts in static/ then poll the JSON API (at most
every 2 s) to fill in what changes. Forms are Flask-WTF forms, so each POST carries a CSRF token.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_from_directory,
    stream_with_context,
    url_for,
)
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from redis.exceptions import ResponseError
from werkzeug.security import safe_join
from wtforms import (
    BooleanField,
    FloatField,
    HiddenField,
    IntegerField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import NumberRange, Optional

from dashboard import api
from renderfarm.errors import FieldError, InvalidJob, JobNotFound
from renderfarm.images import MAX_INIT_IMAGE_BYTES, encode_init_image
from renderfarm.jobfile import parse_jobs
from renderfarm.keys import batch_jobs as batch_jobs_key
from renderfarm.plots import AXES, FIELDS, parse_cli_axis
from renderfarm.schema import SCHEDULERS, JobRecord, JobState
from renderfarm.webhooks import batch_deliveries
from storage import check_key
from storage.local import LocalStorage
from storage.png import read_png_info

bp = Blueprint("ui", __name__)

SIZE_PRESETS = ("512x512", "768x768", "512x768", "768x512", "1024x1024", "640x384", "256x256",
                "64x64")
HARDWARE = ("any", "gpu", "cpu", "jetson", "mps")
PAGE = 50  # batches per page
GRID_PAGE = 250  # tiles per page of a batch
MAX_PAGE = 10**6  # a larger ?page= shows this one (empty): offsets stay far inside Redis' range


@bp.before_request
def _authorize():
    from dashboard.auth import check_page

    return check_page()


@bp.app_template_filter("ago")
def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


@bp.app_template_filter("secs")
def _secs(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.2f} s" if seconds < 60 else _ago(seconds)


# -- the submit form -------------------------------------------------------------------------
class SubmitForm(FlaskForm):
    prompts = TextAreaField("Prompts, one per line")
    prompts_file = FileField("…or a file (.txt one per line, .csv, .jsonl one job per line)")
    negative_prompt = TextAreaField("Negative prompt")
    model = SelectField("Model", validate_choice=False)
    scheduler = SelectField("Scheduler", choices=list(SCHEDULERS), default="euler_a")
    steps = IntegerField("Steps", default=25, validators=[Optional()])
    guidance_scale = FloatField("CFG scale", default=7.0, validators=[Optional()])
    size = SelectField("Size", choices=[*SIZE_PRESETS, "custom"], default="512x512")
    width = IntegerField("Width", validators=[Optional()])
    height = IntegerField("Height", validators=[Optional()])
    seed = IntegerField("Seed (blank: random)", validators=[Optional()])
    num_images = IntegerField("Images per prompt", default=1,
                              validators=[Optional(), NumberRange(1, 16)])
    hardware = SelectField("Hardware", choices=list(HARDWARE), default="any")
    priority = IntegerField("Priority (0–9, higher first)", default=5, validators=[Optional()])
    init_image = FileField("img2img init image")
    init_ref = HiddenField()
    strength = FloatField("Strength", default=0.75, validators=[Optional()])
    label = StringField("Label")
    # X/Y/Z plot (renderfarm/plots.py): an axis is a field and its comma-separated values
    x_field = StringField("X axis field")
    x_values = StringField("X values")
    y_field = StringField("Y axis field")
    y_values = StringField("Y values")
    z_field = StringField("Z axis field")
    z_values = StringField("Z values")
    prompt_matrix = BooleanField("Prompt matrix: the prompt is a|b|c, every combination of "
                                 "the parts after the first")


#: job field -> the form field its errors are shown next to
FORM_FIELD = {"prompt": "prompts", "mode": "init_image", "width": "size", "height": "size",
              "job": "prompts", "jobs": "prompts", "label": "label", "init_image": "init_image"}


def _read_prompts_file(name: str, data: bytes) -> list[dict]:
    try:
        return parse_jobs(name, data)
    except ValueError as exc:
        raise InvalidJob([FieldError("prompts_file", str(exc), name)]) from None


def _init_image(form: SubmitForm) -> str | None:
    """The img2img init image as base64: an upload, or a reference to a stored image / a job's."""
    upload = form.init_image.data
    if upload and getattr(upload, "filename", ""):
        data = upload.read(MAX_INIT_IMAGE_BYTES + 1)
        if len(data) > MAX_INIT_IMAGE_BYTES:
            raise InvalidJob([FieldError("init_image",
                                         f"is over the {MAX_INIT_IMAGE_BYTES // 2**20} MiB limit",
                                         upload.filename)])
        return encode_init_image(data)
    ref = form.init_ref.data or ""
    kind, _, value = ref.partition(":")
    c = api.client()
    try:
        if kind == "key":
            return encode_init_image(c.storage.get(check_key(value)))
        if kind == "job":
            return c.records.job(value).request.init_image
    except (KeyError, ValueError, JobNotFound):
        raise InvalidJob([FieldError("init_image", "refers to an image that is gone", ref)]) \
            from None
    return None


def _jobs_from_form(form: SubmitForm) -> list[dict]:
    common: dict = {
        "negative_prompt": form.negative_prompt.data or "",
        "model": form.model.data,
        "scheduler": form.scheduler.data,
        "hardware": form.hardware.data,
    }
    for name in ("steps", "guidance_scale", "priority", "strength"):
        value = getattr(form, name).data
        if value is not None:
            common[name] = value
    if form.size.data == "custom":
        missing = [n for n in ("width", "height") if getattr(form, n).data is None]
        if missing:
            raise InvalidJob([FieldError("size", "custom size needs a width and a height",
                                         None)])
        common.update(width=form.width.data, height=form.height.data)
    else:
        w, _, h = (form.size.data or "").partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise InvalidJob([FieldError("size", "must be a preset or custom", form.size.data)])
        common.update(width=int(w), height=int(h))
    init = _init_image(form)
    if init is not None:
        common.update(mode="img2img", init_image=init)
    else:
        common.pop("strength", None)

    prompts = [{"prompt": p.strip()} for p in (form.prompts.data or "").splitlines() if p.strip()]
    upload = form.prompts_file.data
    if upload and getattr(upload, "filename", ""):
        prompts += _read_prompts_file(upload.filename, upload.read())
    if not prompts:
        raise InvalidJob([FieldError("prompts", "needs at least one prompt (one per line) or a "
                                     "prompts file", "")])
    # Each prompt becomes num_images jobs (seeds seed, seed+1, ...), so they spread over workers.
    count = form.num_images.data or 1
    jobs = []
    for item in prompts:
        job = {**common, **item}
        first = job.get("seed", form.seed.data)
        for k in range(count):
            seed = None if first is None else first + k
            jobs.append({**job, **({"seed": seed} if seed is not None else {})})
    return jobs


def _plot_axes(form: SubmitForm) -> dict | None:
    """The plot's axes from the form's axis rows (None: no axis, an ordinary batch). Values
    are read as the CLI reads them (CSV, so "a, b" quoted is one value)."""
    axes = {}
    for name in AXES:
        fname = (getattr(form, f"{name}_field").data or "").strip()
        values = (getattr(form, f"{name}_values").data or "").strip()
        if fname:
            axes[name] = parse_cli_axis(f"{fname}={values}")
        elif values:
            raise InvalidJob([FieldError(f"axes.{name}.field", "must name the field the values "
                                         "are for", "")])
    if form.prompt_matrix.data:
        free = next((name for name in AXES if name not in axes), None)
        if free is None:
            raise InvalidJob([FieldError("axes", "has no free axis for the prompt matrix", "")])
        axes[free] = {"field": "prompt_matrix", "values": []}
    return axes or None


def _plot_field(error_field: str) -> str | None:
    """The form field an axis error is shown next to."""
    for name in AXES:
        if error_field.startswith(f"axes.{name}.field"):
            return f"{name}_field"
        if error_field.startswith(f"axes.{name}"):
            return f"{name}_values"
    return "x_values" if error_field == "axes" else None


def _show_errors(form: SubmitForm, errors: list[FieldError]) -> None:
    """Put each refused field's message next to the form field it came from: a custom width
    or height at its own box. An empty value is not shown as ``got ''``."""
    custom = form.size.data == "custom"
    for e in errors:
        own = e.field.removeprefix("job.")  # a plot's base job
        name = _plot_field(e.field) or (own if custom and own in ("width", "height") else
                                         FORM_FIELD.get(own, own))
        field = getattr(form, name, None) or form.prompts
        text = str(e) if e.value not in ("", None) else f"{e.field} {e.message}"
        field.errors = [*field.errors, text]


def _prefill(form: SubmitForm) -> None:
    """?from=<job id>: the job's settings with a blank seed; ?init=<key>: an img2img input.
    Both ("Use as img2img input", as A1111's "Send to img2img"): the job's prompt, negative,
    size and settings, with its image as the init image."""
    c = api.client()
    if job_id := request.args.get("from"):
        try:
            r = c.records.job(job_id).request
        except JobNotFound:
            flash(f"no job {job_id!r} to copy settings from")
            return
        form.prompts.data = r.prompt
        form.negative_prompt.data = r.negative_prompt
        form.model.data = r.model
        form.scheduler.data = r.scheduler
        form.steps.data = r.steps
        form.guidance_scale.data = r.guidance_scale
        size = f"{r.width}x{r.height}"
        form.size.data = size if size in SIZE_PRESETS else "custom"
        form.width.data, form.height.data = r.width, r.height
        form.num_images.data = r.num_images
        form.hardware.data = r.hardware if r.hardware in HARDWARE else "any"
        form.priority.data = r.priority
        form.strength.data = r.strength
        if r.init_image is not None:
            form.init_ref.data = f"job:{job_id}"
    if key := request.args.get("init"):
        form.init_ref.data = f"key:{key}"


@bp.route("/submit", methods=["GET", "POST"])
def submit():
    c = api.client()
    models = c.models()
    form = SubmitForm()
    form.model.choices = models or [c.settings.default_model]
    if request.method == "GET":
        form.model.data = c.settings.default_model if c.settings.default_model in models else (
            models[0] if models else c.settings.default_model)
        _prefill(form)
    status = 200
    if form.validate_on_submit():
        label = (form.label.data or "").strip()[:api.MAX_LABEL]
        try:
            jobs = _jobs_from_form(form)
            axes = _plot_axes(form)
            if axes is None:
                handle = c.submit_batch(jobs, label=label)
            elif len(jobs) != 1:
                raise InvalidJob([FieldError("prompts", "a plot takes one prompt, and 1 image "
                                             "per prompt", len(jobs))])
            else:
                handle = c.submit_plot(jobs[0], axes, label=label)
        except InvalidJob as exc:
            _show_errors(form, exc.errors)
            status = 400
        else:
            return redirect(url_for("ui.batch", batch_id=handle.id), code=303)
    elif request.method == "POST":
        status = 400
    init_preview = None
    if (form.init_ref.data or "").startswith("key:"):
        init_preview = api.image_url(form.init_ref.data[4:])
    return render_template("submit.html", form=form, presets=SIZE_PRESETS,
                           init_preview=init_preview, plot_fields=FIELDS), status


# -- batches ---------------------------------------------------------------------------------
def _page_number() -> int:
    try:
        return min(max(1, int(request.args.get("page", "1"))), MAX_PAGE)
    except ValueError:
        return 1


@bp.get("/")
def index():
    return redirect(url_for("ui.batches"))


@bp.get("/batches")
def batches():
    c = api.client()
    page = _page_number()
    total = c.records.count_batches()
    rows = [api.batch_json(b) for b in c.records.batches((page - 1) * PAGE, PAGE)]
    pages = max(1, -(-total // PAGE))
    return render_template("batches.html", batches=rows, page=page, pages=pages, total=total,
                           offset=(page - 1) * PAGE, limit=PAGE)


@bp.get("/batches/<batch_id>")
def batch(batch_id: str):
    c = api.client()
    record = c.records.batch(batch_id)
    page = _page_number()
    offset = (page - 1) * GRID_PAGE
    jobs = [api.job_json(r) for r in c.records.batch_jobs(batch_id, offset, GRID_PAGE)]
    pages = max(1, -(-record.total // GRID_PAGE))
    hooks = batch_deliveries(c.redis, batch_id) if record.webhooks else []
    now = c.records.clock() if hooks else 0.0
    for hook in hooks:  # "next try in 42 s" / "12 s ago", by Redis' clock like the records
        hook["next_in"] = None if hook["next_at"] is None else round(hook["next_at"] - now)
        hook["last_ago"] = None if hook["last_at"] is None else round(now - hook["last_at"])
    return render_template("batch.html", batch=api.batch_json(record), jobs=jobs, page=page,
                           pages=pages, offset=offset, limit=GRID_PAGE, states=list(JobState),
                           hooks=hooks)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    c = api.client()
    c.records.batch(batch_id)
    outcomes = api.cancel_jobs(c.records.batch_jobs(batch_id))
    flash(f"cancel asked for {len(outcomes)} jobs")
    return redirect(url_for("ui.batch", batch_id=batch_id), code=303)


@bp.post("/batches/<batch_id>/pause")
def pause_batch(batch_id: str):
    held = api.client().pause(batch_id)
    flash(f"batch paused: {held} queued jobs held")
    return redirect(url_for("ui.batch", batch_id=batch_id), code=303)


@bp.post("/batches/<batch_id>/resume")
def resume_batch(batch_id: str):
    resumed = api.client().resume(batch_id)
    flash(f"batch resumed: {len(resumed)} queued jobs back in line")
    return redirect(url_for("ui.batch", batch_id=batch_id), code=303)


@bp.post("/batches/<batch_id>/retry")
def retry_batch(batch_id: str):
    c = api.client()
    c.records.batch(batch_id)
    retried = c.retry(api.retryable(c.records.batch_jobs(batch_id)))
    flash(f"{len(retried)} failed or cancelled jobs queued again")
    return redirect(url_for("ui.batch", batch_id=batch_id), code=303)


@bp.get("/batches/<batch_id>/images.zip")
def batch_zip(batch_id: str):
    """Every stored image of the batch in one zip, streamed as it is built."""
    c = api.client()
    c.records.batch(batch_id)
    storage = c.storage
    keys = [r.key for job in c.records.batch_jobs(batch_id)
            if job.state is JobState.succeeded for r in job.results]
    headers = {"Content-Disposition": f'attachment; filename="batch-{batch_id}.zip"'}
    return Response(stream_with_context(_zip_stream(storage, keys)),
                    mimetype="application/zip", headers=headers)


class _Chunks(io.RawIOBase):
    """A write-only stream whose bytes are picked up after each file: zipfile streams into it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _zip_stream(storage, keys: list[str]) -> Iterator[bytes]:
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in keys:
            try:
                data = storage.get(key)
            except KeyError:
                continue
            archive.writestr(key.rsplit("/", 1)[-1], data)
            yield sink.take()
    yield sink.take()


# -- jobs ------------------------------------------------------------------------------------
def _parameters_text(record: JobRecord) -> str | None:
    if not record.results:
        return None
    try:
        return read_png_info(api.client().storage.get(record.results[0].key)).get("parameters")
    except (KeyError, ValueError, OSError):
        return None


def _position(record: JobRecord) -> dict | None:
    """The job's place in its batch (1-based) and its neighbours' ids, for previous/next."""
    r = api.client().redis
    jobs = batch_jobs_key(record.batch_id)
    try:
        index = r.lpos(jobs, record.id)
    except ResponseError:  # a Redis before 6.0.6 has no LPOS
        ids = [i.decode() for i in r.lrange(jobs, 0, -1)]
        index = ids.index(record.id) if record.id in ids else None
    if index is None:
        return None
    pipe = r.pipeline(transaction=False)
    pipe.lindex(jobs, max(0, index - 1))
    pipe.lindex(jobs, index + 1)
    pipe.llen(jobs)
    previous, following, total = pipe.execute()
    previous = previous if index > 0 else None
    return {"index": index + 1, "total": total,
            "previous": previous.decode() if previous else None,
            "next": following.decode() if following else None}


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    record = api.client().records.job(job_id)
    data = api.job_json(record)
    return render_template("job.html", job=data, request_=record.request,
                           image_keys=[r.key for r in record.results],
                           parameters=_parameters_text(record), position=_position(record),
                           retryable=record.state in (JobState.failed, JobState.cancelled))


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    outcome = api.client().records.cancel(job_id)
    flash(f"job {job_id}: {outcome}")
    return redirect(url_for("ui.job", job_id=job_id), code=303)


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str):
    c = api.client()
    c.records.job(job_id)
    retried = c.retry([job_id])
    flash(f"job {job_id} queued again" if retried else f"job {job_id} is not failed or cancelled")
    return redirect(url_for("ui.job", job_id=job_id), code=303)


# -- fleet -----------------------------------------------------------------------------------
@bp.get("/workers")
def workers():
    return render_template("workers.html", workers=api.workers(), redis_report=redis_report())


@bp.get("/models")
def models():
    c = api.client()
    return render_template("models.html", inventory=c.inventory(),
                           models_path=c.settings.models_path)


@bp.get("/queues")
def queues():
    return render_template("queues.html", data=api.queues(), redis_report=redis_report())


def redis_report():
    """What renderfarm.redis_check finds about the farm's Redis (a few commands per page)."""
    from renderfarm.connection import redis_url
    from renderfarm.redis_check import inspect

    c = api.client()
    return inspect(c.redis, redis_url(c.settings))


# -- images of the local backend -------------------------------------------------------------
@bp.get("/files/<path:key>")
def file(key: str):
    """A stored image, for the local backend only; nothing outside the storage root."""
    storage = api.client().storage
    if not isinstance(storage, LocalStorage):
        abort(404)
    try:
        check_key(key)
    except ValueError:
        abort(404)
    if safe_join(str(storage.root), key) is None:
        abort(404)
    response = send_from_directory(storage.root, key, max_age=3600)
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


@bp.app_context_processor
def _globals():
    return {"poll_ms": current_app.config["POLL_MS"]}
