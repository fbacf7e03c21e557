"""The pixel judge of the shapes world reads drawn scenes right (no model involved)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from renderfarm import shapes
from renderfarm.shapes_judge import check, judge


def test_judge_reads_every_part_of_drawn_scenes():
    rng = random.Random(11)
    for _ in range(300):
        scene = shapes.random_scene(rng)
        verdict = judge(shapes.draw(scene, rng))
        assert all(check(scene, verdict).values()), (scene, verdict)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_judge_tells_the_shapes_apart_at_every_size(shape):
    rng = random.Random(3)
    for size in shapes.SIZES:
        scene = shapes.Scene(shape, "yellow", "blue", size=size)
        assert judge(shapes.draw(scene, rng)).shape == shape, size


def test_judge_checks_what_the_scene_says_not_what_it_sees():
    rng = random.Random(1)
    drawn = shapes.Scene("circle", "red", "blue", size="small", position="top left")
    verdict = judge(shapes.draw(drawn, rng))
    other = shapes.Scene("square", "green", "white", size="small", position="bottom right",
                         count=2)
    assert check(other, verdict) == {"color": False, "background": False, "shape": False,
                                     "count": False, "position": False}


def test_judge_of_an_empty_picture_and_of_a_bigger_one():
    verdict = judge(Image.new("RGB", (64, 64), shapes.COLORS["green"]))
    assert (verdict.background, verdict.color, verdict.shape, verdict.count) == (
        "green", None, None, 0)
    big = shapes.draw(shapes.Scene("triangle", "white", "black", size="large"),
                      random.Random(0)).resize((128, 128), Image.Resampling.NEAREST)
    assert judge(big).shape == "triangle"


def test_captions_say_what_is_drawn():
    scene = shapes.Scene("triangle", "yellow", "black", size="small", position="top left")
    assert shapes.caption(scene) == "a small yellow triangle at the top left on a black background"
    assert shapes.caption(shapes.Scene("square", "green", "white", count=2)) == (
        "two green squares on a white background")
    # Every word of every caption is a word of the world (one token each in the tokenizer).
    rng = random.Random(0)
    for _ in range(200):
        words = shapes.caption(shapes.random_scene(rng), rng, drop=0.3).split()
        assert set(words) <= set(shapes.WORDS)
