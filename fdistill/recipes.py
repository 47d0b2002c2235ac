"""Training recipes: the choices around the f-distill loss that differ between DMD2 and the authors' own code.

The loss, the h functions, the clamps, the GAN weight, the discriminator head, CFG and the optimiser are the same
in both; the recipe decides where the ratio bins sit, how the fake score is trained, which noise levels are drawn,
how critic and generator iterations alternate, when the EMA advances, which networks are clipped, the precision,
R1, how the generated batch is conditioned, the ImageNet-64 discriminator's feature layer and the run length.

    recipe: fastgen    NVlabs/FastGen's f-distill (fastgen/methods/distribution_matching/f_distill.py on its DMD2
                       base dmd2.py): what the paper's authors run; FastGen's re-run reports FID 1.11 on ImageNet-64
    recipe: dmd2       DMD2's recipe (Yin et al. 2024, tianweiy/DMD2): this package's behaviour before recipes
                       existed, and the default, so a saved config without ``recipe`` resumes unchanged

A recipe only fills the keys a config leaves out: every row is an ordinary key (``noise.dm_index_min``,
``ratio_norm.bin_spacing`` ...) that a YAML file or ``key=value`` overrides. ``--dry-run`` prints the resolved
values. docs/recipes.md has the table with each row's source in the public code.
"""

from __future__ import annotations

from typing import Any

# Rows for every pipeline: dotted key -> value.
_COMMON: dict[str, dict[str, Any]] = {
    "fastgen": {
        "ratio_norm.bin_spacing": "linear",       # f_distill.py _get_f_div_weighting_h: linear in t, whole range
        "noise.dm_index_min": 2,                  # EDMNoiseSchedule polynomial: int(0.002 * 1000) ..
        "noise.dm_index_max": 998,                # .. int(0.998 * 1000), both ends included
        "objective.denoise_loss": "x0",           # dmd2.py: denoising_score_matching_loss, pred type x0, unweighted
        "objective.disc_fake_noise": "denoise",   # dmd2.py: the fake branch's features at x_t_sg, t
        "noise.disc_levels": "dm",                # .. so the discriminator's levels are the DM term's
        "objective.dmd_eps": 1e-6,                # common_loss.py: 1 / (mean |x - x0_teacher| + 1e-6)
        "objective.r1_gamma": 0.0,                # config_dmd2.py: gan_r1_reg_weight 0
        "schedule.scheme": "fastgen",             # dmd2.py: student iff iteration % student_update_freq == 0
        "schedule.ema_every": "iteration",        # callbacks/ema.py: on_training_step_end, every iteration
        "optim.clip_critic": False,               # configs/callbacks.py: GradClipCallback(model_key="net")
        "gen_cond": "real",                       # dmd2.py: condition from the data batch for every update
    },
    "dmd2": {
        "ratio_norm.bin_spacing": "log_sigma",
        "noise.dm_index_min": 20,
        "noise.dm_index_max": 980,
        "objective.denoise_loss": "edm",
        "objective.disc_fake_noise": "independent",
        "noise.disc_levels": "dm",                # real and generated at independent draws of the DM term's levels
        "objective.dmd_eps": 0.0,
        "objective.r1_gamma": 0.0,
        "schedule.scheme": "dmd2",
        "schedule.ema_every": "generator",
        "optim.clip_critic": True,
        "gen_cond": "random",
    },
}

# Rows that depend on the pipeline as well.
_PER_PIPELINE: dict[tuple[str, str], dict[str, Any]] = {
    ("fastgen", "imagenet64"): {
        "mixed_precision": "no",                  # EDM configs: precision float32, no AMP ..
        "allow_tf32": True,                       # .. with TF32 matmuls (utils/scripts.py)
        "task.feature_modules": ["down_blocks.3"],  # EDM enc.8x8_block2 (feature_indices up to the 8x8 encoder)
        "steps": 120000,                          # config_f_distill_in64.py: max_iter 600k, 1 in 5 a generator step
    },
    ("dmd2", "imagenet64"): {
        "mixed_precision": "auto",
        "allow_tf32": False,
        "task.feature_modules": ["mid_block"],
        "steps": 76000,                           # 380k critic iterations / 5
    },
    ("fastgen", "coco_t2i"): {
        "noise.dm_index_min": 1,                  # SD15 config: t ~ U[0.001, 0.999], index floor(1000 t) in [1, 998]
        "noise.dm_index_max": 998,
        "task.text_mask": True,                   # networks/SD15/network.py: encoder_attention_mask
        "steps": 10000,                           # SD15 config_f_distill.py: max_iter 100k, 1 in 10 a generator step
    },
    ("dmd2", "coco_t2i"): {
        "objective.denoise_loss": "eps",          # DMD2 SD: epsilon MSE, as SD itself was trained
        "objective.r1_gamma": 1.0,                # f-distill paper, SD1.5: R1 gamma 1
        "task.text_mask": False,
        "steps": 6000,
    },
}

RECIPES = tuple(_COMMON)


def recipe_rows(recipe: str, pipeline: str) -> dict[str, Any]:
    """Every key a recipe sets for a pipeline, as dotted key -> value."""
    if recipe not in _COMMON:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return {**_COMMON[recipe], **_PER_PIPELINE.get((recipe, pipeline), {})}


def apply_recipe(data: dict, default_pipeline: str = "toy2d") -> dict:
    """``data`` (a raw config mapping) with every recipe row it leaves out filled in; explicit keys win."""
    recipe = data.get("recipe", "dmd2")
    if not isinstance(recipe, str):
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    out = dict(data)
    for key, value in recipe_rows(recipe, out.get("pipeline", default_pipeline)).items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else ({} if child is None else child)
            if not isinstance(child, dict):
                break  # not a mapping: from_dict reports it
            node[p] = child
            node = child
        else:
            if last not in node:
                node[last] = list(value) if isinstance(value, list) else value
    return out
