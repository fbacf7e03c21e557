"""Every invalid field is refused with an error naming it and its value; nothing is enqueued."""

from __future__ import annotations

import pytest

from renderfarm import keys
from renderfarm.errors import InvalidJob

GOOD = {"prompt": "a cat", "model": "tiny", "width": 64, "height": 64, "steps": 2}

BAD = [
    ({"width": 500}, "width", "width must be a multiple of 8, got 500"),
    ({"width": 32}, "width", "width must be at least 64, got 32"),
    ({"height": 4096}, "height", "height must be at most 2048, got 4096"),
    ({"steps": 0}, "steps", "steps must be at least 1, got 0"),
    ({"steps": 151}, "steps", "steps must be at most 150, got 151"),
    ({"guidance_scale": 31}, "guidance_scale", "guidance_scale must be at most 30.0, got 31"),
    ({"prompt": "x" * 2001}, "prompt", "prompt must be at most 2000 characters"),
    ({"prompt": "   "}, "prompt", "prompt must not be blank"),
    ({"strength": 1.5}, "strength", "strength must be at most 1.0, got 1.5"),
    ({"scheduler": "dpm_fast"}, "scheduler", "scheduler must be one of"),
    ({"model": "nope"}, "model", "model is not a model the farm has"),
    ({"model": "../etc"}, "model", "model must match"),
    ({"seed": -1}, "seed", "seed must be at least 0, got -1"),
    ({"priority": 10}, "priority", "priority must be at most 9, got 10"),
    ({"mode": "img2img"}, "init_image", "init_image is required when mode is img2img"),
    ({"mode": "img2img", "init_image": "bm90IGFuIGltYWdl"}, "init_image",
     "init_image is not an image"),
    ({"colour": "red"}, "colour", "colour is not a known field"),
    ({"hardware": "tpu"}, "hardware", "hardware must be one of"),
]


def queue_depth(redis) -> int:
    return sum(redis.llen(k) for k in redis.keys("renderfarm*") if redis.type(k) == b"list")


@pytest.mark.parametrize("change, field, message", BAD, ids=[b[1] for b in BAD])
def test_bad_field_is_named_and_nothing_enqueued(client, change, field, message):
    redis = client.redis
    before = (redis.zcard(keys.JOBS), redis.zcard(keys.BATCHES), queue_depth(redis))
    with pytest.raises(InvalidJob) as info:
        client.submit_batch([GOOD, {**GOOD, **change}])
    errors = info.value.errors
    assert [e.field for e in errors] == [field]
    assert message in str(info.value)
    assert errors[0].index == 1
    after = (redis.zcard(keys.JOBS), redis.zcard(keys.BATCHES), queue_depth(redis))
    assert after == before


def test_several_bad_fields_all_named(client):
    with pytest.raises(InvalidJob) as info:
        client.submit({**GOOD, "width": 65, "steps": 999})
    assert {e.field for e in info.value.errors} == {"width", "steps"}
    assert "width must be a multiple of 8, got 65" in str(info.value)
