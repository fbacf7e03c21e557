"""The farm's offline CLIP tokenizer encodes prompts as OpenAI's own tokenizer does.

The reference is ``clip/simple_tokenizer.py`` of the ``openai-clip`` package (test extra),
loaded by file path so that package's ``__init__`` (torch, torchvision) is never imported, and
reading that package's own copy of the BPE file, not the farm's.
"""

from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from worker import clip_tokenizer
from worker.clip_tokenizer import BOS, EOS, clip_tokenizer_dir, write_clip_tokenizer

BOS_ID, EOS_ID = 49406, 49407
PAD_IDS = {"clip-l": EOS_ID, "clip-g": 0}  # "!" is byte 0x21, the first byte symbol


def reference_module():
    spec = importlib.util.find_spec("clip")  # finds the package without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the reference needs the openai-clip package: pip install openai-clip "
                           "(it is in the test extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return reference_module()


@pytest.fixture(scope="module")
def simple(reference):
    return reference.SimpleTokenizer()  # its own bpe_simple_vocab_16e6.txt.gz


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    built = {}
    for variant in clip_tokenizer.VARIANTS:
        folder = clip_tokenizer_dir(variant, root=root)
        built[variant] = [CLIPTokenizer.from_pretrained(folder),
                          CLIPTokenizerFast.from_pretrained(folder)]
    return built


WORDS = ("masterpiece best quality portrait of a woman man cat dog castle forest sunset "
         "cinematic lighting highly detailed 8k photorealistic octane render trending on "
         "artstation by greg rutkowski alphonse mucha studio ghibli anime girl blue eyes long "
         "hair red dress landscape mountains river night sky stars neon cyberpunk city rain "
         "reflections bokeh depth of field sharp focus intricate elegant digital painting "
         "concept art smooth illustration watercolor oil canvas ultra wide angle lens "
         "DSLR Canon EOS 5D f/1.8 HDR RAW photo").split()
UNICODE = ["café", "naïve", "Ångström", "straße", "日本語", "東京の夜景", "猫", "한국어", "Привет",
           "мир", "Ελληνικά", "العربية", "עברית", "हिन्दी", "ไทย", "🐱", "🌅✨", "👩‍🎨",
           "e\u0301toile", "Zoë", "ça", "ñandú", "İstanbul", "Æsir", "œuvre", "ß"]
PUNCT = [",", ".", "!", "?", ":", ";", "-", "--", "...", "/", "|", "#", "@", "$", "%", "^",
         "*", "+", "=", "~", "`", "_", "'", '"', "<", ">", "{", "}", "[", "]", "(", ")"]


def emphasis(word: str, rng: random.Random) -> str:
    forms = [f"({word}:{rng.choice(['1.2', '0.8', '1.5', '.5', '2'])})", f"(({word}))",
             f"[{word}]", f"{{{word}}}", f"({word})", f"[[{word}]]", f"<lora:{word}:0.7>",
             f"<lora:{word}>", f"({word}:1.1) BREAK", f"{word} AND"]
    return rng.choice(forms)


def prompts() -> list[str]:
    """A few hundred prompts: prompt-like, emphasis syntax, unicode, punctuation, numbers,
    contractions, whitespace, long ones past 77 tokens, empty."""
    rng = random.Random(20261128)
    out = ["", " ", "\t\n  ", "a", "A PHOTO OF A CAT", "it's", "IT'S DON'T WE'RE I'VE I'M "
           "YOU'LL HE'D", "don't stop won't can't", "1girl, solo, 2boys", "1234567890",
           "3.14159 x 2 = 6.28", "(((((((((((", "))))", "<|endoftext|>", "<|startoftext|> a",
           "a <|endoftext|> b", "! !! !!!", "wow!!! amazing!", "hello world" * 40,
           "word " * 200, ", " * 120]
    for index in range(330):
        kind = index % 6
        count = rng.randint(1, 20) if kind != 5 else rng.randint(60, 200)
        parts = []
        for _ in range(count):
            roll = rng.random()
            word = rng.choice(WORDS)
            if kind == 1 and roll < 0.5:
                parts.append(emphasis(word, rng))
            elif kind == 2 and roll < 0.4:
                parts.append(rng.choice(UNICODE))
            elif kind == 3 and roll < 0.4:
                parts.append(rng.choice(PUNCT) * rng.randint(1, 3) + word)
            elif kind == 4 and roll < 0.3:
                parts.append(str(rng.randint(0, 100000)) + rng.choice(["px", "", "k", "%"]))
            else:
                parts.append(word.upper() if roll > 0.95 else word)
        separator = rng.choice([" ", ", ", ",", "  ", "\n", " | "])
        out.append(separator.join(parts))
    return out


PROMPTS = prompts()


def expected(simple, prompt: str, pad_id: int, length: int) -> list[int]:
    """What diffusers' ``encode_prompt`` feeds the text encoder (``padding="max_length"``,
    ``truncation=True``), built from the reference's ids."""
    ids = [BOS_ID] + simple.encode(prompt)[: length - 2] + [EOS_ID]
    return ids + [pad_id] * (length - len(ids))


def test_prompts_are_untouched_by_the_reference_cleanup(reference, simple):
    """The corpus holds only prompts OpenAI's ftfy/html cleanup leaves alone, so the next tests
    compare tokenizers, not cleanups (those are compared in the last test)."""
    assert len(PROMPTS) >= 300
    assert sum(len(simple.encode(prompt)) > 75 for prompt in PROMPTS) >= 50  # truncated
    for prompt in PROMPTS:
        # NFC: both tokenizers apply it
        assert reference.basic_clean(prompt) == unicodedata.normalize("NFC", prompt.strip())


@pytest.mark.parametrize("variant", sorted(clip_tokenizer.VARIANTS))
def test_ids_equal_openai_reference(tokenizers, simple, variant):
    pad_id = PAD_IDS[variant]
    for tokenizer in tokenizers[variant]:
        assert len(tokenizer) == 49408
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)
        assert tokenizer.pad_token_id == pad_id
        length = tokenizer.model_max_length
        assert length == 77
        for prompt in PROMPTS:
            if variant == "clip-g" and "<|" in prompt:
                continue  # split_special_tokens: tested below
            ids = tokenizer(prompt, padding="max_length", max_length=length,
                            truncation=True).input_ids
            assert ids == expected(simple, prompt, pad_id, length), prompt
            # diffusers also encodes untruncated to warn what a long prompt loses
            full = tokenizer(prompt, padding="longest").input_ids
            assert full == [BOS_ID] + simple.encode(prompt) + [EOS_ID], prompt


def test_ftfy_and_html_cleanup_is_the_only_difference(tokenizers, reference, simple):
    """OpenAI's tokenizer first fixes text with ftfy and unescapes HTML; transformers' does not
    (nor do diffusers and A1111). On such prompts the ids equal the reference's once the prompt
    is cleaned the same way."""
    tokenizer = tokenizers["clip-l"][0]
    for prompt in ["“curly quotes” and ‘single’", "fish &amp; chips &lt;3", "ﬁne ﬂower ǅ",
                   "ｆｕｌｌ ｗｉｄｔｈ", "cafÃ© mojibake", "&quot;quoted&quot; &#39;x&#39;"]:
        cleaned = reference.basic_clean(prompt)
        assert cleaned != prompt
        ids = tokenizer(cleaned, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == expected(simple, prompt, EOS_ID, 77), prompt


def test_files_and_vocabulary(tmp_path, simple):
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", pad_token="!")
    assert sorted(path.name for path in folder.iterdir()) == sorted(clip_tokenizer.FILES)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == simple.encoder
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split()) for line in lines[1:]] == sorted(
        simple.bpe_ranks, key=simple.bpe_ranks.get)
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS}
    with pytest.raises(ValueError, match="pad_token"):
        write_clip_tokenizer(tmp_path / "bad", pad_token="<pad>")


def test_cache_dir_is_written_once_and_repaired(tmp_path):
    folder = clip_tokenizer_dir("clip-g", root=tmp_path)
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_dir("clip-g", root=tmp_path) == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    (folder / "merges.txt").unlink()  # a broken folder is replaced
    assert clip_tokenizer_dir("clip-g", root=tmp_path) == folder
    assert clip_tokenizer.is_clip_tokenizer(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["clip-g"]  # no temporary folder left
    with pytest.raises(ValueError, match="variant 'clip-x'"):
        clip_tokenizer_dir("clip-x", root=tmp_path)


def test_clip_g_encodes_special_token_text_as_text(tokenizers, simple):
    """SDXL's second tokenizer pads with "!" yet encodes "!" in prompts as OpenCLIP does; the
    price: special-token text in a prompt is encoded as text (OpenCLIP makes it the token)."""
    tokenizer = tokenizers["clip-g"][0]
    assert tokenizer("! !! !!!").input_ids == [BOS_ID, 256, 748, 995, EOS_ID]
    ids = tokenizer("a <|endoftext|> b").input_ids
    assert ids == [BOS_ID] + simple.encode("a") + simple.encode("<|") + simple.encode(
        "endoftext") + simple.encode("|>") + simple.encode("b") + [EOS_ID]
