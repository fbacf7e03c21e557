"""Micro-batching on the tiny model, on the CPU: render_batch gives each job the images it gets
alone, split by max_batch; compat_key says which jobs may share a pipeline call."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from renderfarm.images import encode_init_image  # noqa: E402
from renderfarm.schema import JobRequest  # noqa: E402
from worker.compat import compat_key  # noqa: E402
from worker.pipelines import PipelineCache  # noqa: E402
from worker.profiles import Profile  # noqa: E402
from worker.render import render, render_batch  # noqa: E402

CPU = Profile("cpu", "cpu", torch.float32, max_batch=8)
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(models_dir) -> Path:
    """The session's tiny model (tests/conftest.py)."""
    return models_dir


@pytest.fixture(scope="module")
def cache(models) -> PipelineCache:
    return PipelineCache(models, CPU)


def job(**fields) -> JobRequest:
    values = {"prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
              "steps": 4, "seed": 42, "scheduler": "euler_a"}
    return JobRequest(**(values | fields))


def init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return encode_init_image(buffer.getvalue())


def count_calls(monkeypatch, pipe, images=lambda kwargs: len(kwargs["prompt"])) -> list[int]:
    """Record how many images each call of ``pipe``'s class renders (the call still runs)."""
    calls: list[int] = []
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):
        calls.append(images(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    return calls


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# Three jobs: other prompts, negative prompts (one empty), seeds and image counts.
JOBS = [
    dict(prompt="a red barn", seed=1, num_images=2),
    dict(prompt="a lighthouse at dusk, oil on canvas", negative_prompt="blurry", seed=900),
    dict(prompt="a cat", negative_prompt="dog, text", seed=7, num_images=3),
]


def test_each_image_equals_its_unbatched_render(cache, capsys):
    requests = [job(**fields) for fields in JOBS]
    seen: list[tuple[int, int]] = []
    batched = render_batch(cache, requests, on_step=lambda i, n: seen.append((i, n)))
    assert [len(images) for images in batched] == [2, 1, 3]
    worst = 0
    for request, images in zip(requests, batched, strict=True):
        alone = render(cache, request)
        for a, b in zip(images, alone, strict=True):
            assert a.size == (64, 64)
            worst = max(worst, max_diff(a, b))
    with capsys.disabled():
        print(f"\nrender_batch vs render: max abs pixel difference {worst} (of 255)")
    assert worst <= 2
    assert seen == [(i, 4) for i in range(1, 5)]  # 6 images, max_batch 8: one call
    # and the jobs did differ
    assert max_diff(batched[0][0], batched[2][0]) > 10


def test_chunks_by_max_batch(models, cache):
    requests = [job(**fields) for fields in JOBS]
    whole = render_batch(cache, requests)
    small = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=4))
    seen: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        calls = count_calls(mp, small.get("tiny"))
        split = render_batch(small, requests, on_step=lambda i, n: seen.append((i, n)))
    assert calls == [4, 2]  # 6 images, 4 at a time; job 2's images span both calls
    assert seen == [(i, 8) for i in range(1, 9)]
    for a_images, b_images in zip(whole, split, strict=True):
        for a, b in zip(a_images, b_images, strict=True):
            assert max_diff(a, b) <= 2


def test_compiled_profile_pads_calls_to_a_warmed_batch_size(models):
    profile = Profile("cpu", "cpu", torch.float32, max_batch=8, compile=True)
    assert profile.batch_buckets() == (1, 2, 4, 8)
    padded = PipelineCache(models, profile)
    assert [padded.batch_size_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    plain = PipelineCache(models, CPU)
    assert [plain.batch_size_for(n) for n in (1, 3, 5)] == [1, 3, 5]


def memory_bound(images: float) -> int:
    """bytes_per_pixel at which this machine's available memory holds ``images`` 64x64 images
    (2.5: floor 2, with room for the reading to move by 20% between calls)."""
    from worker.memory import available_memory

    available = available_memory("cpu")
    assert available and available > 2**28
    return int(available / (64 * 64 * images))


def test_call_size_follows_available_memory_and_image_size(models):
    bpp = memory_bound(2.5)
    tight = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=4,
                                          bytes_per_pixel=bpp))
    assert tight.call_size(64, 64) == 2
    assert tight.call_size(64, 32) == 4  # half the pixels: 5 fit, max_batch is 4
    assert tight.call_size(128, 128) == 1  # none fits: one at a time, never zero
    # with a compiled UNet, the largest warmed batch size that fits (buckets 1, 2, 4, 8)
    compiled = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=8,
                                             compile=True, bytes_per_pixel=memory_bound(3.5)))
    assert compiled.call_size(64, 64) == 2
    assert compiled.call_size(32, 32) == 8

    requests = [job(seed=s) for s in (1, 2, 3)]
    with pytest.MonkeyPatch.context() as mp:
        calls = count_calls(mp, tight.get("tiny"))
        split = render_batch(tight, requests)
    assert calls == [2, 1]
    for request, images in zip(requests, split, strict=True):
        assert max_diff(images[0], render(tight, request)[0]) <= 2


def test_img2img_chunks_by_call_size_and_pads_for_a_compiled_unet(models, monkeypatch):
    tight = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=4,
                                          bytes_per_pixel=memory_bound(2.5)))
    request = job(mode="img2img", init_image=init_image(), strength=0.5, num_images=3, seed=9)
    calls = count_calls(monkeypatch, tight.get("tiny", "img2img"),
                        images=lambda kwargs: kwargs["num_images_per_prompt"])
    split = render(tight, request)
    monkeypatch.setattr(PipelineCache, "batch_size_for", lambda self, n: 4)  # as if compiled
    monkeypatch.setattr(PipelineCache, "call_size", lambda self, w, h, model=None: 4)
    padded = render(tight, request)
    assert calls == [2, 1, 4]
    assert len(split) == len(padded) == 3
    assert max(max_diff(a, b) for a, b in zip(split, padded, strict=True)) <= 2


def test_padding_throws_the_extra_images_away(models, cache, monkeypatch):
    monkeypatch.setattr(PipelineCache, "batch_size_for", lambda self, n: 4)
    requests = [job(seed=3, num_images=3)]
    padded = render_batch(cache, requests)
    monkeypatch.undo()
    plain = render_batch(cache, requests)
    assert len(padded[0]) == 3
    assert max(max_diff(a, b) for a, b in zip(padded[0], plain[0], strict=True)) <= 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("width", 96), ("height", 128), ("steps", 5), ("scheduler", "ddim"),
     ("guidance_scale", 3.5), ("model", "other")],
)
def test_incompatible_requests_are_refused(cache, field, value):
    with pytest.raises(ValueError, match=rf"requests\[1\] cannot share .*{field}"):
        render_batch(cache, [job(), job(**{field: value})])
    assert compat_key(job()) != compat_key(job(**{field: value}))


def test_img2img_is_never_batched(cache):
    image = init_image()
    a = job(mode="img2img", init_image=image)
    b = job(mode="img2img", init_image=image)
    with pytest.raises(ValueError, match=r"requests\[0\] has mode 'img2img'"):
        render_batch(cache, [a, b])
    assert compat_key(a) != compat_key(b)
    assert compat_key(a, "job-1") == compat_key(a, "job-1") == "img2img:job-1"
    assert compat_key(a, "job-1") != compat_key(b, "job-2")


def test_unseeded_and_empty_batches(cache):
    with pytest.raises(ValueError, match="seed must be set"):
        render_batch(cache, [job(seed=None)])
    assert render_batch(cache, []) == []


def test_compat_key_is_stable_and_ignores_per_image_fields():
    key = compat_key(job())
    assert key == "txt2img:tiny:64x64:4:euler_a:7.0"
    same = job(prompt="other", negative_prompt="x", seed=9, num_images=3, priority=1,
               batch_id="b1", idempotency_key="k")
    assert compat_key(same) == key
    assert compat_key(job(guidance_scale=7)) == compat_key(job(guidance_scale=7.0))


def test_compat_needs_no_torch():
    code = ("import sys; import worker.compat; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
