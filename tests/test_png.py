"""PNG metadata: A1111's ``parameters`` text and our job JSON survive an encode/read."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from renderfarm.schema import JobRequest
from storage.png import A1111_SAMPLERS, encode_png, parameters_text, parse_parameters, read_png_info


def tiny_png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_parameters_text_matches_a1111_format():
    request = JobRequest(
        prompt="a red fox in snow, highly detailed",
        negative_prompt="blurry, lowres",
        model="tiny",
        steps=20,
        scheduler="euler_a",
        guidance_scale=7,
        seed=42,
    )
    assert parameters_text(request, 42) == (
        "a red fox in snow, highly detailed\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, "
        "Size: 512x512, Model: tiny"
    )


def test_parameters_text_without_negative_and_karras_img2img():
    request = JobRequest(
        mode="img2img", init_image=tiny_png_b64(), prompt="castle", model="sd15",
        scheduler="dpmpp_2m_karras", steps=30, guidance_scale=5.5, width=768, height=512,
        strength=0.6,
    )
    assert parameters_text(request, 7) == (
        "castle\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 7, "
        "Size: 768x512, Model: sd15, Denoising strength: 0.6"
    )


def test_every_scheduler_has_a_sampler_name():
    from renderfarm.schema import SCHEDULERS

    assert set(A1111_SAMPLERS) == set(SCHEDULERS)


@pytest.mark.parametrize(
    "prompt, negative",
    [("a cat", ""), ("a cat, on a mat: cute", "dogs, \"ugly\""), ("line one\nline two", "x\ny")],
)
def test_parse_parameters_round_trips(prompt: str, negative: str):
    request = JobRequest(prompt=prompt, negative_prompt=negative, model="tiny", steps=12)
    parsed = parse_parameters(parameters_text(request, 1234))
    assert parsed == {
        "prompt": prompt, "negative_prompt": negative, "Steps": 12, "Sampler": "Euler a",
        "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1234, "Size": "512x512",
        "Model": "tiny",
    }


def test_encode_then_read_back():
    request = JobRequest(prompt="ünïcödé prompt ✓", model="tiny", seed=5)
    job = {"id": "job-1", "request": request.model_dump(mode="json"), "seed": 5}
    text = parameters_text(request, 5)
    data = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)), text, job)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    info = read_png_info(data)
    assert info == {"parameters": text, "renderfarm": job}
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 64) and image.getpixel((0, 0)) == (10, 200, 30)


def test_read_png_info_without_our_chunks():
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    assert read_png_info(buf.getvalue()) == {"parameters": None, "renderfarm": None}


def test_parameters_text_writes_a1111s_model_hash_before_the_model():
    request = JobRequest(prompt="castle", model="sd15", steps=20, seed=1)
    sha256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    text = parameters_text(request, 1, model_hash=sha256)
    assert text.endswith("Size: 512x512, Model hash: 6ce0161689, Model: sd15")
    assert parse_parameters(text)["Model hash"] == "6ce0161689"
    assert "Model hash" not in parameters_text(request, 1)  # unknown: left out, as A1111 does


def test_parameters_text_writes_loras_as_a1111_does():
    """Tags back at the end of the prompt (pasting the text back gives the same job), and
    ``Lora hashes`` with the first 12 hex digits of each LoRA's A1111 hash, in job order."""
    request = JobRequest(prompt="castle <lora:ink:0.8>", model="tiny", steps=20, seed=1,
                         negative_prompt="fog", loras=[{"name": "sketch", "weight": -1}])
    hashes = {"ink": "a" * 64, "sketch": "0123456789abcdef" * 4}
    text = parameters_text(request, 1, lora_hashes=hashes)
    assert text.startswith("castle <lora:sketch:-1> <lora:ink:0.8>\nNegative prompt: fog\n")
    assert text.endswith('Model: tiny, Lora hashes: "sketch: 0123456789ab, ink: aaaaaaaaaaaa"')
    parsed = parse_parameters(text)
    assert parsed["Lora hashes"] == "sketch: 0123456789ab, ink: aaaaaaaaaaaa"
    again = JobRequest(prompt=parsed["prompt"], model="tiny")
    assert again.prompt == "castle" and again.loras == request.loras
    assert "Lora hashes" not in parameters_text(request, 1)  # not hashed: left out
