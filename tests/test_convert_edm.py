"""EDM pickle -> diffusers UNet2DModel conversion.

The tests build EDM-format checkpoints themselves (tests/edm_reference.py): modules pickle exactly as
`torch_utils.persistence` objects do, with EDM's parameter names and random values; a small functional
reimplementation of ADM's math from those names is the reference the converted UNet is checked against.
"""

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from edm_reference import (_Persistent, edm_attention, edm_block, edm_precond, edm_reference_denoiser,
                           fake_torch_utils, flat_state, write_edm_pickle)

from fdistill.convert import edm as edm_mod
from fdistill.commands.convert_edm import main
from fdistill.convert.edm import (adm_unet_config, build_unet, convert_edm, edm_denoise, load_converted,
                                  map_adm_state_dict, read_edm_network)
from fdistill.convert.safe_pickle import UnsafePickleError, safe_load
from fdistill.denoisers import EDMPrecondUNet


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def small_edm(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("edm")
    root = edm_precond()
    marker = d / "module_src_ran"
    # If anything executed the embedded class source, this file would appear.
    type(root).module_src = f"open({str(marker)!r}, 'w').write('ran')\n"
    pkl = d / "edm-tiny-cond-adm.pkl"
    write_edm_pickle(pkl, root)
    type(root).module_src = _Persistent.module_src
    out = d / "converted"
    assert main([str(pkl), str(out)]) == 0
    return dict(root=root, pkl=pkl, out=out, marker=marker, dir=d)


# ----------------------------------------------------------------------------------------------------------
# Reading the pickle


def test_pickle_is_read_as_data_without_running_module_source(small_edm):
    assert not small_edm["marker"].exists()
    net = read_edm_network(small_edm["pkl"])
    assert net.precond_class == "EDMPrecond" and net.model_class == "DhariwalUNet"
    assert net.precond_attrs["sigma_data"] == 0.5
    assert net.model_init_kwargs["model_channels"] == 128 and net.model_init_kwargs["channel_mult"] == [1, 2]
    expected = {k[len("model."):]: v for k, v in flat_state(small_edm["root"]).items()}
    assert set(net.state_dict) == set(expected)
    for k, v in expected.items():
        assert torch.equal(net.state_dict[k], v), k
    assert net.module_attrs["dec.4x4_in0"][1]["num_heads"] == 4
    assert not small_edm["marker"].exists()


def test_diffusers_keys_all_filled_nothing_left_over(small_edm):
    net = read_edm_network(small_edm["pkl"])
    cfg = adm_unet_config(net)
    assert cfg["block_out_channels"] == [128, 256] and cfg["layers_per_block"] == 1
    assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]
    assert cfg["up_block_types"] == ["AttnUpBlock2D", "ResnetUpsampleBlock2D"]
    assert cfg["num_class_embeds"] == 10 and cfg["attention_head_dim"] == 64
    assert cfg["norm_num_groups"] == cfg["attn_norm_num_groups"] == 32
    assert cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["flip_sin_to_cos"] and cfg["freq_shift"] == 0
    mapped, dropped = map_adm_state_dict(net.state_dict, cfg)
    assert dropped == []
    from diffusers import UNet2DModel

    ref = UNet2DModel(**cfg).state_dict()
    assert set(mapped) == set(ref)
    for k, v in ref.items():
        assert mapped[k].shape == v.shape, k
    sd = net.state_dict
    assert torch.equal(mapped["class_embedding.weight"], sd["map_label.weight"].t())
    assert mapped["class_embedding.weight"].shape == (10, 512)
    assert torch.equal(mapped["conv_in.weight"], sd["enc.8x8_conv.weight"])
    assert torch.equal(mapped["down_blocks.0.downsamplers.0.norm1.weight"], sd["enc.4x4_down.norm0.weight"])
    assert torch.equal(mapped["up_blocks.0.upsamplers.0.conv2.weight"], sd["dec.8x8_up.conv1.weight"])
    assert torch.equal(mapped["mid_block.resnets.1.time_emb_proj.weight"], sd["dec.4x4_in1.affine.weight"])
    assert torch.equal(mapped["mid_block.attentions.0.group_norm.bias"], sd["dec.4x4_in0.norm2.bias"])
    assert torch.equal(mapped["up_blocks.0.resnets.1.conv_shortcut.weight"], sd["dec.4x4_block1.skip.weight"])
    # an EDM tensor with no diffusers home is an error, never silently dropped
    with pytest.raises(ValueError, match="no place"):
        map_adm_state_dict({**net.state_dict, "enc.4x4_block0.extra.weight": torch.zeros(1)}, cfg)


def test_fused_qkv_split_matches_attention_by_hand(small_edm):
    unet, _ = load_converted(small_edm["out"])
    sd = read_edm_network(small_edm["pkl"]).state_dict
    attn = unet.mid_block.attentions[0]
    c, heads = 256, 4
    hd = c // heads
    assert attn.heads == heads
    torch.manual_seed(1)
    x = torch.randn(2, c, 4, 4)
    # By hand from the fused conv: output channel (head * hd + ch) * 3 + {0: q, 1: k, 2: v}.
    wq = sd["dec.4x4_in0.qkv.weight"][:, :, 0, 0]
    bq = sd["dec.4x4_in0.qkv.bias"]
    hn = F.group_norm(x, 32, sd["dec.4x4_in0.norm2.weight"], sd["dec.4x4_in0.norm2.bias"], eps=1e-5)
    tok = hn.flatten(2)  # (n, c, hw)
    out_heads = []
    for h in range(heads):
        rows = [[(h * hd + ch) * 3 + j for ch in range(hd)] for j in range(3)]
        q, k, v = (torch.einsum("oc,ncp->nop", wq[r], tok) + bq[r][None, :, None] for r in rows)
        a = torch.softmax(torch.einsum("ncp,ncs->nps", q, k) / math.sqrt(hd), dim=-1)
        out_heads.append(torch.einsum("nps,ncs->ncp", a, v))
    o = torch.cat(out_heads, dim=1)
    wp, bp = sd["dec.4x4_in0.proj.weight"][:, :, 0, 0], sd["dec.4x4_in0.proj.bias"]
    expected = (torch.einsum("oc,ncp->nop", wp, o) + bp[None, :, None]).reshape(x.shape) + x
    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and EDM's reshape-based formulation agrees with the by-hand one
    torch.testing.assert_close(edm_attention(sd, "dec.4x4_in0", x, heads), expected, rtol=1e-4, atol=1e-4)
    # a split that ignored the (head, channel, qkv) interleave would not match
    wrong_q = sd["dec.4x4_in0.qkv.weight"][:c, :, 0, 0]
    assert not torch.allclose(attn.to_q.weight, wrong_q)


def test_one_adm_block_matches_reference(small_edm):
    unet, _ = load_converted(small_edm["out"])
    sd = read_edm_network(small_edm["pkl"]).state_dict
    torch.manual_seed(2)
    emb = torch.randn(2, 512)
    # diffusers blocks apply SiLU to the embedding themselves; EDM applies it once, before all blocks
    emb_edm = F.silu(emb)
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        # encoder block at 4x4 with channel change (128 -> 256), skip projection and attention
        x4 = torch.randn(2, 128, 4, 4)
        got = unet.down_blocks[1].attentions[0](unet.down_blocks[1].resnets[0](x4, emb))
        torch.testing.assert_close(got, edm_block(sd, "enc.4x4_block0", x4, emb_edm), rtol=1e-4, atol=1e-4)
        # downsampling and upsampling blocks
        got = unet.down_blocks[0].downsamplers[0](x, emb)
        torch.testing.assert_close(got, edm_block(sd, "enc.4x4_down", x, emb_edm), rtol=1e-4, atol=1e-4)
        x4 = torch.randn(2, 256, 4, 4)
        got = unet.up_blocks[0].upsamplers[0](x4, emb)
        torch.testing.assert_close(got, edm_block(sd, "dec.8x8_up", x4, emb_edm), rtol=1e-4, atol=1e-4)


def test_converted_teacher_equals_edm_denoiser(small_edm):
    unet, precond = load_converted(small_edm["out"])
    assert precond["precond"] == "edm" and precond["sigma_data"] == 0.5
    assert precond["sigma_min"] == 0.002 and precond["sigma_max"] == 80
    assert precond["label_dim"] == 10 and precond["resolution"] == 8 and precond["source"].endswith(".pkl")
    torch.manual_seed(3)
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 40.0])
    x_t = x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x)
    labels = torch.tensor([0, 7, 9])
    onehot = F.one_hot(labels, 10).float()
    with torch.no_grad():
        expected = edm_reference_denoiser(small_edm["root"], x_t, sigma, onehot)
        got = edm_denoise(unet, precond, x_t, sigma, labels)
        got_vec = edm_denoise(unet, precond, x_t, sigma, onehot)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_vec, got, rtol=1e-5, atol=1e-5)
    # the class training uses (the teacher and both trainable copies) is the same function of its inputs
    den = EDMPrecondUNet(unet, precond["sigma_data"], ())
    with torch.no_grad():
        torch.testing.assert_close(den(x_t, sigma, labels), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(den(x_t, sigma, onehot), expected, rtol=1e-4, atol=1e-4)
        # a label vector that is not one-hot embeds linearly, as in EDM: a mixture, and the zero vector
        mix = 0.5 * onehot + 0.5 * F.one_hot(torch.tensor([1, 2, 3]), 10).float()
        for vec in (mix, torch.zeros_like(onehot)):
            torch.testing.assert_close(den(x_t, sigma, vec),
                                       edm_reference_denoiser(small_edm["root"], x_t, sigma, vec), rtol=1e-4,
                                       atol=1e-4)
    # the network output matters at these sigmas (not just the c_skip x term)
    assert (expected - x_t * (0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25))).abs().mean() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Other inputs


def test_state_dict_and_training_state_inputs_convert_identically(small_edm, tmp_path):
    from safetensors.torch import save_file

    ref_unet, _ = load_converted(small_edm["out"])
    ref = ref_unet.state_dict()
    sd = flat_state(small_edm["root"])  # "model."-prefixed, as EDMPrecond.state_dict() names them
    save_file(sd, tmp_path / "edm.safetensors")
    torch.save({k[len("model."):]: v for k, v in sd.items()}, tmp_path / "edm_unet.pth")
    with fake_torch_utils():  # EDM's training-state-*.pt: torch.save of the persistent network
        torch.save(dict(net=small_edm["root"], optimizer_state={}), tmp_path / "training-state.pt")
    for name in ("edm.safetensors", "edm_unet.pth", "training-state.pt"):
        rec = convert_edm(tmp_path / name, tmp_path / f"out-{name}")
        unet, pre = load_converted(tmp_path / f"out-{name}")
        assert pre["precond_assumed"] == (name != "training-state.pt")
        got = unet.state_dict()
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
        assert rec["source_format"] == ("torch-zip" if name == "training-state.pt" else "state-dict")


def test_augment_weights_are_dropped_and_reported(tmp_path):
    torch.manual_seed(4)
    root = edm_precond(augment_dim=9)
    write_edm_pickle(tmp_path / "aug.pkl", root)
    rec = convert_edm(tmp_path / "aug.pkl", tmp_path / "out")
    assert rec["dropped_keys"] == ["map_augment.weight"]


# ----------------------------------------------------------------------------------------------------------
# Refusals


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _evil_payloads(marker):
    import subprocess

    cmd = f"touch {marker}"
    return {
        "os.system": _Evil(os.system, cmd),
        "builtins.exec": _Evil(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.check_call": _Evil(subprocess.check_call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("which", ["os.system", "builtins.exec", "subprocess.check_call"])
@pytest.mark.parametrize("protocol", [0, 4])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, which, protocol, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_payloads(marker)[which]
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"ema": evil}, f, protocol=protocol)
    out = tmp_path / "out"
    assert main([str(pkl), str(out)]) == 3
    assert not marker.exists()
    assert not out.exists()
    err = capsys.readouterr().err
    assert "refusing to load" in err and "nothing from this file was executed" in err


def test_payload_hidden_inside_network_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = edm_precond()
    root.model.enc["8x8_block0"].evil = _Evil(os.system, f"touch {marker}")
    write_edm_pickle(tmp_path / "evil.pkl", root)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_load(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_ddpmpp_and_other_preconditionings_are_refused(tmp_path):
    torch.manual_seed(5)
    sd = flat_state(edm_precond())
    sd["model.dec.8x8_aux_conv.weight"] = torch.zeros(3, 128, 3, 3)  # SongUNet's output layer
    torch.save(sd, tmp_path / "ddpmpp.pth")
    with pytest.raises(ValueError, match="DDPM\\+\\+"):
        convert_edm(tmp_path / "ddpmpp.pth", tmp_path / "o1")
    write_edm_pickle(tmp_path / "vp.pkl", edm_precond("VPPrecond"))
    with pytest.raises(ValueError, match="only EDMPrecond"):
        convert_edm(tmp_path / "vp.pkl", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_init_kwargs_must_agree_with_tensors(tmp_path):
    root = edm_precond()
    root.model._init_kwargs["num_blocks"] = 2
    write_edm_pickle(tmp_path / "odd.pkl", root)
    with pytest.raises(ValueError, match="disagree.*num_blocks"):
        convert_edm(tmp_path / "odd.pkl", tmp_path / "o")


def test_mixed_groupnorm_group_counts_are_refused(tmp_path):
    sd = {k: torch.zeros(v.shape) for k, v in flat_state(edm_precond(model_channels=64)).items()}
    torch.save(sd, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="group counts"):
        convert_edm(tmp_path / "narrow.pth", tmp_path / "o")


# ----------------------------------------------------------------------------------------------------------
# CLI behaviour


def test_cli_refuses_overwrite_then_force_replaces(small_edm, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main([str(small_edm["pkl"]), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert main([str(small_edm["pkl"]), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists()
    assert {"config.json", "diffusion_pytorch_model.safetensors", "fdistill_config.json"} <= set(os.listdir(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup dirs left


def test_failure_while_writing_leaves_nothing(small_edm, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(edm_mod.json, "dump", boom)
    with pytest.raises(OSError):
        convert_edm(small_edm["pkl"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_help_and_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "never executed" in help_text and "--force" in help_text
    assert main([str(tmp_path / "nope.pkl"), str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.fullsize
def test_fullsize_imagenet_adm_maps_to_reference_config():
    from fdistill.convert.edm import EDMNetwork

    torch.manual_seed(0)
    root = edm_precond(img_resolution=64, model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                       attn_resolutions=[32, 16, 8], label_dim=1000)
    sd = {k[len("model."):]: v.detach() for k, v in root.state_dict().items()}
    unet, cfg, dropped = build_unet(EDMNetwork(state_dict=sd, source="full", source_format="state-dict"))
    assert cfg["block_out_channels"] == [192, 384, 576, 768] and cfg["layers_per_block"] == 3
    assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D"] + ["AttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]
    assert cfg["num_class_embeds"] == 1000 and cfg["attention_head_dim"] == 64 and dropped == []
    n = sum(p.numel() for p in unet.parameters())
    assert n == sum(v.numel() for k, v in sd.items() if not k.endswith("resample_filter"))
    assert 295e6 < n < 297e6
