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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size and pooled-text conditioning
    "add_embedding.linear_2": "label_emb.0.2",
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



SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
_OPENCLIP_TOP = {  # transformers CLIPTextModelWithProjection -> OpenCLIP, outside the layers
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def text_encoder_to_open_clip(state: dict[str, torch.Tensor], prefix: str = SDXL_OPENCLIP_PREFIX,
                              ) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` keys -> OpenCLIP's (``resblocks``, one
    ``in_proj`` for q, k and v, ``text_projection`` transposed): the reverse of diffusers'
    ``convert_open_clip_checkpoint``, as SDXL checkpoints hold their second text encoder."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj",
                                                                        "v_proj"):
                if rest.startswith("self_attn.q_proj."):  # q, k and v in one in_proj
                    kind = rest.rpartition(".")[2]
                    parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"]
                             for p in ("q", "k", "v")]
                    out[block + f"attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            for hf, oc in _OPENCLIP_LAYER:
                if rest.startswith(hf + "."):
                    out[block + oc + rest[len(hf):]] = value
                    break
            else:
                raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    return out


def sdxl_folder_to_ldm(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and both text encoders of diffusers SDXL ``folder`` in one state dict
    laid out as Stability's SDXL checkpoints (and civitai's SDXL fine-tunes) are."""
    folder = Path(folder)

    def part(name: str, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
        config = json.loads((folder / name / "config.json").read_text())
        return load_file(folder / name / weights), config

    unet, unet_config = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = part("vae", "diffusion_pytorch_model.safetensors")
    clip, _ = part("text_encoder", "model.safetensors")
    open_clip, _ = part("text_encoder_2", "model.safetensors")
    return {
        **unet_to_ldm(unet, unet_config),
        **vae_to_ldm(vae, vae_config),
        **{SDXL_CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in clip.items()},
        **text_encoder_to_open_clip(open_clip),
    }


def write_sdxl_single_file(folder: Path, checkpoint: Path) -> Path:
    """Save diffusers SDXL ``folder`` as the single-file ``.safetensors`` ``checkpoint``."""
    state = {k: v.contiguous() for k, v in sdxl_folder_to_ldm(folder).items()}
    save_file(state, checkpoint)
    return checkpoint
