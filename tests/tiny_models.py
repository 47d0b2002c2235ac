"""Tiny teachers several tests share, built from configs (no downloads): an EDM teacher (a 16x16, 1-channel,
class-conditional UNet2DModel, 10 classes) and a Stable Diffusion pipeline (UNet2DConditionModel at 8x8 latents,
CLIPTextModel of width 32, a two-level AutoencoderKL, a byte-level CLIP tokenizer)."""

import json
from pathlib import Path

import torch

from tiny_teachers import clip_tokenizer


def tiny_edm_unet(classes: int | None = 10, seed: int = 0, block_out_channels=(32, 64)):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=block_out_channels,
                       layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=classes, attention_head_dim=16, flip_sin_to_cos=True,
                       freq_shift=0, resnet_time_scale_shift="scale_shift")


def tiny_edm_teacher(path, seed: int = 0, block_out_channels=(32, 64)) -> Path:
    """A teacher folder as `fdistill convert-edm` writes one: the UNet plus fdistill_config.json."""
    path = Path(path)
    tiny_edm_unet(seed=seed, block_out_channels=block_out_channels).save_pretrained(path)
    (path / "fdistill_config.json").write_text(json.dumps({"precond": "edm", "sigma_data": 0.5, "resolution": 16}))
    return path


def _tokenizer(max_len=16):
    return clip_tokenizer(max_len)


def make_tiny_sd(path, prediction_type="epsilon", seed=0, unet_config: dict | None = None):
    """``unet_config``: another UNet2DConditionModel config (benchmarks/step.py: SD1.5's at full size); the text
    encoder's width follows its cross_attention_dim."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    unet_config = unet_config or dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=unet_config["cross_attention_dim"],
                                      intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    # SD1.5's scheduler config (PNDM, scaled_linear 0.00085..0.012, 1000 steps)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path
