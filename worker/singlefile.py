"""Load single-file checkpoints (``<name>.safetensors`` / ``<name>.ckpt``) with no network.

diffusers' ``from_single_file`` holds only weights in the file: it builds the pipeline from a
diffusers-format *config* of the checkpoint's architecture, which it normally downloads from
the hub (for SD 1.x: ``stable-diffusion-v1-5/stable-diffusion-v1-5``). The farm never
downloads, so :func:`single_file_options` finds that config locally. For a checkpoint
``<models_dir>/<stem>.safetensors`` (or ``.ckpt``), in this order:

1. ``<stem>.config/`` next to it: a diffusers pipeline folder of the same architecture without
   weights (``model_index.json``, ``unet/config.json``, ``vae/config.json``,
   ``text_encoder/config.json``, ``tokenizer/``, ``scheduler/``) -> ``config=``. Make one with
   :func:`copy_configs` from any diffusers folder of that architecture. A folder named
   ``<stem>.config`` is never listed as a model (:func:`worker.modelfiles.list_models`).
2. Else, a checkpoint of a family that ships a config (:mod:`worker.families`: SD 1.x and
   SDXL, told by tensor names and shapes: :func:`worker.families.family_of_checkpoint`) ->
   that config (JSON files in ``worker/families/configs/<family>/`` and CLIP's tokenizers),
   written once on demand to ``<models_dir>/.configs/<family>/`` (hidden: not a model), or
   to ``$XDG_CACHE_HOME/renderfarm/configs/<family>/`` (``~/.cache/...``) where the models
   directory is read-only. A Flux file holds only the transformer and needs rule 1's folder
   with the other parts' weights (:mod:`worker.families.flux`).
3. ``<stem>.yaml`` next to it (the original LDM config, AUTOMATIC1111's convention) ->
   ``original_config=``: it describes the UNet and VAE. diffusers still takes the text
   encoder, tokenizer and scheduler from a diffusers config, so a ``.yaml`` goes with rule 1's
   folder, or alone only for a checkpoint with SD 1.x's CLIP ViT-L text encoder (then with the
   SD 1.5 config of rule 2).
4. Anything else raises :class:`CheckpointError`, naming the file, what it looks like, and
   what to put next to it.

The tokenizer. A checkpoint carries no tokenizer, and the hub's CLIP tokenizer cannot be
fetched here, so the generated SD 1.5 config holds CLIP's real tokenizer, built offline from
the BPE vocabulary that ships with the farm (:mod:`worker.clip_tokenizer`). A config folder
written by an older farm, which held a small stand-in tokenizer, gets the real one the next
time it is used; a tokenizer put there by hand (full-size vocabulary) is kept. A
``<stem>.config/`` folder whose tokenizer is smaller than its text encoder's vocabulary (one
copied from a tiny test model) is used as it is, with a warning.

``.ckpt`` files are pickles. diffusers 0.42 reads them with ``torch.load(weights_only=True)``
and so does :func:`checkpoint_shapes`: tensors and plain containers load, arbitrary Python
objects do not. An old checkpoint that pickled training callbacks fails: with a
:class:`CheckpointError` saying to convert it to ``.safetensors`` where its architecture is
read (rules 2-4), with diffusers' own "Unable to load weights" error where a
``<stem>.config/`` makes that read unnecessary. A ``.ckpt`` is read twice (shapes, then
weights; memory-mapped where it is a zip file); prefer ``.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from worker.clip_tokenizer import install_clip_tokenizer, is_clip_tokenizer
from worker.modelfiles import CONFIG_SUFFIX

if TYPE_CHECKING:
    from worker.families import Family

log = logging.getLogger("renderfarm.worker")

ORIGINAL_CONFIG_SUFFIX = ".yaml"
CONFIG_CACHE = ".configs"
SD15 = "sd15"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
# Tensors whose presence and shape tell the architecture (keys as in CompVis' ldm code).
K_CONV_IN = UNET + "input_blocks.0.0.weight"
K_LAST_SKIP = UNET + "output_blocks.11.0.skip_connection.weight"  # 4 UNet levels, 3 resnets
K_CROSS_ATTN = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
K_CLIP_POSITIONS = CLIP + "embeddings.position_embedding.weight"
K_CLIP_TOKENS = CLIP + "embeddings.token_embedding.weight"
K_VAE = VAE + "decoder.conv_in.weight"
K_OPEN_CLIP = "cond_stage_model.model.positional_embedding"
K_SDXL = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.gguf", "*.onnx")


class CheckpointError(ValueError):
    """A single-file checkpoint the worker cannot load as it stands; the message says why and
    what to add next to it."""

    def __init__(self, path: Path, message: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


def config_path(checkpoint: Path) -> Path:
    """``<stem>.config/`` next to ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CONFIG_SUFFIX)


def original_config_path(checkpoint: Path) -> Path:
    """``<stem>.yaml`` next to ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ORIGINAL_CONFIG_SUFFIX)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``.safetensors`` (header only) or ``.ckpt`` file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            path,
            "holds pickled Python objects besides tensors, which the worker does not unpickle "
            "(torch.load weights_only=True); convert it to .safetensors on a trusted machine",
        ) from exc
    except Exception as exc:
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({exc})") from exc
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a state dict")
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}


def detect_architecture(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """``("sd1", description)`` for a Stable Diffusion 1.x checkpoint (the UNet, VAE and CLIP
    ViT-L text encoder of SD 1.1 to 1.5 and their fine-tunes), else ``(None, what it looks
    like)``. Only names and shapes are read."""
    if K_SDXL in shapes:
        return None, "it looks like Stable Diffusion XL"
    if not any(key.startswith(UNET) for key in shapes):
        return None, f"it has no Stable Diffusion UNet ({UNET}*): a LoRA, VAE or other part?"
    conv_in = shapes.get(K_CONV_IN)
    cross = shapes.get(K_CROSS_ATTN)
    if (cross is not None and cross[-1] == 1024) or K_OPEN_CLIP in shapes:
        return None, "it looks like Stable Diffusion 2.x (OpenCLIP text encoder)"
    if conv_in is not None and conv_in[1] != 4:
        return None, (f"its UNet takes {conv_in[1]} input channels, not 4 "
                      "(an inpainting or instruct-pix2pix model)")
    if conv_in is None or conv_in[0] != 320 or K_LAST_SKIP not in shapes or cross is None \
            or cross[-1] != 768:
        return None, "its UNet is not Stable Diffusion 1.x's (another size or layout)"
    if K_VAE not in shapes:
        return None, f"it has no VAE ({VAE}*)"
    if not has_sd1_text_encoder(shapes):
        return None, "it has no SD 1.x CLIP ViT-L text encoder (cond_stage_model.transformer.*)"
    return "sd1", "Stable Diffusion 1.x"


def has_sd1_text_encoder(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the checkpoint holds SD 1.x's text encoder (CLIP ViT-L/14: 768 wide)."""
    return shapes.get(K_CLIP_POSITIONS) == (77, 768) and shapes.get(K_CLIP_TOKENS) == (49408, 768)


def write_bundled_config(family: Family, directory: Path) -> Path:
    """Write ``family``'s diffusers-format config, without weights, to ``directory``: the JSON
    files shipped in ``worker/families/configs/<family>/`` (``model_index.json``, each part's
    ``config.json``, ``scheduler/``) and CLIP's tokenizers (:mod:`worker.clip_tokenizer`)."""
    from worker.families import CONFIGS_DIR

    if family.bundled_config is None:
        raise ValueError(f"family {family.name!r} ships no single-file config")
    directory = Path(directory)
    source = CONFIGS_DIR / family.bundled_config
    # model_index.json last: a folder with it is complete.
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("model_index.json"),
                    dirs_exist_ok=True)
    for subfolder, variant in family.tokenizers:
        install_clip_tokenizer(directory / subfolder, variant)
    shutil.copy(source / "model_index.json", directory / "model_index.json")
    return directory


def write_sd15_config(directory: Path) -> Path:
    """Write the diffusers-format config of Stable Diffusion 1.5, without weights, to
    ``directory`` (:func:`write_bundled_config` of family ``sd15``)."""
    from worker.families import FAMILIES

    return write_bundled_config(FAMILIES[SD15], directory)


def bundled_config(family: Family, models_dir: Path) -> Path:
    """``family``'s config folder, written on first use: ``<models_dir>/.configs/<name>``, or
    under ``~/.cache/renderfarm/configs`` where the models directory is not writable.

    An existing folder is used as it is (so tokenizer files put there stay), except that the
    stand-in tokenizer of older farms is replaced by CLIP's (:func:`_upgrade_tokenizer`).
    Workers sharing a models directory may race to write it: each writes a private temporary
    folder and renames it into place; the first rename wins.
    """
    name = family.bundled_config or family.name
    roots = [Path(models_dir) / CONFIG_CACHE]
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    roots.append(Path(cache_home) / "renderfarm" / "configs")
    for root in roots:
        target = root / name
        if (target / "model_index.json").is_file():
            for subfolder, variant in family.tokenizers:
                _upgrade_tokenizer(target, subfolder, variant)
            return target
    errors = []
    for root in roots:
        target = root / name
        try:
            root.mkdir(parents=True, exist_ok=True)
            temporary = root / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            try:
                write_bundled_config(family, temporary)
                try:
                    os.rename(temporary, target)
                except OSError:
                    if not (target / "model_index.json").is_file():
                        raise
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
            log.info("wrote the %s config to %s", family.label, target)
            return target
        except OSError as exc:
            errors.append(f"{root}: {exc}")
    raise OSError(f"cannot write the {family.label} config: " + "; ".join(errors))


def sd15_config(models_dir: Path) -> Path:
    """The SD 1.5 config folder (:func:`bundled_config` of family ``sd15``)."""
    from worker.families import FAMILIES

    return bundled_config(FAMILIES[SD15], models_dir)


def _upgrade_tokenizer(folder: Path, subfolder: str = "tokenizer",
                       variant: str = "clip-l") -> None:
    """Replace ``folder/<subfolder>`` by CLIP's where it holds fewer ids than the text
    encoder's vocabulary (the stand-in an older farm wrote). Another worker may do the same at
    the same time: the new tokenizer is written aside and swapped in by renames; where the
    folder cannot be written the old tokenizer stays and :func:`_warn_if_built_tokenizer`
    says so."""
    tokenizer = folder / subfolder
    if is_clip_tokenizer(tokenizer) or not _smaller_than_encoder(folder, subfolder):
        return
    suffix = f"{os.getpid()}.{uuid.uuid4().hex}"
    fresh, old = folder / f".{subfolder}.{suffix}.tmp", folder / f".{subfolder}.{suffix}.old"
    try:
        install_clip_tokenizer(fresh, variant)
        if _smaller_than_encoder(folder, subfolder):  # not swapped by another worker
            os.rename(tokenizer, old)
            os.rename(fresh, tokenizer)
            log.info("replaced the stand-in tokenizer of %s by CLIP's", folder)
    except OSError as exc:
        log.warning("cannot replace the stand-in tokenizer of %s: %s", folder, exc)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _smaller_than_encoder(folder: Path, subfolder: str = "tokenizer") -> bool:
    """Whether ``folder``'s tokenizer ``subfolder`` has fewer ids than its text encoder's
    vocabulary (``tokenizer_2`` goes with ``text_encoder_2``)."""
    encoder = subfolder.replace("tokenizer", "text_encoder")
    try:
        vocab = json.loads((folder / subfolder / "vocab.json").read_text(encoding="utf-8"))
        text = json.loads((folder / encoder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return len(vocab) < text.get("vocab_size", 0)


def copy_configs(folder: Path, destination: Path) -> Path:
    """Copy diffusers model ``folder`` without its weights to ``destination``: the
    ``<stem>.config/`` of a checkpoint of the same architecture."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    shutil.copytree(folder, destination, ignore=shutil.ignore_patterns(*WEIGHT_PATTERNS))
    return Path(destination)


def single_file_options(checkpoint: Path, models_dir: Path) -> dict[str, str]:
    """The ``config=`` / ``original_config=`` options that let ``from_single_file`` load
    ``checkpoint`` offline (with ``local_files_only=True``), by the rules of this module's
    docstring. Raises :class:`CheckpointError` where no rule applies."""
    checkpoint = Path(checkpoint)
    folder = config_path(checkpoint)
    yaml = original_config_path(checkpoint)
    options: dict[str, str] = {}
    if yaml.is_file():
        options["original_config"] = str(yaml)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(
                checkpoint, f"{folder} has no model_index.json: it must be a diffusers pipeline "
                "folder (configs only is enough)")
        _warn_if_built_tokenizer(folder, checkpoint)
        return options | {"config": str(folder)}
    from worker.families import FAMILIES, family_of_checkpoint

    shapes = checkpoint_shapes(checkpoint)
    family = family_of_checkpoint(shapes)
    if family is None and yaml.is_file() and has_sd1_text_encoder(shapes):
        family = FAMILIES[SD15]
    if family is not None and family.bundled_config is not None:
        folder = bundled_config(family, models_dir)
        _warn_if_built_tokenizer(folder, checkpoint)
        return options | {"config": str(folder)}
    if family is not None:
        raise CheckpointError(checkpoint, f"cannot load this {family.label} checkpoint offline: "
                              f"{family.single_file_note()} (here: {folder.name}/)")
    description = detect_architecture(shapes)[1]
    if yaml.is_file():
        description += f"; {yaml.name} alone serves only a checkpoint with SD 1.x's text encoder"
    shipped = ", ".join(f.label for f in FAMILIES.values() if f.bundled_config)
    raise CheckpointError(
        checkpoint,
        f"cannot load this checkpoint offline: {description}. The farm carries the configs of "
        f"{shipped}. Put the diffusers config of its architecture next to it "
        f"as {folder.name}/ (a diffusers folder of the same model without weights: "
        f"model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
    )


def _warn_if_built_tokenizer(folder: Path, checkpoint: Path) -> None:
    """Log when ``folder``'s tokenizer has fewer ids than the text encoder's vocabulary: the
    a tiny test model's tokenizer, not the model's own, so prompts will not steer the picture."""
    if _smaller_than_encoder(folder):
        log.warning(
            "%s: tokenizer %s has fewer ids than its text encoder: not the model's own "
            "tokenizer, prompts will not steer renders as they should; put CLIP's there: "
            "python -c 'from worker.clip_tokenizer import install_clip_tokenizer as i; "
            "i(\"%s\")'", checkpoint.name, folder / "tokenizer", folder / "tokenizer")

