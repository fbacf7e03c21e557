"""The job contract: one set of pydantic models shared by the client, the worker and the dashboard.

``JobRequest`` is what a user asks for; ``JobRecord`` and ``BatchRecord`` are what the farm
keeps in Redis about it. Bounds are checked here, before anything is enqueued.
"""

from __future__ import annotations

import os
import re
import time
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from renderfarm.errors import FieldError, InvalidJob
from renderfarm.samplers import from_a1111

SCHEDULERS = (
    "euler",
    "euler_a",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "pndm",
    "lms",
    "unipc",
    "heun",
    "flow_match_euler",
)
# Which of them a model takes is its family's (worker/families): flow_match_euler is the
# flow-matching Euler scheduler of Flux, and Flux's only one.
SchedulerName = Literal[
    "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "lms", "unipc", "heun",
    "flow_match_euler",
]
HardwareClass = Literal["any", "gpu", "cpu", "jetson", "mps"]
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BATCH_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: A batch id: it names Redis keys and storage prefixes, so no "/", ":" or "..".
BatchId = Annotated[str, Field(pattern=BATCH_ID_PATTERN)]
MAX_SEED = 2**32 - 1
MAX_PROMPT = 2000
#: A LoRA is named by its file's stem in ``<models dir>/loras/``. No ``:``, ``<``, ``>`` or
#: ``,`` (they would break the ``<lora:name:weight>`` tag and the infotext's ``Lora hashes``).
#: Letters and digits of any script (``\w``), as civitai's file names have them.
LORA_NAME_PATTERN = r"^\w[\w.()+ -]{0,127}$"
MAX_LORAS = 8
LORA_WEIGHT_LIMIT = 10.0
#: AUTOMATIC1111's extra-network prompt tag for LoRAs (``lyco`` is its alias since A1111 1.5):
#: ``<lora:name>`` or ``<lora:name:weight>``. The spaces before a tag go with it.
LORA_TAG = re.compile(r"[ \t]*<(?:lora|lyco):([^>]*)>")


class Mode(str, Enum):
    txt2img = "txt2img"
    img2img = "img2img"


class JobState(str, Enum):
    """Where a job is. Terminal: ``succeeded``, ``failed``, ``cancelled``."""

    queued = "queued"  #: accepted, waiting for a worker
    started = "started"  #: a worker claimed it and is loading the model
    rendering = "rendering"  #: denoising; the record has step i of n
    uploading = "uploading"  #: images rendered, being stored
    succeeded = "succeeded"  #: every image is stored
    failed = "failed"  #: ended with an error; ``error`` says why
    cancelled = "cancelled"  #: cancelled by a user; no images stored

    def __str__(self) -> str:  # print(record.state) -> "queued", as in the records and API
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
RUNNING_STATES = frozenset({JobState.started, JobState.rendering, JobState.uploading})


class LoraRef(BaseModel):
    """One LoRA of a job: ``name`` is the file stem in ``<models dir>/loras/``, ``weight`` its
    multiplier (A1111's; 0 leaves the model as it is, negative weights are allowed)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LORA_NAME_PATTERN)
    weight: float = Field(1.0, ge=-LORA_WEIGHT_LIMIT, le=LORA_WEIGHT_LIMIT)


def split_lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """``prompt`` without its ``<lora:name:weight>`` tags, and the LoRAs they name, in order.

    The weight is optional (1.0). The prompt is stripped when it held a tag, so
    ``"a cat <lora:ink:0.8>"`` and ``"a cat"`` with ``loras=[{"name": "ink", "weight": 0.8}]``
    are the same job. A1111's other tag arguments (a separate text-encoder / UNet weight,
    ``dyn``) are not supported: ``ValueError`` names the tag.
    """
    loras = []
    for match in LORA_TAG.finditer(prompt):
        tag = match.group(0).strip()
        name, *args = (part.strip() for part in match.group(1).split(":"))
        if not name:
            raise ValueError(f"has a tag {tag} without a LoRA name (use <lora:name:weight>)")
        if len(args) > 1 or any("=" in a for a in args):
            raise ValueError(f"has a tag {tag} with more than a name and one weight "
                             "(separate text-encoder/UNet weights are not supported)")
        weight: Any = 1.0
        if args and not args[0]:
            raise ValueError(f"has a tag {tag} with no weight after its ':' (write "
                             f"<lora:{name}:0.8>, or <lora:{name}> for 1)")
        if args:
            try:
                weight = float(args[0])
            except ValueError:
                raise ValueError(f"has a tag {tag} whose weight {args[0]!r} is not a "
                                 "number") from None
        loras.append({"name": name, "weight": weight})
    if not loras:
        return prompt, []
    return LORA_TAG.sub("", prompt).strip(), loras


class JobRequest(BaseModel):
    """One prompt job. Image ``k`` of the job is rendered with seed ``seed + k``."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    mode: Mode = Mode.txt2img
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="A model the farm has.")
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0, le=30)
    scheduler: SchedulerName = "euler_a"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: a random seed, recorded.")
    num_images: int = Field(1, ge=1, le=16, description="Images rendered by this job.")
    init_image: str | None = Field(
        None, description="img2img: the init image, base64 PNG/JPEG/WebP (a data: URL is fine)."
    )
    strength: float = Field(0.75, ge=0, le=1, description="img2img: how much to change the image.")
    priority: int = Field(5, ge=0, le=9, description="Higher runs first within a queue.")
    hardware: HardwareClass = "any"
    batch_id: BatchId | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    webhook_url: str | None = Field(
        None, max_length=2000, description="POST this job's end (job.succeeded, job.failed, "
        "job.cancelled) here, signed (Standard Webhooks). Default: its batch's webhook_url.",
    )
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=MAX_LORAS,
        description="LoRAs applied to the model, by file stem in <models dir>/loras/; a prompt's "
        "<lora:name:weight> tags are moved here at validation.",
    )

    @model_validator(mode="before")
    @classmethod
    def _move_lora_tags(cls, data: Any) -> Any:
        """Move the prompt's ``<lora:...>`` tags into ``loras`` (after the field's own), so a
        tag and the field give the same record whichever way a job came in. A prompt whose
        tags do not parse, or that is only tags, is left as it is for ``prompt``'s own
        validator to refuse, naming the field."""
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            return data
        try:
            prompt, tagged = split_lora_tags(data["prompt"])
        except ValueError:
            return data
        loras = data.get("loras") or []
        if not tagged or not prompt.strip() or not isinstance(loras, list):
            return data
        return {**data, "prompt": prompt, "loras": [*loras, *tagged]}

    #: The A1111 sampler name the job gave as ``scheduler`` (``"Euler"``), if it gave one: on
    #: some families it means another scheduler than on SD (Flux: its flow-matching Euler),
    #: and the family is known only where the job meets its model
    #: (:func:`worker.families.with_family_defaults`).
    _sampler_name: str | None = PrivateAttr(default=None)

    @property
    def sampler_name(self) -> str | None:
        return self._sampler_name

    @model_validator(mode="wrap")
    @classmethod
    def _keep_sampler_name(cls, data: Any, handler: Any) -> Any:
        request = handler(data)
        given = data.get("scheduler") if isinstance(data, dict) else None
        if isinstance(given, str) and given not in SCHEDULERS:
            request._sampler_name = given
        return request

    @field_validator("scheduler", mode="before")
    @classmethod
    def _a1111_sampler_name(cls, value: Any) -> Any:
        """A1111's sampler names are accepted too (``"Euler a"``, ``"DPM++ 2M Karras"``) and
        recorded as the farm's (renderfarm/samplers.py has the table)."""
        if not isinstance(value, str) or value in SCHEDULERS:
            return value
        try:
            return from_a1111(value)
        except ValueError:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)} or an A1111 sampler name "
                             "(Euler a, Euler, DDIM, DPM++ 2M, DPM++ 2M Karras, PLMS, LMS, "
                             "UniPC, Heun)") from None

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_webhook_url(value)
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        prompt, _ = split_lora_tags(value)  # raises ValueError naming a bad tag
        if not prompt.strip():
            raise ValueError("is only <lora:...> tags: it needs some text too")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _no_lora_tags(cls, value: str) -> str:
        match = LORA_TAG.search(value)
        if match:
            raise ValueError(f"has a tag {match.group(0).strip()}: LoRA tags are read from "
                             "prompt only (or give them in loras)")
        return value

    @field_validator("loras")
    @classmethod
    def _loras_named_once(cls, value: list[LoraRef]) -> list[LoraRef]:
        names = [lora.name for lora in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"names LoRA {twice[0]!r} more than once (a prompt tag and the "
                             "field count alike)")
        return value

    @field_validator("init_image")
    @classmethod
    def _init_image_decodes(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Records read back from Redis were checked at submit: don't decode the image again.
        if value is not None and not (info.context or {}).get("trusted"):
            from renderfarm.images import check_init_image

            check_init_image(value)  # raises ValueError with the reason; once per image
        return value

    @model_validator(mode="after")
    def _mode_matches_init_image(self) -> JobRequest:
        if self.mode is Mode.img2img and self.init_image is None:
            raise ValueError("init_image is required when mode is img2img")
        if self.mode is Mode.txt2img and self.init_image is not None:
            raise ValueError("init_image is only used when mode is img2img")
        return self

    def seeds(self) -> list[int]:
        """The seed of each image; only meaningful once ``seed`` is set."""
        assert self.seed is not None, "seed is resolved at submit time"
        return [(self.seed + k) % (MAX_SEED + 1) for k in range(self.num_images)]


def check_webhook_url(value: str) -> str:
    """A webhook target must be an absolute http:// or https:// URL with a host; ValueError
    saying why not. (Where it may point is checked against DNS by renderfarm/webhook_targets.)"""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password (the signature authenticates)")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain whitespace or control characters")
    return value


class ImageResult(BaseModel):
    key: str
    seed: int
    width: int
    height: int
    url: str | None = None


class JobRecord(BaseModel):
    """What the farm knows about a job; stored as a Redis hash, read by client and dashboard."""

    id: str
    batch_id: BatchId
    state: JobState
    request: JobRequest
    created_at: float
    timestamps: dict[str, float] = Field(default_factory=dict, description="state -> time entered")
    worker: str | None = None
    attempts: int = 0
    step: int = 0
    steps_total: int = 0
    progressed_at: float | None = Field(
        None, description="When the worker last recorded progress (``step``), by Redis' clock; "
        "``timestamps`` keep when each state was entered.")
    results: list[ImageResult] = Field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    queue: str = Field("", description="The Celery queue the job was sent to.")
    compat: str = Field("", description="Jobs with equal keys may share a pipeline call.")
    retrying: str | None = Field(
        None, description="Why storing is being retried (storage unreachable), while it is.")
    history: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Earlier attempts (retried, or their worker lost): each one's timestamps, "
        "state, worker and error. ``timestamps`` is the current attempt's alone.")

    @property
    def terminal(self) -> bool:
        return self.state.terminal


#: The longest batch label taken (CLI --label, the API's and the form's "label").
MAX_LABEL = 200


class BatchRecord(BaseModel):
    id: str
    created_at: float
    total: int
    counts: dict[JobState, int] = Field(default_factory=dict)
    label: str = ""
    plot: dict[str, Any] | None = Field(
        None, description="A plot's definition (renderfarm/plots.py): base job, axes, cells.")
    grids: list[dict[str, Any]] = Field(
        default_factory=list, description="A plot's grid images: [{key, z}], once drawn; "
        "empty again from a retry of a cell until the new grid is stored.")
    grid_state: Literal["waiting", "drawn", "redrawing"] | None = Field(
        None, description="A plot's grid: waiting (not drawn yet), drawn (``grids`` lists "
        "it), redrawing (a cell was retried after it was drawn: the old grid is no longer "
        "listed, the new one is drawn once every cell has ended). None for other batches.")
    prompt: str = Field("", description="The first job's prompt.")
    started_at: float | None = Field(None, description="When its first job started.")
    ended_at: float | None = Field(None, description="When a job of it last ended.")
    images: int = Field(0, description="Images stored by its succeeded jobs.")
    thumb: str = Field("", description="Storage key of its first stored image.")
    webhook_url: str | None = None
    webhooks: dict[str, int] = Field(
        default_factory=dict, description="Webhook deliveries of the batch and its jobs by "
        "status: pending, delivered, failed.")
    paused: bool = False  #: its queued jobs wait for a resume (Records.pause)

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATES)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


#: Test hook: pretend this host's clock is off by this many seconds (``RENDERFARM_CLOCK_SKEW``),
#: to check that leases use Redis' clock and never a host's (tests/test_lost_work.py).
CLOCK_SKEW = float(os.environ.get("RENDERFARM_CLOCK_SKEW") or 0)


def now() -> float:
    """This host's clock. Leases and job timestamps use Redis' (``Records.clock``) instead."""
    return time.time() + CLOCK_SKEW


_MESSAGES = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "string_too_long": "must be at most {max_length} characters",
    "string_too_short": "must be at least {min_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "extra_forbidden": "is not a known field",
    "missing": "is required",
}


#: A1111 request fields and what the native API calls them: a body written for A1111 is told
#: where its fields go (or to use /sdapi/v1, which takes A1111's bodies as they are).
A1111_FIELDS = {
    "cfg_scale": "guidance_scale",
    "sampler_name": "scheduler",
    "sampler_index": "scheduler",
    "denoising_strength": "strength",
    "init_images": "init_image",
    "batch_size": "num_images",
    "n_iter": "num_images",
    "override_settings": "model",
}


def field_errors(exc: ValidationError, index: int | None = None) -> list[FieldError]:
    """Turn pydantic's errors into ones that name the field and the value."""
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "job"
        template = _MESSAGES.get(err["type"])
        if template:
            message = template.format(**(err.get("ctx") or {}))
        elif err["type"] == "value_error":
            message = str(err["ctx"]["error"]) if err.get("ctx") else err["msg"]
        else:
            message = err["msg"][0].lower() + err["msg"][1:]
        value = err.get("input")
        if err["type"] == "extra_forbidden" and field in A1111_FIELDS:
            message += (f" (A1111's name: here it is {A1111_FIELDS[field]}; A1111 request bodies "
                        "go to /sdapi/v1/txt2img and /sdapi/v1/img2img as they are)")
        if field == "job" and isinstance(value, dict):
            field, message, value = _field_of_model_error(message, value)
        out.append(FieldError(field, message, value, index))
    return out


def _field_of_model_error(message: str, data: dict) -> tuple[str, str, Any]:
    """Cross-field errors read "<field> <message>": split them into field and message."""
    for name in ("init_image", "mode"):
        if message.startswith(name + " "):
            return name, message[len(name) + 1 :], data.get(name)
    return "job", message, None


def parse_batch_id(value: object) -> str:
    """Validate a batch id given apart from the jobs (``submit_batch(batch_id=...)``) with the
    same rule as ``JobRequest.batch_id``; :class:`InvalidJob` naming ``batch_id`` otherwise."""
    try:
        return _BATCH_ID.validate_python(value)
    except ValidationError as exc:
        errors = field_errors(exc)
        for error in errors:
            error.field = "batch_id"
        raise InvalidJob(errors) from None


_BATCH_ID = TypeAdapter(BatchId)
M = TypeVar("M", bound=BaseModel)


def updated(model: M, **fields: Any) -> M:
    """A copy of ``model`` with ``fields`` changed, validated again: ``model_copy(update=...)``
    does not validate, and a value it lets through poisons every later read of the record.
    (An init image, checked at submit, is not decoded again.)"""
    return type(model).model_validate({**dict(model), **fields}, context={"trusted": True})


def parse_job(data: dict | JobRequest, index: int | None = None) -> JobRequest:
    """Validate one job; raise :class:`InvalidJob` naming each bad field and its value."""
    sampler_name = None
    if isinstance(data, JobRequest):
        sampler_name = data.sampler_name
        data = data.model_dump(exclude_unset=True)
    if not isinstance(data, dict):
        raise InvalidJob([FieldError("job", "must be an object", data, index)])
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(field_errors(exc, index)) from None
    if sampler_name is not None:
        request._sampler_name = sampler_name
    return request
