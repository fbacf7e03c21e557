"""How often the shapes model draws what its prompt says, by the pixel judge.

    .venv/bin/python bench/shapes_judge.py                 # the shipped model, 100 prompts
    .venv/bin/python bench/shapes_judge.py --model DIR --save out/  # a model folder; pictures

Prompts: ``--n`` scenes of renderfarm.shapes.random_scene(Random(``--seed``)), each with its
full caption (shape, colour, background; size, position and count where the scene has them);
picture i uses seed i. The model (the shipped renderfarm/data/shapes, or a diffusers folder
written by tools/train_shapes.py: ``--model``) runs in a
plain diffusers StableDiffusionPipeline with the scheduler ``--scheduler`` (a farm scheduler name,
made from the model's own scheduler config as a worker makes it), ``--steps`` steps, guidance
``--guidance`` (defaults: the model's, renderfarm.shapes.SCHEDULER and GUIDANCE), 64x64,
``--batch`` prompts per call
(a seeded generator per picture: the same pictures at any batch size). renderfarm.shapes_judge
reads each picture. Prints one JSON object: the share right of shape colour, background colour,
both, shape, count and position (position over the prompts that name one), and the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sheet(images: list, columns: int = 10, scale: int = 2):
    """The pictures in rows of ``columns``, ``scale`` times their size (nearest neighbour)."""
    from PIL import Image

    side = 64 * scale + 4
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        tile = image.resize((side - 4, side - 4), Image.Resampling.NEAREST)
        out.paste(tile, ((i % columns) * side + 2, (i // columns) * side + 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a diffusers folder (default: the shipped shapes model)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024, help="seed of the prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None,
                        help="default: renderfarm.shapes.GUIDANCE")
    parser.add_argument("--scheduler", default=None,
                        help="a farm scheduler name (euler, euler_a, dpmpp_2m, ...); default: "
                        "renderfarm.shapes.SCHEDULER")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path, default=None, help="write the pictures here")
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from renderfarm import shapes
    from renderfarm.shapes_judge import check, judge
    from worker.modelgen import SHAPES_DIR
    from worker.pipelines import set_scheduler

    args.guidance = shapes.GUIDANCE if args.guidance is None else args.guidance
    args.scheduler = args.scheduler or shapes.SCHEDULER
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model or SHAPES_DIR, dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, args.scheduler)
    rng = random.Random(args.seed)
    scenes = [shapes.random_scene(rng) for _ in range(args.n)]
    prompts = [shapes.caption(s) for s in scenes]
    right, asked, misses = Counter(), Counter(), []
    started = time.monotonic()
    images = []
    for i in range(0, args.n, args.batch):
        chunk = prompts[i:i + args.batch]
        generators = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        images += pipe(chunk, height=shapes.SIZE, width=shapes.SIZE,
                       num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=generators).images
    seconds = time.monotonic() - started
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        verdict = judge(image)
        result = check(scene, verdict)
        result["colors"] = result["color"] and result["background"]
        for key, ok in result.items():
            asked[key] += 1
            right[key] += ok
        if not all(result.values()):
            misses.append(f"{i}: {prompts[i]!r} -> {verdict}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            image.save(args.save / f"{i:03d}.png")
    if args.save:
        sheet(images).save(args.save / "sheet.png")
        (args.save / "misses.txt").write_text("\n".join(misses) + "\n")
    print(json.dumps({
        "prompts": args.n, "scheduler": args.scheduler, "steps": args.steps,
        "guidance": args.guidance,
        "right": {k: round(right[k] / asked[k], 3) for k in asked},
        "asked": dict(asked),
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {platform.system()}, torch threads {args.threads}",
        "date": datetime.date.today().isoformat(),
    }, indent=1))


if __name__ == "__main__":
    main()
