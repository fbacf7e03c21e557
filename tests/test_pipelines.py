"""Real diffusers pipelines on the tiny model, on the CPU: cache, schedulers, seeds, progress."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from renderfarm.errors import Cancelled  # noqa: E402
from renderfarm.images import encode_init_image  # noqa: E402
from renderfarm.schema import JobRequest, Mode  # noqa: E402
from renderfarm.settings import Settings  # noqa: E402
from worker.families import FAMILIES  # noqa: E402
from worker.modelgen import make_model  # noqa: E402
from worker.pipelines import PipelineCache, UnknownModel, set_scheduler  # noqa: E402
from worker.profiles import Profile, apply_settings, detect_profile  # noqa: E402
from worker.render import render  # noqa: E402

CPU = Profile("cpu", "cpu", torch.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Three copies of the tiny model: tiny, tiny2, tiny3."""
    directory = tmp_path_factory.mktemp("models")
    make_model("tiny", directory / "tiny")
    for name in ("tiny2", "tiny3"):
        shutil.copytree(directory / "tiny", directory / name)
    return directory


@pytest.fixture(scope="module")
def cache(models) -> PipelineCache:
    return PipelineCache(models, CPU, max_models=2)


def job(**fields) -> JobRequest:
    values = {
        "prompt": "a lighthouse at dusk",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 42,
        "scheduler": "euler_a",
    }
    return JobRequest(**(values | fields))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64), (72, 128)])
def test_txt2img_returns_images_of_the_requested_size(cache, width, height):
    images = render(cache, job(width=width, height=height, num_images=2))
    assert [im.size for im in images] == [(width, height)] * 2
    assert all(im.mode == "RGB" for im in images)


def test_same_seed_same_pixels_other_seed_other_pixels(cache):
    first, again, other = (render(cache, job(seed=s))[0] for s in (7, 7, 8))
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1


def test_image_k_is_the_image_of_seed_plus_k(cache):
    pair = render(cache, job(seed=42, num_images=2, negative_prompt="blurry"))
    alone = render(cache, job(seed=43, num_images=1, negative_prompt="blurry"))
    assert np.abs(pixels(pair[1]) - pixels(alone[0])).max() <= 2
    assert np.abs(pixels(pair[0]) - pixels(pair[1])).mean() > 1


def test_batches_split_by_max_batch_give_the_same_images(models, cache):
    whole = render(cache, job(num_images=3, seed=5))
    steps: list[tuple[int, int]] = []
    small = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=2))
    split = render(small, job(num_images=3, seed=5), on_step=lambda i, n: steps.append((i, n)))
    for a, b in zip(whole, split, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    assert steps == [(i, 8) for i in range(1, 9)]  # two calls of 4 steps


@pytest.mark.parametrize("name", FAMILIES["sd15"].schedulers)
def test_every_scheduler_renders_without_reloading(cache, name):
    cache.get("tiny", Mode.txt2img)
    loads = cache.loads
    seen: list[tuple[int, int]] = []
    images = render(cache, job(scheduler=name, steps=3), on_step=lambda i, n: seen.append((i, n)))
    assert images[0].size == (64, 64)
    assert pixels(images[0]).std() > 0  # its pixels: test_each_scheduler_matches_diffusers
    assert cache.loads == loads
    total = seen[-1][1]
    assert seen == [(i, total) for i in range(1, total + 1)]
    # Model calls: Heun makes 2 a step (1 for the last), PNDM (PLMS) 1 extra at the start.
    assert total == {"heun": 5, "pndm": 4}.get(name, 3)


#: Each scheduler name as diffusers' docs map A1111's samplers ("Schedulers" overview), written
#: out here apart from worker/pipelines.py: class name and the options it is made with.
DIFFUSERS_SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


@pytest.fixture(scope="module")
def reference_pipe(models):
    """diffusers' own pipeline of the tiny model, loaded apart from the worker's cache."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(models / "tiny", torch_dtype=torch.float32)
    return pipe, pipe.scheduler.config  # each scheduler is made from the model's own config


@pytest.mark.parametrize("name", FAMILIES["sd15"].schedulers)
def test_each_scheduler_matches_diffusers_own_pipeline(cache, reference_pipe, name):
    """Same model, seed and scheduler: the worker's render gives diffusers' own pixels."""
    import diffusers

    if name == "lms":
        pytest.importorskip("scipy", reason="diffusers' own LMS scheduler needs scipy")
    class_name, options = DIFFUSERS_SAMPLERS[name]
    pipe, config = reference_pipe
    pipe.scheduler = getattr(diffusers, class_name).from_config(config, **options)
    request = job(scheduler=name, steps=3, seed=1234, negative_prompt="fog")
    [ours] = render(cache, request)
    with torch.inference_mode():
        [theirs] = pipe(
            prompt=request.prompt, negative_prompt=request.negative_prompt,
            width=request.width, height=request.height, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(1234)], output_type="pil").images
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2, name


def test_set_scheduler_reuses_instances_and_starts_from_the_models_config(cache):
    pipe = cache.get("tiny", Mode.txt2img)
    loads = cache.loads
    set_scheduler(pipe, "dpmpp_2m_karras")
    karras = pipe.scheduler
    assert karras.config.use_karras_sigmas is True
    set_scheduler(pipe, "euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.use_karras_sigmas is False  # not inherited from the last one
    set_scheduler(pipe, "dpmpp_2m_karras")
    assert pipe.scheduler is karras
    with pytest.raises(ValueError, match="scheduler must be one of .*got 'k_dpm'"):
        set_scheduler(pipe, "k_dpm")
    assert cache.loads == loads


def test_img2img_shares_weights_and_reports_every_step(cache):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 48), (200, 40, 40)).save(buffer, format="PNG")
    init = encode_init_image(buffer.getvalue())
    txt2img = cache.get("tiny", Mode.txt2img)
    loads = cache.loads
    seen: list[tuple[int, int]] = []
    request = job(mode="img2img", init_image=init, steps=10, strength=0.5, scheduler="ddim")
    images = render(cache, request, on_step=lambda i, n: seen.append((i, n)))
    assert images[0].size == (64, 64)
    assert seen == [(i, 5) for i in range(1, 6)]
    assert cache.get("tiny", Mode.img2img).unet is txt2img.unet
    assert cache.loads == loads
    with pytest.raises(ValueError, match="strength 0.05 of 10 steps runs no denoising step"):
        render(cache, job(mode="img2img", init_image=init, steps=10, strength=0.05))


@pytest.mark.parametrize("fmt, options", [("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})])
def test_jpeg_and_webp_init_images(cache, fmt, options):
    """The README accepts PNG, JPEG and WebP init images: each is decoded as Pillow reads the
    file and renders; a lossless WebP renders the very pixels its PNG twin does."""
    source = Image.merge("RGB", [Image.linear_gradient("L").resize((64, 64)),
                                 Image.linear_gradient("L").rotate(90).resize((64, 64)),
                                 Image.new("L", (64, 64), 90)])
    encoded = {}
    for name, kwargs in (("PNG", {}), (fmt, options)):
        buffer = io.BytesIO()
        source.save(buffer, format=name, **kwargs)
        encoded[name] = buffer.getvalue()
    from renderfarm.images import decode_init_image

    decoded = decode_init_image(encode_init_image(encoded[fmt]))
    assert np.array_equal(pixels(decoded.convert("RGB")),
                          pixels(Image.open(io.BytesIO(encoded[fmt])).convert("RGB")))
    renders = {name: render(cache, job(mode="img2img", init_image=encode_init_image(data),
                                       steps=4, strength=0.5, scheduler="ddim"))[0]
               for name, data in encoded.items()}
    assert renders[fmt].size == (64, 64)
    if fmt == "WEBP":
        assert np.array_equal(pixels(renders["WEBP"]), pixels(renders["PNG"]))


def test_img2img_keeps_the_models_dtype(models):
    half = PipelineCache(models, Profile("cpu", "cpu", torch.bfloat16))
    txt2img = half.get("tiny", Mode.txt2img)
    img2img = half.get("tiny", Mode.img2img)
    assert txt2img.unet.dtype == img2img.unet.dtype == torch.bfloat16


def test_cancel_stops_the_render_at_that_step(cache):
    seen: list[int] = []

    def on_step(i: int, n: int) -> None:
        seen.append(i)
        if i == 3:
            raise Cancelled("job cancelled")

    with pytest.raises(Cancelled):
        render(cache, job(steps=20), on_step=on_step)
    assert seen == [1, 2, 3]


def test_lru_keeps_max_models_and_evicts_the_least_recently_used(models):
    cache = PipelineCache(models, CPU, max_models=2)
    for name in ("tiny", "tiny2", "tiny", "tiny3"):
        cache.get(name, Mode.txt2img)
    assert cache.loaded() == ["tiny", "tiny3"]  # tiny2 was least recently used
    assert cache.loads == 3
    cache.get("tiny", Mode.img2img)
    assert cache.loads == 3 and cache.loaded() == ["tiny3", "tiny"]
    cache.get("tiny2", Mode.txt2img)
    assert cache.loaded() == ["tiny", "tiny2"] and cache.loads == 4


def test_unknown_model_names_it_and_the_models_present(cache):
    with pytest.raises(UnknownModel, match=r"'nope' is not in .*present: tiny, tiny2, tiny3"):
        cache.get("nope", Mode.txt2img)


def test_too_many_pixels_for_the_profile_is_refused(models):
    small = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_pixels=64 * 64))
    with pytest.raises(ValueError, match=r"96x64 = 6144 pixels, over the 4096"):
        render(small, job(width=96, height=64))
    assert small.loads == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_profile_is_cpu_here_and_gpu_is_refused():
    profile = detect_profile()
    assert (profile.name, profile.device, profile.dtype) == ("cpu", "cpu", torch.float32)
    assert detect_profile("cpu") == profile
    with pytest.raises(RuntimeError, match="profile 'gpu' needs CUDA"):
        detect_profile("gpu")
    with pytest.raises(ValueError, match="got 'tpu'"):
        detect_profile("tpu")


# -- the fast path: SDPA, channels_last, torch.compile, warm-up -----------------------------

def is_channels_last(module: torch.nn.Module) -> bool:
    """Every 4-D weight with a kernel wider than 1x1 (where NCHW and NHWC differ) is NHWC."""
    weights = [w for w in module.parameters() if w.dim() == 4 and w.shape[-1] > 1]
    assert weights
    return all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in weights)


def uses_sdpa(module: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = module.attn_processors.values()
    return bool(processors) and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_cpu_profile_uses_sdpa_but_not_channels_last_or_compile(cache, monkeypatch):
    profile = apply_settings(detect_profile("cpu"), Settings(compile=True))  # ignored on CPU
    assert (profile.channels_last, profile.compile, profile.sdpa) == (False, False, True)
    pipe = cache.get("tiny", Mode.txt2img)
    assert uses_sdpa(pipe.unet) and uses_sdpa(pipe.vae)
    assert not is_channels_last(pipe.unet) and not is_channels_last(pipe.vae)
    assert not hasattr(pipe.unet, "renderfarm_compiled")
    assert cache.batch_size_for(3) == 3


def test_channels_last_renders_the_same_images(models, cache):
    nhwc = PipelineCache(models, Profile("cpu", "cpu", torch.float32, channels_last=True))
    pipe = nhwc.get("tiny", Mode.txt2img)
    assert is_channels_last(pipe.unet) and is_channels_last(pipe.vae)
    a, b = render(nhwc, job(seed=11))[0], render(cache, job(seed=11))[0]
    assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_compile_settings_apply_to_the_gpu_profile_only(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("RENDERFARM_COMPILE", "1")
    monkeypatch.setenv("RENDERFARM_COMPILE_MODE", "reduce-overhead")
    monkeypatch.setenv("RENDERFARM_WARMUP_SIZES", "512x512,640x384")
    monkeypatch.setenv("RENDERFARM_MAX_BATCH", "6")
    settings = Settings()
    gpu = apply_settings(Profile("gpu", "cpu", torch.float16, max_batch=8), settings)
    assert (gpu.compile, gpu.compile_mode, gpu.warmup_sizes, gpu.max_batch) == (
        True, "reduce-overhead", ((512, 512), (640, 384)), 6)
    cpu = apply_settings(Profile("cpu", "cpu", torch.float32), settings)
    assert (cpu.compile, cpu.warmup_sizes, cpu.max_batch) == (False, (), 6)
    for name, value, message in [
        ("compile", "maybe", "valid boolean"),
        ("compile_mode", "fastest", "'default', 'reduce-overhead'"),
        ("warmup_sizes", "512", "pattern"),
        ("warmup_sizes", "512x500", "multiple of 8 in both sides, got '512x500'"),
    ]:
        with pytest.raises(ValidationError, match=message) as failure:
            Settings(**{name: value})
        assert failure.value.errors()[0]["loc"] == (name,)


def test_warmup_renders_each_size_and_batch_once(models):
    small = PipelineCache(models, Profile("cpu", "cpu", torch.float32, max_batch=2,
                                          max_pixels=64 * 96))
    timings = small.warmup("tiny", sizes=[(64, 64), (96, 64), (128, 128)], batch_sizes=[1, 2])
    assert list(timings) == ["64x64x1", "64x64x2", "96x64x1", "96x64x2"]  # 128x128: too big
    assert small.loads == 1 and small.warmed["tiny"] == timings
    with pytest.raises(ValueError, match="batch size must be 1 to max_batch 2, got 3"):
        small.warmup("tiny", sizes=[(64, 64)], batch_sizes=[3])


def test_the_gpu_fast_path_in_fp16_runs_on_the_cpu_too(models, cache):
    """The GPU profile's settings (fp16 everywhere, VAE included; SDPA; channels_last) on the
    CPU, where CI can run them: batched equals unbatched, and fp16 stays near float32."""
    from worker.render import render_batch

    half = PipelineCache(models, Profile("cpu", "cpu", torch.float16, sdpa=True,
                                         channels_last=True, bytes_per_pixel=4096))
    pipe = half.get("tiny", Mode.txt2img)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert module.dtype == torch.float16
    assert uses_sdpa(pipe.unet) and is_channels_last(pipe.unet) and is_channels_last(pipe.vae)
    requests = [job(seed=1, prompt="a red barn"), job(seed=2, num_images=2)]
    batched = render_batch(half, requests)
    for request, images in zip(requests, batched, strict=True):
        alone, full = render(half, request), render(cache, request)
        for a, b, c in zip(images, alone, full, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2
            assert np.abs(pixels(a) - pixels(c)).max() <= 6  # fp16 vs float32
    assert half.get("tiny", Mode.img2img).unet.dtype == torch.float16


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_gpu_profile_applies_fp16_sdpa_channels_last_and_keeps_the_vae_on_the_gpu(models):
    profile = detect_profile("gpu")
    assert (profile.dtype, profile.sdpa, profile.channels_last, profile.cpu_offload) == (
        torch.float16, True, True, False)
    gpu = PipelineCache(models, profile)
    pipe = gpu.get("tiny", Mode.txt2img)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert module.device.type == "cuda" and module.dtype == torch.float16
    assert uses_sdpa(pipe.unet) and uses_sdpa(pipe.vae)
    assert is_channels_last(pipe.unet) and is_channels_last(pipe.vae)
    images = render(gpu, job(num_images=3))
    assert [im.size for im in images] == [(64, 64)] * 3


@needs_cuda
def test_gpu_batched_images_match_unbatched(models):
    from worker.render import render_batch

    gpu = PipelineCache(models, detect_profile("gpu"))
    requests = [job(seed=1, prompt="a red barn"), job(seed=2, num_images=2)]
    batched = render_batch(gpu, requests)
    for request, images in zip(requests, batched, strict=True):
        for a, b in zip(images, render(gpu, request), strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 4  # fp16


@needs_cuda
def test_gpu_compiled_unet_does_not_recompile_after_warmup(models):
    from torch._dynamo.utils import counters

    # mode "default": minutes less than max-autotune
    profile = apply_settings(detect_profile("gpu"), Settings(compile=True, compile_mode="default"))
    assert profile.compile
    gpu = PipelineCache(models, profile)
    gpu.warmup("tiny", sizes=[(64, 64)])
    graphs = counters["stats"]["unique_graphs"]
    render(gpu, job(num_images=3, scheduler="euler_a"))  # padded to a warmed batch of 4
    render(gpu, job(num_images=3, scheduler="ddim"))  # int64 timesteps
    assert counters["stats"]["unique_graphs"] == graphs
