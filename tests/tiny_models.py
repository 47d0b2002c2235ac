"""The tiny EDM teacher several tests share: a 16x16, 1-channel, class-conditional UNet2DModel (10 classes)."""

import json
from pathlib import Path

import torch


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
