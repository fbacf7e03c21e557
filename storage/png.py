"""PNG bytes that carry how they were made.

Two text chunks: ``parameters`` in AUTOMATIC1111's infotext format (its "PNG Info" tab, civitai
and most SD tools read it) and ``renderfarm`` with the job as JSON.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image, PngImagePlugin

from renderfarm.samplers import A1111_SAMPLERS
from renderfarm.schema import JobRequest, Mode

# A1111's infotext_utils: one "Key: value" pair, the value plain or a JSON-quoted string.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_INTS = ("Steps", "Seed")
_FLOATS = ("CFG scale", "Denoising strength")


def parameters_text(request: JobRequest, seed: int, model_hash: str | None = None,
                    lora_hashes: dict[str, str] | None = None) -> str:
    """The A1111 ``parameters`` text of one image of ``request``, rendered with ``seed``.
    ``model_hash``: the model's SHA-256 (worker/hashes.py), written as A1111's ``Model hash:``
    (its first 10 hex digits), which civitai and metadata readers match models by.

    The job's LoRAs are written as A1111 writes them: ``<lora:name:weight>`` tags at the end of
    the prompt (so the text pasted back in gives the same job), and ``lora_hashes`` (LoRA name
    -> A1111's LoRA hash, :func:`worker.hashes.addnet_hash`) as ``Lora hashes: "name: <first 12
    hex digits>, ..."``."""
    sampler, schedule = A1111_SAMPLERS[request.scheduler]
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": float(request.guidance_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
    }
    if model_hash:
        params["Model hash"] = model_hash[:10]
    params["Model"] = request.model
    if request.mode is Mode.img2img:
        params["Denoising strength"] = float(request.strength)
    hashed = [f"{lora.name}: {lora_hashes[lora.name][:12]}" for lora in request.loras
              if lora_hashes and lora_hashes.get(lora.name)]
    if hashed:
        params["Lora hashes"] = ", ".join(hashed)
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items())
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    tags = "".join(f" <lora:{lora.name}:{_number(lora.weight)}>" for lora in request.loras)
    return f"{request.prompt}{tags}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict:
    """Read A1111 ``parameters`` text back: prompt, negative prompt and each ``Key: value``.

    ``Steps`` and ``Seed`` become ints, ``CFG scale`` and ``Denoising strength`` floats; other
    values (``Size`` included, e.g. ``"512x512"``) stay strings.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's test for "this is the parameters line"
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = _unquote(value.strip())
        if key in _INTS:
            value = int(value)
        elif key in _FLOATS:
            value = float(value)
        out[key] = value
    return out


def encode_png(image: Image.Image, parameters: str, job: dict) -> bytes:
    """PNG bytes of ``image`` with the ``parameters`` and ``renderfarm`` (JSON) text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)  # tEXt, or iTXt when it is not Latin-1
    info.add_text("renderfarm", json.dumps(job))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_info(data: bytes) -> dict:
    """``{"parameters": str | None, "renderfarm": dict | None}`` read from PNG bytes.

    Only the chunks before the image data are read (where we and A1111 write them), so the
    pixels are never decoded.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"not a PNG image, got {image.format!r}")
        text = dict(image.info)
    parameters = text.get("parameters")
    job = text.get("renderfarm")
    return {
        "parameters": str(parameters) if parameters is not None else None,
        "renderfarm": json.loads(job) if job is not None else None,
    }


def _number(value: float) -> str:
    """``1`` for 1.0, else the float's shortest exact text (``0.8``, ``-0.25``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _quote(value: object) -> str:
    """A1111's ``quote``: JSON-quote values holding a comma, colon or newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
