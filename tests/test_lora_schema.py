"""LoRAs in the job schema: the ``loras`` field and A1111's ``<lora:name:weight>`` prompt tags
give the same request; bad ones are refused naming the field and the value. No farm needed."""

from __future__ import annotations

import pytest

from renderfarm.errors import InvalidJob
from renderfarm.schema import JobRequest, parse_job
from worker.compat import compat_key, incompatibilities

GOOD = {"prompt": "a cat", "model": "tiny", "width": 64, "height": 64, "steps": 2, "seed": 1}


def job(**change) -> JobRequest:
    return parse_job({**GOOD, **change})


@pytest.mark.parametrize("prompt, loras", [
    ("a cat <lora:ink:0.8>", [("ink", 0.8)]),
    ("<lora:ink:0.8> a cat", [("ink", 0.8)]),
    ("a <lora:ink:0.8> cat", [("ink", 0.8)]),
    ("a cat <lora:ink>", [("ink", 1.0)]),
    ("a cat<lyco:ink:-0.5>", [("ink", -0.5)]),
    ("a cat <lora:ink:0.8> <lora:sketch:0>", [("ink", 0.8), ("sketch", 0.0)]),
    ("a cat <lora: ink : .8 >", [("ink", 0.8)]),
])
def test_tag_and_field_give_the_same_request(prompt, loras):
    by_tag = job(prompt=prompt)
    by_field = job(loras=[{"name": n, "weight": w} for n, w in loras])
    assert by_tag == by_field
    assert by_tag.prompt == "a cat"
    assert [(x.name, x.weight) for x in by_tag.loras] == loras
    # What is stored in Redis reads back the same (no tag left to move twice).
    assert JobRequest.model_validate_json(by_tag.model_dump_json()) == by_tag


def test_field_loras_come_first_then_tags():
    request = job(prompt="a cat <lora:b:0.5>", loras=[{"name": "a"}])
    assert [(x.name, x.weight) for x in request.loras] == [("a", 1.0), ("b", 0.5)]


def test_prompt_without_tags_is_untouched():
    assert job(prompt="  a <cat>, (lora:1.2) ").prompt == "  a <cat>, (lora:1.2) "
    assert job().loras == []


BAD = [
    ({"prompt": "a cat <lora:ink:strong>"}, "prompt", "weight 'strong' is not a number"),
    ({"prompt": "a cat <lora::0.5>"}, "prompt", "without a LoRA name"),
    ({"prompt": "a cat <lora:ink:>"}, "prompt", "<lora:ink:> with no weight after its ':'"),
    ({"loras": [{"name": "ink<3"}]}, "loras.0.name", "must match"),
    ({"prompt": "a cat <lora:ink:0.5:0.7>"}, "prompt", "more than a name and one weight"),
    ({"prompt": "a cat <lora:ink:te=0.5>"}, "prompt", "more than a name and one weight"),
    ({"prompt": " <lora:ink:0.5> "}, "prompt", "is only <lora:...> tags"),
    ({"prompt": "a cat <lora:ink:11>"}, "loras.0.weight", "must be at most 10.0"),
    ({"loras": [{"name": "ink", "weight": -12}]}, "loras.0.weight", "must be at least -10.0"),
    ({"loras": [{"name": "../x"}]}, "loras.0.name", "must match"),
    ({"loras": [{"name": "a,b"}]}, "loras.0.name", "must match"),
    ({"loras": [{"name": "ink", "strength": 1}]}, "loras.0.strength", "is not a known field"),
    ({"loras": [{"name": f"l{i}"} for i in range(9)]}, "loras", "at most 8"),
    ({"prompt": "a cat <lora:ink>", "loras": [{"name": "ink"}]}, "loras",
     "names LoRA 'ink' more than once"),
    ({"negative_prompt": "blurry <lora:ink:1>"}, "negative_prompt",
     "LoRA tags are read from prompt only"),
]


@pytest.mark.parametrize("change, field, message", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_lora_is_named_with_its_value(change, field, message):
    with pytest.raises(InvalidJob) as info:
        job(**change)
    [error] = info.value.errors
    assert error.field == field
    assert message in str(info.value)
    assert error.value is not None


def test_compat_key_separates_lora_sets_and_weights():
    plain = job()
    ink = job(prompt="a cat <lora:ink:0.8>")
    assert compat_key(plain) == "txt2img:tiny:64x64:2:euler_a:7.0"  # unchanged without LoRAs
    assert compat_key(ink) == "txt2img:tiny:64x64:2:euler_a:7.0:lora=ink@0.8"
    assert len({compat_key(plain), compat_key(ink), compat_key(job(prompt="a <lora:ink:0.7>")),
                compat_key(job(prompt="a <lora:sketch:0.8>"))}) == 4
    # Same set in another order, or another prompt: the same call may hold both.
    both = job(prompt="a dog <lora:ink:0.8> <lora:sketch>")
    swapped = job(prompt="a cat <lora:sketch:1> <lora:ink:0.8>")
    assert compat_key(both) == compat_key(swapped)
    assert incompatibilities(both, swapped) == []
    assert incompatibilities(plain, ink) == ["loras () != (('ink', 0.8),)"]
