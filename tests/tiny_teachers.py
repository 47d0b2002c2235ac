"""Tiny random-weight SDXL, SD3 and FLUX.1 pipelines of the real diffusers classes, built from configs (no downloads).

Text encoders are transformers models of width 32 (CLIP) / 64 (T5); tokenizers are a byte-level CLIP tokenizer
and a character-level T5 (Unigram) tokenizer, both built in memory. Each builder writes a diffusers folder with
``save_pretrained`` and returns its path: the same layout as the hub repos, so tasks load it like a hub id.
"""

from pathlib import Path

import torch


def clip_tokenizer(max_len: int = 16):
    """CLIP's byte-level alphabet (GPT-2's bytes_to_unicode), with and without the end-of-word marker; no merges."""
    from transformers import CLIPTokenizer

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


def t5_tokenizer(max_len: int = 24):
    """A character-level T5 tokenizer (Unigram over printable ASCII and the word marker)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(32, 127)] + \
        [("\u2581", -1.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_len)


def clip_text(tok, projection: bool, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=tok.model_max_length, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, projection_dim=hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_text(tok, d_model: int = 64, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=16, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def vae(latent_channels: int, seed: int = 0, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **kw)


def tiny_sd3(path, seed: int = 0, num_layers: int = 2, shift: float = 3.0) -> Path:
    """StableDiffusion3Pipeline: SD3Transformer2DModel (4 latent channels, 16x16 latents, patch 2), two CLIPs with
    projection (pooled 32 + 32 = 64), T5 (64 = the CLIPs' width concatenated), SD3's scheduler shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers,
                               attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                               caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                               pos_embed_max_size=16)
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(tok, True, seed=seed + 1), tokenizer=tok,
        text_encoder_2=clip_text(tok, True, seed=seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text(tok3, seed=seed + 3), tokenizer_3=tok3)
    pipe.save_pretrained(path)
    return Path(path)


def tiny_flux(path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """FluxPipeline: FluxTransformer2DModel (4 latent channels packed 2x2 -> 16, one double + one single block,
    guidance embedding as FLUX.1-dev), CLIP (pooled 32), T5 (64), FLUX.1's dynamically shifted scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=sched,
                        vae=vae(4, seed, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                use_post_quant_conv=False),
                        text_encoder=clip_text(tok, False, seed=seed + 1), tokenizer=tok,
                        text_encoder_2=t5_text(tok2, seed=seed + 2), tokenizer_2=tok2)
    pipe.save_pretrained(path)
    return Path(path)


def tiny_sdxl(path, seed: int = 0) -> Path:
    """StableDiffusionXLPipeline: UNet2DConditionModel with SDXL's added conditions (text_time: pooled text
    embeds + 6 time ids), CLIP (32) and CLIP with projection (32), concatenated to cross-attention width 64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon")
    tok = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae(4, seed, scaling_factor=0.13025), unet=unet, scheduler=sched,
                                     text_encoder=clip_text(tok, False, seed=seed + 1), tokenizer=tok,
                                     text_encoder_2=clip_text(tok, True, seed=seed + 2), tokenizer_2=clip_tokenizer(),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    return Path(path)
