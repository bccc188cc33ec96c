"""Build tiny random-weight diffusers pipelines in code (text-to-image, inpainting, x4 and
latent upscalers) and save them to folders.

Used by the diffusers generator tests: nothing is downloaded, and the saved folder goes through
the same ``from_pretrained(local_files_only=True)`` path as a real model. Not a test module.
"""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: Path) -> Path:
    """A CLIP BPE vocabulary of single bytes (with and without ``</w>``) plus a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("a", "t"), ("p", "h"), ("o", "f</w>"), ("t", "o</w>")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def make_vae_near_identity(vae) -> None:
    """Set a tiny ``AutoencoderKL``'s weights so decode(encode(x)) keeps x's spatial structure.

    Random VAE weights map every image to much the same texture, so image-to-image could not
    stay near its parent. Here every residual branch and attention output is zeroed (identity
    blocks), shortcuts, up/down-sampling and in/out convolutions copy the first channels (a 2x2
    box average when downsampling), and the posterior's log-variance is -30 (sampling = mean).
    Only the GroupNorm + SiLU before each ``conv_out`` stays non-linear (monotone per channel).
    """
    import torch
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    def copy_channels(conv: torch.nn.Conv2d, taps: list[tuple[int, int]]) -> None:
        n = min(conv.in_channels, conv.out_channels)
        for c in range(n):
            for i, j in taps:
                conv.weight[c, c, i, j] = 1.0 / len(taps)

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D) and module.conv_shortcut is not None:
                copy_channels(module.conv_shortcut, [(0, 0)])
            elif isinstance(module, Downsample2D) and module.conv is not None:
                copy_channels(module.conv, [(0, 0), (0, 1), (1, 0), (1, 1)])
            elif isinstance(module, Upsample2D) and module.conv is not None:
                copy_channels(module.conv, [(1, 1)])
        center = [(1, 1)]
        copy_channels(vae.encoder.conv_in, center)
        copy_channels(vae.decoder.conv_in, center)
        copy_channels(vae.decoder.conv_out, center)
        latent = vae.config.latent_channels
        for c in range(latent):
            vae.encoder.conv_out.weight[c, c, 1, 1] = 1.0
        vae.encoder.conv_out.bias[latent:] = -30.0  # log-variance: a deterministic posterior
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                copy_channels(conv, [(0, 0)])


def _tiny_unet(in_channels: int = 4, out_channels: int = 4, **extra):
    """A tiny ``UNet2DConditionModel`` (two blocks, cross-attention dim 32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        **extra,
    )


def _tiny_vae(blocks: int = 2, scaling_factor: float = 1.0):
    """A tiny near-identity ``AutoencoderKL`` whose scale factor is ``2 ** (blocks - 1)``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=[32] * (blocks - 1) + [64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
    )
    make_vae_near_identity(vae)
    return vae


def _tiny_text(folder: Path):
    """A tiny CLIP tokenizer (saved next to ``folder``) and text encoder (hidden size 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")), model_max_length=77
    )
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=tokenizer.eos_token_id,
        vocab_size=1000,
        max_position_embeddings=77,
    )
    return tokenizer, CLIPTextModel(text_config)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random-weight ``StableDiffusionPipeline`` (sample size 32) to ``folder``.

    Parameters
    ----------
    folder : str or Path
        Target directory (created); it ends up in diffusers' ``save_pretrained`` layout.
    seed : int, default 0
        torch seed for the random weights.

    Returns
    -------
    Path
        The folder, loadable with ``StableDiffusionPipeline.from_pretrained(folder)``.
    """
    from diffusers import StableDiffusionPipeline

    return _save_sd_pipeline(StableDiffusionPipeline, folder, seed, unet_in_channels=4)


def _save_sd_pipeline(pipeline_class, folder: str | Path, seed: int, unet_in_channels: int) -> Path:
    """Build a tiny Stable Diffusion pipeline of ``pipeline_class`` and save it to ``folder``."""
    import torch

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = _tiny_unet(in_channels=unet_in_channels)
    vae = _tiny_vae()
    tokenizer, text_encoder = _tiny_text(folder)
    pipe = pipeline_class(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_inpaint_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionInpaintPipeline`` to ``folder``: its UNet takes 9 channels
    (4 noisy latents + 1 mask + 4 latents of the masked image), like SD inpainting checkpoints."""
    from diffusers import StableDiffusionInpaintPipeline

    return _save_sd_pipeline(StableDiffusionInpaintPipeline, folder, seed, unet_in_channels=9)


def build_tiny_upscaler(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionUpscalePipeline`` (x4, like stable-diffusion-x4-upscaler).

    The UNet takes 7 channels (4 latents + the 3-channel noised low-res image) and the noise
    level as a class label (1000 classes); the VAE has three blocks, so its decoder upsamples
    the low-res-sized latents 4x; ``scaling_factor`` is the x4 upscaler's 0.08333.
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = _tiny_unet(in_channels=7, num_class_embeds=1000)
    vae = _tiny_vae(blocks=3, scaling_factor=0.08333)
    tokenizer, text_encoder = _tiny_text(folder)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=_ddim(),
        max_noise_level=350,
    )
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_latent_upscaler(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionLatentUpscalePipeline`` (x2, like sd-x2-latent-upscaler).

    The UNet takes 8 channels (4 latents + 4 latents of the low-res image, upsampled), returns
    5 (the pipeline drops the last) and is conditioned on a 160-wide timestep vector (128 for
    the noise level + the 32-wide pooled text embedding).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = _tiny_unet(in_channels=8, out_channels=5, time_cond_proj_dim=160)
    vae = _tiny_vae()
    tokenizer, text_encoder = _tiny_text(folder)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe.save_pretrained(str(folder))
    return folder
