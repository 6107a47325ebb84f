"""The tiny model: SD2.1-shaped, deterministic, and a standard diffusers folder."""

import subprocess
import sys

import numpy as np
import torch

from backend.models import tiny


def test_shape_matches_sd21():
    pipe = tiny.build_pipeline()
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.unet.config.use_linear_projection is True
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a lovely cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 5  # common prompt words are single tokens, as with the real vocabulary


def test_weights_are_fixed():
    a, b = tiny.build_pipeline(), tiny.build_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        for (ka, va), (kb, vb) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items()):
            assert ka == kb and torch.equal(va, vb), f"{name}.{ka} differs between builds"


def test_saved_folder_loads_in_plain_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "backend.models.tiny", str(out)], capture_output=True, text=True,
                          check=True)
    assert "not SD2.1" in done.stdout
    loaded = StableDiffusionPipeline.from_pretrained(out)
    built = tiny.build_pipeline()
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    x = loaded("a lovely cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    y = built("a lovely cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert x.shape == (1, 64, 64, 3)
    assert np.abs(x - y).max() < 1e-5


def test_the_old_entry_point_still_saves_and_says_where_the_model_moved(tmp_path):
    """`python -m backend.tiny DIR` (older docs) still works, and names the new module."""
    done = subprocess.run([sys.executable, "-m", "backend.tiny", str(tmp_path / "tiny")], capture_output=True,
                          text=True, check=True)
    assert "moved to backend.models.tiny" in done.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()
