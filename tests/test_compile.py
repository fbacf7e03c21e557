"""torch.compile of the UNet, on the CPU with real dynamo: a warmed-up worker never compiles again.

The GPU profile compiles with inductor; these tests run the same ``_compile_unet`` with dynamo's
``eager`` backend (dynamo traces the UNet and guards on its inputs exactly as for inductor, but
generates no code, so a test takes seconds), and once with inductor itself on the CPU.
``counters["stats"]["unique_graphs"]`` counts the graphs dynamo has compiled in this process.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from renderfarm.images import encode_init_image  # noqa: E402
from renderfarm.schema import JobRequest, Mode  # noqa: E402
from worker.pipelines import PipelineCache  # noqa: E402
from worker.profiles import Profile  # noqa: E402
from worker.render import render, render_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = ((64, 64),)


def job(**fields) -> JobRequest:
    values = {"prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
              "steps": 3, "seed": 42, "scheduler": "euler"}
    return JobRequest(**(values | fields))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def compiled_profile(**fields) -> Profile:
    values = {"compile": True, "compile_backend": "eager", "warmup_sizes": SIZE, "max_batch": 4}
    return Profile("cpu", "cpu", torch.float32, **(values | fields))


def test_warmup_compiles_one_static_graph_per_batch_bucket(models_dir):
    cache = PipelineCache(models_dir, compiled_profile())
    pipe = cache.get("tiny", Mode.txt2img)
    assert hasattr(pipe.unet, "renderfarm_compiled")
    before = graphs()
    timings = cache.warmup("tiny")
    assert list(timings) == ["64x64x1", "64x64x2", "64x64x4"]
    # Three shapes, three graphs: with dynamo's default (dynamic=None) the second shape would
    # have made the batch dimension symbolic and the third would have compiled nothing.
    assert graphs() - before == 3


def test_no_recompile_after_warmup_for_any_scheduler_batch_or_mode(models_dir):
    cache = PipelineCache(models_dir, compiled_profile())
    cache.warmup("tiny")  # with euler: float timesteps
    warmed = graphs()
    # ddim, pndm, dpmpp_2m and unipc give int64 timesteps, euler_a float ones; 3 images are
    # padded to the warmed batch of 4, two 1-image jobs run as a batch of 2.
    for scheduler in ("ddim", "pndm", "dpmpp_2m", "unipc", "euler_a"):
        images = render(cache, job(num_images=3, scheduler=scheduler))
        assert [im.size for im in images] == [(64, 64)] * 3
    together = render_batch(cache, [job(seed=1, scheduler="ddim"), job(seed=2, scheduler="ddim")])
    assert [len(images) for images in together] == [1, 1]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    init = encode_init_image(buffer.getvalue())
    for images in (1, 3):  # 3: padded to 4, as txt2img
        render(cache, job(mode="img2img", init_image=init, steps=6, strength=0.5,
                          scheduler="ddim", num_images=images))
    assert graphs() == warmed


def test_compiled_renders_equal_eager_renders(models_dir):
    eager = PipelineCache(models_dir, Profile("cpu", "cpu", torch.float32))
    compiled = PipelineCache(models_dir, compiled_profile(max_batch=1))
    for scheduler in ("euler", "ddim"):  # float and int timesteps
        a = render(eager, job(seed=7, scheduler=scheduler))[0]
        b = render(compiled, job(seed=7, scheduler=scheduler))[0]
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_padded_compiled_call_equals_unpadded_eager_call(models_dir):
    """3 images on a UNet compiled for batches of 1, 2 and 4 run as one call padded to 4 (the
    extra image thrown away); the same 3 images eagerly, unpadded, in one call of 3: the same
    pixels, image for image (seed, seed+1, seed+2), within rounding."""
    eager = PipelineCache(models_dir, Profile("cpu", "cpu", torch.float32, max_batch=4))
    compiled = PipelineCache(models_dir, compiled_profile())
    assert compiled.call_size(64, 64, "tiny") == 4 and compiled.batch_size_for(3) == 4
    assert eager.call_size(64, 64, "tiny") == 4 and eager.batch_size_for(3) == 3
    a = render(eager, job(seed=11, num_images=3))
    b = render(compiled, job(seed=11, num_images=3))
    assert len(a) == len(b) == 3
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.abs(pixels(x) - pixels(y)).max() <= 1, k
    assert np.abs(pixels(a[0]) - pixels(a[1])).max() > 10  # three different images


def test_inductor_compiles_the_unet_on_the_cpu(models_dir):
    """The real code generator, once: one shape (about a minute on two cores), then a job of
    that shape with another scheduler renders from the compiled graph, equal to eager."""
    profile = compiled_profile(compile_backend="inductor", compile_mode="default", max_batch=1,
                               channels_last=True)
    compiled = PipelineCache(models_dir, profile)
    before = graphs()
    compiled.warmup("tiny", steps=2)
    assert graphs() - before == 1
    image = render(compiled, job(seed=5, scheduler="ddim"))[0]
    assert graphs() - before == 1
    eager = PipelineCache(models_dir, Profile("cpu", "cpu", torch.float32))
    reference = render(eager, job(seed=5, scheduler="ddim"))[0]
    assert np.abs(pixels(image) - pixels(reference)).max() <= 2


def test_compile_with_cpu_offload_is_refused():
    with pytest.raises(ValueError, match="compile and cpu_offload cannot be combined"):
        Profile("gpu", "cuda", torch.float16, compile=True, cpu_offload=True)
