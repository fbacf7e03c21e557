"""Write a diffusers Stable Diffusion folder as one original-layout (LDM) checkpoint.

The reverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint`` (diffusers.loaders.single_file_utils), for any number of blocks
and layers per block, so the tiny model can stand in for a real SD 1.x ``.safetensors`` in
tests. Keys are the ones CompVis' ``ldm`` code (and AUTOMATIC1111, ComfyUI) use:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_RESNET = (  # (diffusers, ldm) inside a ResnetBlock2D
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {  # diffusers -> ldm inside the mid-block attention
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split(key: str, prefix: str) -> str | None:
    return key[len(prefix):] if key.startswith(prefix) else None


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` keys."""
    per_block = config["layers_per_block"] + 1  # LDM: the resnets, then the down/upsampler
    has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes: list[tuple[str, str, bool]] = []  # (diffusers, ldm, is a resnet)
    for i in range(len(config["down_block_types"])):
        for j in range(config["layers_per_block"]):
            n = per_block * i + j + 1
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", True))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", False))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.",
                         f"input_blocks.{per_block * (i + 1)}.0.op.", False))
    for i in range(len(config["up_block_types"])):
        for j in range(per_block):
            n = per_block * i + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", True))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", False))
        slot = 2 if has_attention[i] else 1
        prefixes.append((f"up_blocks.{i}.upsamplers.0.",
                         f"output_blocks.{per_block * i + per_block - 1}.{slot}.", False))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1.", False))
    prefixes += [(f"mid_block.resnets.{k}.", f"middle_block.{2 * k}.", True) for k in (0, 1)]

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[UNET_PREFIX + f"{_UNET_TOP[module]}.{param}"] = value
            continue
        for hf, ldm, resnet in prefixes:
            rest = _split(key, hf)
            if rest is None:
                continue
            if resnet:
                for hf_part, ldm_part in _UNET_RESNET:
                    if rest.startswith(hf_part + "."):
                        rest = ldm_part + rest[len(hf_part):]
                        break
            out[UNET_PREFIX + ldm + rest] = value
            break
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` keys (mid-block attention as
    1x1 convolutions, as in LDM)."""
    blocks = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for part in ("encoder", "decoder"):
            new = new.replace(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.")
            new = new.replace(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
        for i in range(len(config["down_block_types"])):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.",
                              f"encoder.down.{i}.downsample.")
        for i in range(blocks):  # LDM numbers the decoder's blocks from the bottom up
            new = new.replace(f"decoder.up_blocks.{i}.resnets.",
                              f"decoder.up.{blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.",
                              f"decoder.up.{blocks - 1 - i}.upsample.")
        if ".mid_block.attentions.0." in new:
            head, _, rest = new.partition(".mid_block.attentions.0.")
            module, _, param = rest.rpartition(".")
            new = f"{head}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        if "_blocks." in new or "mid_block" in new:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (with or without the ``text_model.`` level, which
    transformers 5.6 dropped) -> ``cond_stage_model.transformer.text_model.*`` keys."""
    return {CLIP_PREFIX + key.removeprefix("text_model."): value for key, value in state.items()}


def diffusers_folder_to_ldm(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder of diffusers ``folder`` in one LDM state dict."""
    folder = Path(folder)

    def part(name: str, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
        config = json.loads((folder / name / "config.json").read_text())
        return load_file(folder / name / weights), config

    unet, unet_config = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = part("vae", "diffusion_pytorch_model.safetensors")
    text, _ = part("text_encoder", "model.safetensors")
    return {
        **unet_to_ldm(unet, unet_config),
        **vae_to_ldm(vae, vae_config),
        **text_encoder_to_ldm(text),
    }


def write_single_file(folder: Path, checkpoint: Path) -> Path:
    """Save diffusers ``folder`` as the LDM ``.safetensors`` ``checkpoint``."""
    state = {k: v.contiguous() for k, v in diffusers_folder_to_ldm(folder).items()}
    save_file(state, checkpoint)
    return checkpoint

