"""`--model sd21-random`: the full SD2.1-base architecture with random weights, built with no download.

Latency does not depend on weight values, so this measures real-size SD2.1 speed on any machine
(a GPU without Hub access, a CI box). The configs are those of stable-diffusion-2-1-base: UNet
865M parameters (320/640/1280/1280 channels, linear-projection cross-attention of width 1024),
OpenCLIP-H text encoder (23 layers used, hidden 1024), the SD VAE (128/256/512/512). Images are
noise: it is not Stable Diffusion 2.1, and the app says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tiny import build_tokenizer, scheduler_config

if TYPE_CHECKING:
    import torch

SD21_RANDOM_ID = "sd21-random"


def unet_config() -> dict:
    """stable-diffusion-2-1-base's unet/config.json (the keys that shape the network)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        upcast_attention=False, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    )


def text_encoder_config(vocab_size: int) -> dict:
    """OpenCLIP ViT-H/14's text tower as SD2 ships it (the last layer dropped: 23 of 24)."""
    return dict(vocab_size=vocab_size, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


def vae_config() -> dict:
    """The SD VAE."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def _randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill weights in place, fast on any device: norms 1/0, others small normal noise."""
    import torch  # only when the model is built: the catalog (and compile.py --help) import this module for its id

    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)


def build_pipeline(dtype: torch.dtype | None = None, device: str = "cpu"):
    """The random-weight SD2.1-base pipeline (fp32 unless `dtype`), made directly on `device` (meta init, no CPU
    copy)."""
    import torch  # only when the model is built: the catalog (and compile.py --help) import this module for its id
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = dtype or torch.float32


    tokenizer = build_tokenizer()
    generator = torch.Generator(device=device).manual_seed(21)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text_encoder_config(len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    parts = []
    for module in (unet, vae, text_encoder):
        module = module.to_empty(device=device)
        _randomize_(module, generator)
        # Buffers (position ids) were on meta too: rebuild them for real.
        for name, buf in list(module.named_buffers()):
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        parts.append(module.to(dtype=dtype).eval().requires_grad_(False))
    unet, vae, text_encoder = parts
    config = {**scheduler_config(), "prediction_type": "epsilon"}  # 2-1-base predicts epsilon
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in config.items()
                                               if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
