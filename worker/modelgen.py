"""Build Stable Diffusion models locally, with random weights: nothing is downloaded.

``make_model("tiny", dir)`` is the tiny pipeline of diffusers' own tests (seconds to build,
milliseconds per step) for tests and demos. ``make_model("sd15-random", dir)`` has the exact
Stable Diffusion 1.5 architecture and compute per step, with random fp16 weights: for load
and speed measurements, not for pictures.

``make_model("shapes", dir)`` copies the small model the project trained
(tools/train_shapes.py) to draw the world of :mod:`renderfarm.shapes`; its weights ship with
the package (renderfarm/data/shapes), so nothing is trained or downloaded.

``tiny`` uses a small CLIP tokenizer built here: byte-level BPE over all 256 bytes, with
merges learnt from a built-in word list, so any prompt (unicode, emoji) tokenizes (``shapes``
has one of those too, learnt from its world's words: one token per word).
``sd15-random`` gets CLIP's real tokenizer (:mod:`worker.clip_tokenizer`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import renderfarm
from worker import clip_tokenizer

KINDS = ("tiny", "sd15-random", "shapes")
# Package data of renderfarm (pyproject.toml's package-data ships it in the wheel).
SHAPES_DIR = Path(renderfarm.__file__).resolve().parent / "data" / "shapes"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Scheduler of SD 1.5 (stable-diffusion-v1-5 scheduler/scheduler_config.json). Every scheduler
# of worker.pipelines is made from this config with ``from_config``.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

# Values of stable-diffusion-v1-5's unet/config.json, vae/config.json and
# text_encoder/config.json (fields left out take the libraries' defaults, as there).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "use_linear_projection": False,
}
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# diffusers' get_dummy_components() for StableDiffusionPipeline.
TINY_UNET_CONFIG = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
}
# Four blocks, like SD's VAE: latents are 1/8 of the image, so the tiny model's cost scales
# with size the way the real one's does (diffusers' 2-block test VAE only halves the image,
# which makes a 128x128 render ~30x slower than it needs to be).
TINY_VAE_CONFIG = {
    "block_out_channels": (32, 32, 64, 64),
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
}
TINY_TEXT_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": 1000,
}

CONFIGS = {
    "tiny": {"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": TINY_TEXT_CONFIG},
    "sd15-random": {
        "unet": SD15_UNET_CONFIG,
        "vae": SD15_VAE_CONFIG,
        "text_encoder": SD15_TEXT_CONFIG,
    },
}
DTYPES = {"tiny": torch.float32, "sd15-random": torch.float16}

# Words the tokenizer's merges are learnt from: prompt-ish English. The exact list only changes
# which words get single tokens; every byte is in the vocabulary either way.
WORDS = """
a an the of and in on with at by for from to as is are it this that under over above into
photo photograph painting drawing sketch illustration render portrait landscape closeup
cinematic detailed highly intricate beautiful realistic photorealistic hyperrealistic sharp
focus lighting light dark night day morning evening sunset sunrise golden hour soft studio
dramatic volumetric moody bright colorful vibrant pastel black white red green blue yellow
orange purple pink brown gray silver gold style art artist artstation trending digital oil
watercolor acrylic canvas concept anime cartoon comic fantasy science fiction cyberpunk
steampunk medieval futuristic ancient modern city street building house castle tower bridge
forest tree trees mountain mountains river lake ocean sea beach sky clouds cloud rain snow
storm fog desert field flower flowers garden grass stone rock water fire ice space star stars
planet moon sun galaxy nebula cat dog horse bird fox wolf lion tiger dragon owl fish robot
woman man girl boy child person people face eyes hair smile wearing dress suit armor helmet
hat glasses sitting standing walking running flying holding looking eating drinking reading
squirrel burger coffee cup table chair window door room kitchen library car train ship boat
airplane wide angle lens camera shot view background foreground depth field bokeh resolution
quality masterpiece best high low blurry ugly deformed bad worst extra missing text watermark
signature cropped jpeg artifacts noise grain sharp smooth texture pattern shape small large
big tiny huge old young happy sad beautiful elegant cute scary epic giant little very more
""".split()


def make_model(kind: str, directory: Path) -> Path:
    """Build a model of ``kind`` and save it as a diffusers folder (safetensors) in ``directory``.

    Kinds: ``tiny`` (seconds), ``sd15-random`` (about a minute, ~2 GB of fp16 weights) and
    ``shapes`` (the trained weights shipped in the package, copied). Returns the folder.
    """
    from worker import familygen

    if kind in familygen.KINDS:  # SDXL and Flux: worker/familygen.py
        return familygen.make(kind, directory)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS + familygen.KINDS)}, "
                         f"got {kind!r}")
    directory = Path(directory)
    if kind == "shapes":
        return _copy_shapes(directory)
    directory.mkdir(parents=True, exist_ok=True)
    configs = CONFIGS[kind]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(0)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    if configs["text_encoder"]["vocab_size"] == clip_tokenizer.VOCAB_SIZE:  # CLIP's own
        tokenizer = CLIPTokenizer.from_pretrained(
            clip_tokenizer.install_clip_tokenizer(directory / "tokenizer", "clip-l"))
    else:  # a tiny text encoder: a small tokenizer that fits its vocabulary
        tokenizer = make_tokenizer(directory / "tokenizer")
    if len(tokenizer) > configs["text_encoder"]["vocab_size"]:  # pragma: no cover - a guard
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, over the text encoder's vocab")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if DTYPES[kind] == torch.float16:
        for model in (unet, vae, text_encoder):
            model.half()
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _copy_shapes(directory: Path) -> Path:
    if not (SHAPES_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the shapes model's weights are missing from {SHAPES_DIR}")
    # Copied under a hidden name and renamed: a model list never sees it half-written.
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(SHAPES_DIR, partial)
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def make_tokenizer(
    directory: Path, vocab_size: int = 1000, words: list[str] | None = None
) -> CLIPTokenizer:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory`` and load a CLIP tokenizer.

    Merges are learnt from ``words`` (default: :data:`WORDS`) until the vocabulary has
    ``vocab_size`` tokens or every word is one token.

    The vocabulary is laid out like CLIP's: the 256 byte symbols, the same with ``</w>``
    (end of word), the merges in order, then ``<|startoftext|>`` and ``<|endoftext|>`` as the
    two highest ids (CLIP's text model finds the end of a prompt as the highest id).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(WORDS if words is None else words, vocab_size - len(vocab_list) - 2)
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``words``: the most frequent pair first, ties by name."""
    byte_symbol = _bytes_to_unicode()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        chars = [byte_symbol[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        corpus[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in corpus.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = Counter({_merge(word, best): freq for word, freq in corpus.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from each byte to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


#: The LoRA file formats :func:`make_lora` writes: diffusers' own (peft ``lora_A`` /
#: ``lora_B``, as ``save_lora_weights`` writes) and kohya's (``lora_down`` / ``lora_up`` /
#: ``alpha``, what A1111 and civitai LoRAs use; SDXL's UNet blocks named the original (SGM)
#: way, ``lora_unet_input_blocks_4_1_...``, and its encoders ``lora_te1_`` / ``lora_te2_``, as
#: kohya's sd-scripts write them).
LORA_FORMATS = ("peft", "kohya")
#: The layers a made LoRA adapts: the UNet's attention projections, a Flux transformer's
#: attention projections (both streams), and the text encoders' self-attention projections
#: (what most LoRAs train).
_LORA_UNET = re.compile(r"^(.*\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$")
_LORA_TRANSFORMER = re.compile(
    r"^(.*\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out))"
    r"\.weight$")
_LORA_TEXT = re.compile(r"^(?:text_model\.)?(encoder\.layers\.\d+\.self_attn\.[qkvo]\w*_proj)"
                        r"\.weight$")


def make_lora(model_dir: Path, path: Path, fmt: str = "peft", seed: int = 0, rank: int = 4,
              scale: float = 0.3, text_encoders: bool = True) -> Path:
    """Write a LoRA for the diffusers model folder ``model_dir`` to ``path`` (``.safetensors``):
    random low-rank updates (``scale`` x standard normal, seeded) of the UNet's (or a Flux
    transformer's) attention and, with ``text_encoders``, the text encoders' self-attention
    (not Flux's: its LoRAs adapt the transformer), in ``fmt`` (:data:`LORA_FORMATS`; Flux:
    peft only), with layer names as real LoRAs have them. Shapes come from the model files'
    headers: nothing is loaded. Returns ``path``."""
    from safetensors.torch import save_file

    from worker.lorafiles import safetensors_shapes

    if fmt not in LORA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}")
    model_dir = Path(model_dir)
    if (model_dir / "transformer").is_dir():  # Flux
        if fmt != "peft":
            raise ValueError(f"{model_dir}: a transformer model's LoRA is written in diffusers' "
                             "own format only (--format peft)")
        parts = [("transformer", _LORA_TRANSFORMER)]
        encoders: list[str] = []
    else:
        encoders = sorted(p.name for p in model_dir.glob("text_encoder*") if p.is_dir())
        parts = [("unet", _LORA_UNET)]
        if text_encoders:
            parts += [(name, _LORA_TEXT) for name in encoders]
    sgm = fmt == "kohya" and "text_encoder_2" in encoders  # kohya's SDXL names
    layers_per_block = 0
    if sgm:
        config = json.loads((model_dir / "unet" / "config.json").read_text(encoding="utf-8"))
        layers_per_block = int(config.get("layers_per_block", 2))
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for part, pattern in parts:
        [weights] = sorted((model_dir / part).glob("*.safetensors"))[:1] or [None]
        if weights is None:
            raise ValueError(f"{model_dir / part} has no .safetensors weights to shape a LoRA on")
        for key, shape in sorted(safetensors_shapes(weights).items()):
            match = pattern.match(key)
            if not match or len(shape) != 2:
                continue
            layer = match.group(1) if pattern is not _LORA_TEXT else f"text_model.{match.group(1)}"
            down = torch.randn(rank, shape[1], generator=generator) * scale
            up = torch.randn(shape[0], rank, generator=generator) * scale
            if fmt == "peft":
                tensors[f"{part}.{layer}.lora_A.weight"] = down
                tensors[f"{part}.{layer}.lora_B.weight"] = up
            else:
                prefix = {"unet": "lora_unet", "text_encoder": "lora_te",
                          "text_encoder_2": "lora_te2"}[part]
                if part == "text_encoder" and "text_encoder_2" in encoders:
                    prefix = "lora_te1"
                if sgm and part == "unet":
                    layer = _sgm_name(layer, layers_per_block)
                name = f"{prefix}_{layer.replace('.', '_')}"
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    if not tensors:
        raise ValueError(f"{model_dir}: no attention layers found to make a LoRA for")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "renderfarm_lora_format": fmt})
    return path


def _sgm_name(layer: str, layers_per_block: int) -> str:
    """A diffusers UNet attention layer's name in the original (SGM) layout, as kohya names
    SDXL's (2 layers per block): ``down_blocks.1.attentions.0.x`` -> ``input_blocks.4.1.x``,
    ``up_blocks.0.attentions.2.x`` -> ``output_blocks.2.1.x``, ``mid_block.attentions.0.x`` ->
    ``middle_block.1.x`` (the inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``)."""
    found = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.*)$", layer)
    if found:
        kind, block, index, rest = found.groups()
        per = layers_per_block + (0 if kind == "down_blocks" else 1)
        if kind == "down_blocks":
            return f"input_blocks.{1 + int(block) * (per + 1) + int(index)}.1.{rest}"
        return f"output_blocks.{int(block) * per + int(index)}.1.{rest}"
    if layer.startswith("mid_block.attentions.0."):
        return "middle_block.1." + layer[len("mid_block.attentions.0."):]
    raise ValueError(f"no original (SGM) name for UNet layer {layer!r}")
