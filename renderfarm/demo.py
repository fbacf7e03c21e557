"""``renderfarm demo``: the embedded farm renders a small batch end to end on any machine.

The model is ``shapes``, the small model the project trained (tools/train_shapes.py) on the
world of :mod:`renderfarm.shapes`; its weights ship with the package. The summary prints, for
each picture, what its prompt asks for and what the pixel judge (renderfarm.shapes_judge) sees,
and the pictures are put side by side in ``<data dir>/demo.png``. A checkout or install without
the shapes weights (renderfarm/data/shapes) runs the same demo on the ``tiny`` model, whose
random weights draw noise, and says so.
"""

from __future__ import annotations

import io
import time

from PIL import Image, ImageDraw
from rich.console import Console

from renderfarm.settings import Settings
from renderfarm.shapes import GUIDANCE, SCHEDULER, Scene, caption

MODEL = "shapes"
FALLBACK = "tiny"  # random weights: noise (when the shapes weights are not installed)
SIZE = 64
SCENES = [
    Scene("circle", "red", "blue"),
    Scene("triangle", "yellow", "black", size="small", position="top left"),
    Scene("square", "green", "white", count=2),
    Scene("circle", "white", "red", size="large"),
    Scene("triangle", "blue", "yellow", size="large"),
    Scene("square", "black", "green", size="small", position="bottom right"),
    Scene("circle", "yellow", "blue", size="small", count=3),
    Scene("square", "red", "yellow", size="large"),
]
PROMPTS = [caption(scene) for scene in SCENES]
IMG2IMG_PROMPT = "a red square on a blue background"
IMG2IMG_STRENGTH = 0.5
# The shapes model's sampling settings (renderfarm.shapes: low guidance, plain Euler).
SAMPLING = {"steps": 20, "guidance_scale": GUIDANCE, "scheduler": SCHEDULER}

console = Console()


def run_demo(settings: Settings, workers: int = 1) -> int:
    from producer import FarmClient
    from renderfarm.farm import EmbeddedFarm
    from renderfarm.images import encode_init_image
    from renderfarm.progress import follow_batch
    from renderfarm.shapes_judge import judge
    from worker.modelfiles import list_models

    started = time.monotonic()
    model = demo_model(settings)
    if model not in list_models(settings.models_path):
        from worker.modelgen import make_model

        doing = "copying" if model == MODEL else "making"
        console.print(f"{doing} the {model} model in {settings.models_path / model} ...")
        make_model(model, settings.models_path / model)
    if model != MODEL:
        console.print(f"[yellow]the {MODEL} model's weights are not installed: the demo runs on "
                      f"the {model} model, whose random weights draw noise[/]")
    console.print(f"model: {model}")
    console.print("starting the embedded farm (its own Redis, local storage) ...")
    with EmbeddedFarm(settings, workers=workers, preload=[model]) as farm:
        client = FarmClient(farm.settings)
        jobs = [{"prompt": p, "model": model, "width": SIZE, "height": SIZE, **SAMPLING,
                 "seed": 1000 + i} for i, p in enumerate(PROMPTS)]
        batch = client.submit_batch(jobs, label="demo txt2img")
        console.print(f"batch {batch.id}: {len(jobs)} txt2img jobs queued")
        ok = follow_batch(client, batch.id, timeout=300)
        records = client.records.batch_jobs(batch.id)
        wanted = list(PROMPTS)
        first = records[0]
        if first.results:  # img2img of the first picture: its colours stay, its shape may not
            img2img = client.submit({
                "mode": "img2img", "prompt": IMG2IMG_PROMPT, "model": model,
                "init_image": encode_init_image(client.storage.get(first.results[0].key)),
                "strength": IMG2IMG_STRENGTH, "width": SIZE, "height": SIZE, **SAMPLING,
                "seed": 7,
            })
            console.print(f"img2img job {img2img.id} from {first.results[0].key}")
            ok = follow_batch(client, img2img.status().batch_id, timeout=120) and ok
            records.append(img2img.status())
            wanted.append(f"{IMG2IMG_PROMPT} (img2img of the first, strength "
                          f"{IMG2IMG_STRENGTH}: its colours stay)")
        tiles: list[tuple[Image.Image, str]] = []
        console.print("what each picture should show" + (
            ", and what the pixel judge sees in it:" if model == MODEL else ":"))
        for record, want in zip(records, wanted, strict=True):
            if not record.results:
                console.print(f"  {record.id}: [red]no picture[/] (should show {want})")
                continue
            image = Image.open(io.BytesIO(client.storage.get(record.results[0].key)))
            line = f"  {record.results[0].key}: should show {want}"
            if model == MODEL:
                seen = judge(image)
                line += "; judge sees " + (
                    f"{seen.count} {seen.color} {seen.shape}(s) at {seen.position} on "
                    f"{seen.background}" if seen.color else f"only {seen.background}")
            console.print(line, soft_wrap=True)
            tiles.append((image.convert("RGB"), want))
    sheet = settings.data_path / "demo.png"
    contact_sheet(tiles).save(sheet)
    console.print(f"images are in {client.storage.describe}; side by side in {sheet}")
    console.print(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


def demo_model(settings: Settings) -> str:
    """``shapes`` when its weights are shipped (or already in the models folder), else ``tiny``."""
    from worker.modelfiles import list_models
    from worker.modelgen import SHAPES_DIR

    if MODEL in list_models(settings.models_path) or (SHAPES_DIR / "model_index.json").is_file():
        return MODEL
    return FALLBACK


def contact_sheet(tiles: list[tuple[Image.Image, str]], scale: int = 3, columns: int = 3,
                  label: int = 30) -> Image.Image:
    """The pictures, ``scale`` times their size (nearest neighbour), each over its prompt."""
    side = SIZE * scale
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * (side + 8) + 8, rows * (side + label + 8) + 8), "white")
    pen = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(tiles):
        x, y = 8 + (i % columns) * (side + 8), 8 + (i // columns) * (side + label + 8)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        words, lines = text.split(" ("), []
        line = ""
        for word in words[0].split():
            if len(line) + len(word) > 30:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        pen.multiline_text((x, y + side + 2), "\n".join(lines[:2]), fill="black", spacing=1)
    return sheet
