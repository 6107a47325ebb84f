"""The offline tiny model: SD2.1-shaped, random weights, built in seconds with no download.

It is *not* Stable Diffusion 2.1: the weights are random, so images are coloured noise. It has
the same structure where it matters to the code around it (v-prediction scheduler config,
linear-projection cross-attention UNet, a CLIP text encoder with 77 positions, a VAE with the
real downsampling factor of 8), so every backend, script and test can run it here.

`python -m backend.models.tiny DIR` saves it as a standard diffusers folder.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

TINY_MODEL_ID = "tiny"
TINY_SEED = 20230725  # the walk-through's date: any fixed value makes the weights reproducible
MAX_TOKENS = 77

# A few hundred words that prompts use; the tokenizer learns its merges from them, so common
# prompt words are one or two tokens, as with the real CLIP vocabulary, not one per letter.
_CORPUS = """
a an the of and with in on at by for from to into over under beside near
photo photograph portrait painting drawing sketch illustration render rendering
digital art artwork concept style oil watercolor pencil charcoal ink anime cartoon
cinematic lighting light dark bright soft hard golden hour sunset sunrise night day
highly detailed detail detailed intricate sharp focus 4k 8k hdr trending artstation
beautiful lovely cute happy sad old young small big large tiny huge giant
cat cats dog dogs bird birds horse fox lion tiger bear wolf owl rabbit dragon
man woman girl boy person people child king queen knight robot astronaut wizard
mountain mountains landscape forest tree trees river lake sea ocean beach sky clouds
city street house castle tower bridge garden flower flowers field snow rain fog
red blue green yellow orange purple pink black white gray grey brown gold silver
wearing sitting standing running flying riding walking looking holding
hat helmet armor dress suit glasses crown sword book cup table chair window
space planet moon sun star stars galaxy nebula futuristic cyberpunk steampunk
fantasy magic ancient medieval modern vintage retro realistic photorealistic
studio professional award winning masterpiece best quality low quality blurry
ugly deformed bad anatomy extra limbs watermark text signature cropped worst
"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_vocab(num_merges: int = 480) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style byte-level BPE vocabulary and merges from the built-in corpus."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    words = collections.Counter(re.findall(r"[a-z0-9]+", _CORPUS.lower()))
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result never varies.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        for w, syms in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer():
    """The tiny model's CLIPTokenizer, built offline (SD2 pads with '!', as its tokenizer does)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab()
    # transformers 5: vocab_file=/merges_file= would silently give an empty tokenizer, and
    # merges must be pairs, not 'a b' strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=MAX_TOKENS)


def scheduler_config() -> dict:
    """SD2.1's scheduler settings (v-prediction), as a DPM++ 2M config."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
        set_alpha_to_one=False,
    )


def build_components(unet_in_channels: int = 4) -> dict:
    """Every module of the tiny pipeline, with weights fixed by TINY_SEED.

    unet_in_channels=9 makes the UNet of a dedicated inpainting checkpoint (latents, mask and masked
    image's latents: 4 + 1 + 4 channels in), for testing the inpaint pipeline's 9-channel path.
    """
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                hidden_act="gelu",  # OpenCLIP-H, as in SD2
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(TINY_SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=unet_in_channels,
            out_channels=4,
            layers_per_block=1,
            # Three levels; cross-attention at 32x32 and 16x16 latents (SD2.1 also has it at
            # 64x64, which alone would make this model several times slower on a CPU).
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(1, 2, 4),  # diffusers' name for the number of heads; head_dim 16
            use_linear_projection=True,
            norm_num_groups=8,
        )
        torch.manual_seed(TINY_SEED + 2)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            # Four levels -> three 2x down/upsamplings: the real factor of 8.
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in scheduler_config().items()
                                               if k not in ("clip_sample", "set_alpha_to_one")})
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae, scheduler=scheduler)


def build_pipeline(dtype=None, unet_in_channels: int = 4):
    """A StableDiffusionPipeline around the tiny components (unet_in_channels: see build_components)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **build_components(unet_in_channels), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(directory: str | Path) -> Path:
    """Save the tiny model as a diffusers folder that plain from_pretrained loads."""
    directory = Path(directory)
    build_pipeline().save_pretrained(directory)
    (directory / "README.md").write_text(
        "# tiny (random weights)\n\nAn SD2.1-shaped pipeline with random weights, made by "
        "`python -m backend.models.tiny`. It produces noise: it is for tests and demos of the plumbing, "
        "not Stable Diffusion 2.1.\n"
    )
    return directory


def main(argv: list[str] | None = None) -> int:
    """CLI: save the tiny model to DIR."""
    parser = argparse.ArgumentParser(prog="python -m backend.models.tiny", description=save.__doc__)
    parser.add_argument("directory", help="folder to write (created if missing)")
    args = parser.parse_args(argv)
    path = save(args.directory)
    print(f"saved the tiny model (random weights, not SD2.1) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
