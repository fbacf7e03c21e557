"""CLIP's real tokenizer, offline: transformers' ``CLIPTokenizer`` files built from the BPE
vocabulary that ships with the farm. Imports neither torch nor transformers.

Single-file checkpoints carry no tokenizer, and nothing may be fetched from a model hub, so the
farm bundles OpenAI CLIP's byte-pair vocabulary ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence,
see ``worker/clip_vocab/NOTICE``; the same bytes ship in the PyPI packages ``openai-clip`` and
``open-clip-torch``) and writes from it, on demand, the four files of a Hugging Face CLIP
tokenizer folder: ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and
``tokenizer_config.json``.

The vocabulary is built exactly as OpenAI's ``clip/simple_tokenizer.py`` builds it: the 256
byte symbols, the same with ``</w>``, one token per merge (48,894 merges), then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids, the size of every
SD 1.x / SDXL text encoder's embedding table.

Two variants (:data:`VARIANTS`), differing only in the padding token:

- ``clip-l``: pads with ``<|endoftext|>``. SD 1.x's ``tokenizer/`` and SDXL's first
  ``tokenizer/`` (CLIP ViT-L/14).
- ``clip-g``: pads with ``!`` (id 0). SDXL's ``tokenizer_2/`` (OpenCLIP ViT-bigG/14), as in
  ``stabilityai/stable-diffusion-xl-base-1.0``. Unlike that hub folder, whose tokenizer turns
  every ``!`` of a prompt into a pad token (diffusers#4153), this one encodes ``!`` as OpenCLIP
  does (the tokenizer SDXL was trained with; A1111 and ComfyUI do the same): it sets
  ``split_special_tokens``, so the literal text ``<|endoftext|>`` in a prompt is encoded as
  text there, not as the special token.

transformers' tokenizer normalises a prompt with NFC, whitespace folding and lower-casing.
OpenAI's reference tokenizer also runs ``ftfy.fix_text`` and ``html.unescape`` first (curly
quotes to straight ones, ``&amp;`` to ``&``, ligatures and full-width letters to ASCII...).
The farm encodes with transformers' tokenizer as diffusers does, so such prompts encode as in
diffusers (transformers 4's older Python tokenizer, which AUTOMATIC1111 runs, applied ftfy
where it was installed, but never ``html.unescape``); every other prompt gets OpenAI's ids
(tests/test_clip_tokenizer.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

#: The bundled BPE vocabulary (OpenAI CLIP, MIT; see NOTICE next to it).
BPE_VOCAB = Path(__file__).with_name("clip_vocab") / "bpe_simple_vocab_16e6.txt.gz"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: CLIP's context: 75 prompt tokens between BOS and EOS.
MODEL_MAX_LENGTH = 77
#: Merges CLIP uses: the file holds more; OpenAI's tokenizer reads lines 1..48894.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # 49408

#: Variant name -> padding token.
VARIANTS: dict[str, str] = {"clip-l": EOS, "clip-g": "!"}
#: Written last: a folder holding it is complete.
FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


@lru_cache(maxsize=1)
def merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 merges of CLIP's BPE, in rank order, from the bundled file."""
    lines = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    pairs = tuple(tuple(line.split()) for line in lines)
    if len(pairs) != N_MERGES or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{BPE_VOCAB} is not CLIP's BPE vocabulary (bad merges)")
    return pairs  # type: ignore[return-value]


def vocabulary() -> dict[str, int]:
    """Token -> id, as OpenAI's ``SimpleTokenizer`` numbers them."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in merges()]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - a guard on the bundled file
        raise ValueError(f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab


def write_clip_tokenizer(directory: Path, pad_token: str = EOS) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder (:data:`FILES`) into ``directory``
    (created) and return it. ``pad_token``: ``<|endoftext|>`` (SD 1.x, SDXL's first) or
    ``!`` (SDXL's second)."""
    vocab = vocabulary()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not a token of CLIP's vocabulary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                          encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges()), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        **special,
        # A pad token that is an ordinary token ("!") must not be split out of the prompt as a
        # special token: OpenCLIP encodes "!!!" as one token, not three pads (diffusers#4153).
        "split_special_tokens": pad_token not in (BOS, EOS),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def is_clip_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a complete CLIP tokenizer of the full vocabulary (not a
    tiny test model's small one)."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in FILES):
        return False
    try:
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return len(vocab) == VOCAB_SIZE


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/renderfarm/tokenizers`` (``~/.cache/...`` by default)."""
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "renderfarm" / "tokenizers"


def clip_tokenizer_dir(variant: str = "clip-l", root: Path | None = None) -> Path:
    """The folder of tokenizer ``variant`` (:data:`VARIANTS`) under ``root`` (default
    :func:`cache_root`), written on first use and reused after.

    Processes sharing the folder may race to write it: each writes a private temporary folder
    and renames it into place; the first rename wins.
    """
    if variant not in VARIANTS:
        raise ValueError(f"tokenizer variant {variant!r} is unknown; known: {sorted(VARIANTS)}")
    root = Path(root) if root is not None else cache_root()
    target = root / variant
    if is_clip_tokenizer(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{variant}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        write_clip_tokenizer(temporary, VARIANTS[variant])
        if target.exists() and not is_clip_tokenizer(target):
            shutil.rmtree(target, ignore_errors=True)  # a broken or partial earlier one
        try:
            os.rename(temporary, target)
        except OSError:
            if not is_clip_tokenizer(target):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def install_clip_tokenizer(destination: Path, variant: str = "clip-l") -> Path:
    """Put tokenizer ``variant`` at ``destination`` (a model config's ``tokenizer/`` or
    ``tokenizer_2/``), replacing what is there: copied from :func:`clip_tokenizer_dir`, or
    written directly where the cache is not writable."""
    destination = Path(destination)
    if destination.exists():
        shutil.rmtree(destination)
    try:
        shutil.copytree(clip_tokenizer_dir(variant), destination)
    except OSError:
        write_clip_tokenizer(destination, VARIANTS[variant])
    return destination
