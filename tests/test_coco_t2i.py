"""Stable Diffusion text-to-image: VP adapter, CFG, the coco_t2i task, the one-step SD export and COCO-30k.

Everything runs on a tiny SD pipeline built from configs (UNet2DConditionModel at 8x8 latents, CLIPTextModel
of width 32, a two-level AutoencoderKL, a byte-level CLIP tokenizer written to the test's folder): no downloads.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from diffusers import (AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from fdistill.config import load_config  # noqa: E402
from fdistill.denoisers_vp import CFGDenoiser, VPUNetDenoiser  # noqa: E402
from fdistill.noise import vp_sigmas  # noqa: E402
from fdistill.pipelines import coco_t2i  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "coco_sd15_js.yaml")
PROMPTS = ["a red bus on a street", "two dogs playing in the snow", "a plate of food", "a man riding a horse",
           "a kitchen with a stove", "a cat on a sofa"]


def _tokenizer(max_len=16):
    # CLIP's byte-level alphabet (GPT-2's bytes_to_unicode), with and without the end-of-word marker; no merges
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in cs:
        vocab.setdefault(chr(c), len(vocab))
    for c in cs:
        vocab.setdefault(chr(c) + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def make_tiny_sd(path, prediction_type="epsilon", seed=0):
    torch.manual_seed(seed)
    tok = _tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    # SD1.5's scheduler config (PNDM, scaled_linear 0.00085..0.012, 1000 steps)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six non-square RGB images and a COCO 2014-style captions JSON naming them; a prompts .txt."""
    root = tmp_path_factory.mktemp("coco")
    img_dir = root / "train2014"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        name = f"COCO_train2014_{i:012d}.jpg" if i % 2 else f"COCO_train2014_{i:012d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(img_dir / name)
        images.append({"id": 100 + i, "file_name": name})
        annotations += [{"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": f" {PROMPTS[i]} number {j}\n"}
                        for j in range(2)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return root


def _parts(sd_dir, prediction_type=None):
    unet, sched, vae, te, tok = coco_t2i.load_teacher_parts(str(sd_dir))
    return unet, sched, vae, te, tok


# ----------------------------------------------------------------------------------------------------------------
# the VP adapter


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_adapter_x0_equals_scheduler_x0_on_the_grid(sd_dir, prediction_type):
    unet, _, _, te, tok = _parts(sd_dir)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, prediction_type)
    cond = coco_t2i.encode_prompts(tok, te, PROMPTS[:2])
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(a[1].clone()), with_kwargs=True)
    sigmas = vp_sigmas(sched.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    for t in (0, 20, 500, 980, 999):
        x_vp = torch.randn(2, 4, 8, 8, generator=g)
        s = sigmas[t].expand(2)
        with torch.no_grad():
            x0 = den(x_vp * (1 + s[:, None, None, None] ** 2).sqrt(), s, {"encoder_hidden_states": cond})
            out = unet(x_vp, torch.tensor([t, t]), encoder_hidden_states=cond).sample
        ref = torch.stack([sched.step(out[i:i + 1], t, x_vp[i:i + 1]).pred_original_sample[0] for i in range(2)])
        torch.testing.assert_close(x0, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(sigmas[t])))
        assert torch.equal(seen[-2], torch.tensor([float(t), float(t)]))  # the exact grid timestep
    # between two grid values: a timestep between them, linear in log sigma
    s_mid = (sigmas[500].log() * 0.25 + sigmas[501].log() * 0.75).exp()
    assert float(den.timestep(s_mid.reshape(1))) == pytest.approx(500.75, abs=1e-3)
    assert float(den.timestep(torch.tensor([1e-6]))) == 0 and float(den.timestep(torch.tensor([1e6]))) == 999
    # pure noise: prior_scale makes the VP input N(0, I) at timestep 999
    assert den.prior_scale(float(sigmas[999])) == pytest.approx(float(1 / sched.alphas_cumprod[999].sqrt()), rel=1e-5)
    # the grid survives a dtype cast of the module (it is not a buffer)
    den.to(torch.bfloat16)
    assert den.sigmas.dtype == torch.float32 and torch.equal(den.timestep(sigmas[[20, 980]]), torch.tensor([20., 980.]))


def test_features_from_the_mid_block_and_cut_short(sd_dir):
    unet, sched, _, te, tok = _parts(sd_dir)
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    cond = {"encoder_hidden_states": coco_t2i.encode_prompts(tok, te, PROMPTS[:3])}
    ran_up = []
    unet.up_blocks[0].register_forward_hook(lambda *a: ran_up.append(1))
    x, s = torch.randn(3, 4, 8, 8), vp_sigmas(sched.alphas_cumprod)[[100, 200, 300]]
    with torch.no_grad():
        feats = den(x, s, cond, mode="features")
        x0, feats2 = den(x, s, cond, mode="both")
    assert len(ran_up) == 1  # only the 'both' pass reached the decoder
    assert feats[0].shape == (3, 64, 4, 4)  # mid block: last channel width at 8 / 2 resolution
    torch.testing.assert_close(feats[0], feats2[0])
    torch.testing.assert_close(x0, den(x, s, cond))


# ----------------------------------------------------------------------------------------------------------------
# classifier-free guidance


def test_cfg_scale_one_is_conditional_and_guidance_is_one_batched_pass(sd_dir):
    unet, sched, _, te, tok = _parts(sd_dir)
    inner = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    emb = coco_t2i.encode_prompts(tok, te, PROMPTS[:2])
    uncond = coco_t2i.encode_prompts(tok, te, [""])
    cond = {"encoder_hidden_states": emb}
    batches = []
    unet.register_forward_pre_hook(lambda m, a, kw: batches.append(a[0].shape[0]), with_kwargs=True)
    x, s = torch.randn(2, 4, 8, 8), vp_sigmas(sched.alphas_cumprod)[[300, 700]]
    with torch.no_grad():
        x0_c = inner(x, s, cond)
        x0_u = inner(x, s, {"encoder_hidden_states": uncond.expand(2, -1, -1)})
        batches.clear()
        assert torch.equal(CFGDenoiser(inner, 1.0, uncond)(x, s, cond), x0_c)
        w = 1.75
        cfg = CFGDenoiser(inner, w, uncond)
        guided = cfg(x, s, cond)
        assert batches == [2, 4]  # scale 1: the conditional pass alone; w != 1: one pass over [cond; uncond]
        torch.testing.assert_close(guided, x0_c + (w - 1) * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided, x0_c, atol=1e-3)  # the unconditional pass matters
        feats_c = inner(x, s, cond, mode="features")
        batches.clear()
        feats = cfg(x, s, cond, mode="features")
        g2, feats_both = cfg(x, s, cond, mode="both")
    assert batches == [2, 4]  # features alone: conditional half only
    torch.testing.assert_close(feats[0], feats_c[0])
    torch.testing.assert_close(feats_both[0], feats_c[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g2, guided)
    assert cfg.prior_scale(3.0) == inner.prior_scale(3.0)
