"""Tiny VAE decoders (TAESD) for better live previews: ``RENDERFARM_PREVIEW_METHOD=taesd``.

TAESD (madebyollin/taesd) is a ~1 M-parameter VAE trained to decode the latents a denoiser
works on (no scaling or shift first: ``AutoencoderTiny``'s ``scaling_factor`` is 1) into an
image 8x their size. Each model family names the TAESD it takes (``Family.taesd``): ``taesd``
for SD 1.x, ``taesdxl`` for SDXL, ``taef1`` for Flux (16 latent channels, unpacked from Flux's
2x2 patches first, as diffusers' ``FluxPipeline._unpack_latents`` does).

Where the weights go, in the models folder (``RENDERFARM_MODELS_DIR``), as users of diffusers,
ComfyUI and A1111 already have them:

- ``vae_approx/<name>/``: a diffusers ``AutoencoderTiny`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``, as the hub's ``madebyollin/taesd``, ``taesdxl`` and
  ``taef1`` hold them); only its decoder is used;
- ``vae_approx/<name>_decoder.safetensors`` (or ``.pth``): the decoder-only file ComfyUI
  (``models/vae_approx``) and A1111 (``models/VAE-approx``) use, in madebyollin's
  ``taesd.py`` layout (the standard 64-channel decoder).

A folder wins over a file. Weights are looked up at the start of each job's render, so weights
dropped in later are used by the next job without a restart.

The cost is bounded: the latents are first shrunk (area average) to at most
:data:`MAX_LATENT_SIDE` a side, so a preview is at most :data:`MAX_SIDE` pixels a side whatever
the job's size; decodes run one at a time in the preview thread, never on the render thread;
and a group's previews are spaced out so that their decodes take at most 2 % of the time
(worker/previews.py ``TAESD_SHARE``): every ``RENDERFARM_PREVIEW_SECONDS`` on a GPU (a decode
takes milliseconds), about one a minute or two on a CPU (seconds each).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("renderfarm.worker")

FOLDER = "vae_approx"  #: under the models folder
MAX_SIDE = 256  #: longest side of a TAESD preview in pixels
MAX_LATENT_SIDE = MAX_SIDE // 8
#: Latent channels of each TAESD (a decoder-only file has no config).
LATENT_CHANNELS = {"taesd": 4, "taesdxl": 4, "taef1": 16}
FILE_SUFFIXES = (".safetensors", ".pth")


def find(models_dir: Path, name: str) -> Path | None:
    """The weights of TAESD ``name`` in ``models_dir``: a diffusers folder, else a
    decoder-only file (see the module's text); None where there are none."""
    base = Path(models_dir) / FOLDER
    folder = base / name
    if (folder / "config.json").is_file():
        return folder
    for suffix in FILE_SUFFIXES:
        path = base / f"{name}_decoder{suffix}"
        if path.is_file():
            return path
    return None


def preview_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the TAESD preview of a ``width`` x ``height`` image: 8x its latent
    size after the latents are shrunk to at most :data:`MAX_LATENT_SIDE` a side."""
    w, h = latent_size(width, height)
    return 8 * w, 8 * h


def latent_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) the latents of a ``width`` x ``height`` image are shrunk to before decoding."""
    w, h = max(1, width // 8), max(1, height // 8)
    scale = min(1.0, MAX_LATENT_SIDE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _decoder_config(latent_channels: int) -> dict:
    """``DecoderTiny`` arguments of the standard TAESD decoder (``AutoencoderTiny``'s
    defaults, as madebyollin's ``taesd.py`` ``Decoder``)."""
    return {"in_channels": latent_channels, "out_channels": 3, "num_blocks": (3, 3, 3, 1),
            "block_out_channels": (64, 64, 64, 64), "upsampling_scaling_factor": 2,
            "act_fn": "relu", "upsample_fn": "nearest"}


def diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A madebyollin ``taesd.py`` decoder's state dict (``nn.Sequential`` indices from 0, the
    first being the parameterless ``Clamp``) in ``DecoderTiny.layers`` names: every index one
    less, as diffusers' ``convert_tiny_autoencoder_to_diffusers.py`` does."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest:
            raise ValueError(f"tensor {key!r} is not of a taesd.py decoder (no layer index)")
        out[f"{int(index) - 1}.{rest}"] = value
    return out


def load_decoder(path: Path, name: str) -> torch.nn.Module:
    """The decoder of TAESD ``name`` from ``path`` (:func:`find`), float32 on the CPU, in eval
    mode: called with latents, it returns images in [-1, 1]. ``ValueError`` naming the file when
    its tensors do not fit."""
    from diffusers import AutoencoderTiny
    from diffusers.models.autoencoders.vae import DecoderTiny

    path = Path(path)
    if path.is_dir():
        decoder = AutoencoderTiny.from_pretrained(path, local_files_only=True).decoder
    else:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        decoder = DecoderTiny(**_decoder_config(LATENT_CHANNELS[name]))
        try:
            decoder.layers.load_state_dict(diffusers_keys(state))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: not a {name} decoder ({str(exc)[:300]})") from exc
    return decoder.float().eval().requires_grad_(False)


class Decoder:
    """TAESD ``name``'s decoder from ``path``, loaded on first use (in the preview thread)."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.failed: str | None = None  #: why it could not be loaded, once it could not
        self._modules: dict[torch.device, torch.nn.Module] = {}  # one copy per device
        #: Seconds one picture's decode takes (a moving average; 0 before the first): what
        #: spaces the previews out (worker/previews.py ``TAESD_SHARE``).
        self.seconds = 0.0
        self._lock = threading.Lock()

    def module(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The decoder on ``device`` (float32), loaded on first use."""
        device = torch.device(device)
        with self._lock:
            if self.failed:
                raise RuntimeError(self.failed)
            if device not in self._modules:
                try:
                    self._modules[device] = load_decoder(self.path, self.name).to(device)
                except Exception as exc:
                    self.failed = f"{type(exc).__name__}: {exc}"
                    raise
                log.info("live previews: %s loaded from %s on %s", self.name, self.path, device)
            return self._modules[device]

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8 on the CPU, decoded on the latents'
        device: shrunk to the latent size of ``size`` = (W, H) // 8 first (area average),
        decoded, mapped from [-1, 1] to 0..255."""
        module = self.module(latents.device)
        x = latents.detach().float()
        if x.shape[1] != module.layers[0].in_channels:
            raise ValueError(f"latents have {x.shape[1]} channels, {self.name} takes "
                             f"{module.layers[0].in_channels}")
        target = (size[1] // 8, size[0] // 8)
        if tuple(x.shape[2:]) != target:
            x = torch.nn.functional.interpolate(x, size=target, mode="area")
        started = time.perf_counter()
        with torch.inference_mode():
            images = module(x)
        rgb = images.permute(0, 2, 3, 1)
        out = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        took = (time.perf_counter() - started) / max(1, len(x))
        self.seconds = took if not self.seconds else 0.7 * self.seconds + 0.3 * took
        return out


def make_random(name: str, directory: Path, seed: int = 0, small: bool = False) -> Path:
    """A diffusers ``AutoencoderTiny`` folder for TAESD ``name`` with seeded random weights, in
    ``directory`` (for tests and benchmarks: nothing is downloaded). ``small``: 8 channels and
    one block per stage instead of TAESD's 64 and (3, 3, 3, 1) (the same 8x upscale, for fast
    tests); otherwise TAESD's own shapes, so it costs what the real one costs."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    shape = ({"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4,
              "num_encoder_blocks": (1,) * 4, "num_decoder_blocks": (1,) * 4} if small else {})
    model = AutoencoderTiny(latent_channels=LATENT_CHANNELS[name], **shape)
    # Random ReLU layers give a nearly black picture: the last convolution is rescaled so that
    # unit-variance latents decode to mid-grey with visible structure (std ~0.25 of the range).
    last = model.decoder.layers[-1]
    with torch.no_grad():
        sample = model.decoder.layers[:-1](torch.randn(1, LATENT_CHANNELS[name], 16, 16))
        spread = last(sample).std().clamp_min(1e-6)
        last.weight.mul_(0.25 / spread)
        last.bias.fill_(0.5)
    model.save_pretrained(directory)
    return Path(directory)
