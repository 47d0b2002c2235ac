"""Optimizer states in checkpoints: one file per optimizer name whatever the run's wrapping.

The trainer keeps one AdamW per network (accelerate's FSDP2 prepares a model with its optimizer at a time) and
stores the fake score's and the discriminator's as one 'critic' state, as a single optimizer over both would;
under FSDP the gathered state comes keyed by parameter names and is stored by index.
"""

import torch

from fdistill import checkpoint as ckpt


def _nets():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), torch.nn.Linear(2, 1)


def _step(params, *opts):
    for opt in opts:
        opt.zero_grad()
    sum((p ** 2).sum() for p in params).backward()
    for opt in opts:
        opt.step()


def _same_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)


def test_two_optimizers_store_as_one_and_load_back(tmp_path):
    f, d = _nets()
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 1e-2}
    one = torch.optim.AdamW(list(f.parameters()) + list(d.parameters()), **kw)
    _step(list(f.parameters()) + list(d.parameters()), one)
    f2, d2 = _nets()
    opt_f, opt_d = torch.optim.AdamW(f2.parameters(), **kw), torch.optim.AdamW(d2.parameters(), **kw)
    _step(list(f2.parameters()) + list(d2.parameters()), opt_f, opt_d)

    merged = ckpt.merge_optim_states([opt_f.state_dict(), opt_d.state_dict()])
    assert [g["params"] for g in merged["param_groups"]] == [[0, 1, 2, 3], [4, 5]]
    for i, st in one.state_dict()["state"].items():  # the same state as one optimizer over both
        for k, v in st.items():
            assert torch.equal(v, merged["state"][i][k]), (i, k)

    ckpt.save_optimizer(merged, tmp_path, "critic")
    parts = ckpt.split_optim_state(ckpt.read_optimizer(tmp_path, "critic"), [4, 2])
    _same_state(parts[0], opt_f.state_dict())
    _same_state(parts[1], opt_d.state_dict())

    # a checkpoint written with one critic optimizer (before the split) loads into the two
    ckpt.save_optimizer(one, tmp_path, "old")
    old = ckpt.split_optim_state(ckpt.read_optimizer(tmp_path, "old"), [4, 2])
    assert [g["params"] for g in old[0]["param_groups"]] == [[0, 1, 2, 3]]
    assert [g["params"] for g in old[1]["param_groups"]] == [[0, 1]]
    torch.optim.AdamW(f2.parameters(), **kw).load_state_dict(old[0])
    torch.optim.AdamW(d2.parameters(), **kw).load_state_dict(old[1])


def test_count_mismatch_is_a_checkpoint_error():
    f, _ = _nets()
    opt = torch.optim.AdamW(f.parameters())
    try:
        ckpt.split_optim_state(opt.state_dict(), [4, 2])
    except ckpt.CheckpointError as e:
        assert "different config" in str(e)
    else:
        raise AssertionError("no error")


def test_names_and_indices_round_trip():
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    by_name = {"state": {n: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), float(i))}
                         for i, n in enumerate(names)},
               "param_groups": [{"lr": 0.1, "params": list(reversed(names))}]}
    by_index = ckpt.optim_state_by_index(by_name, names)
    assert by_index["param_groups"][0]["params"] == [3, 2, 1, 0]
    assert torch.equal(by_index["state"][2]["exp_avg"], torch.full((2,), 2.0))
    back = ckpt.optim_state_by_name(by_index, names)
    assert back["param_groups"] == by_name["param_groups"] and back["state"].keys() == by_name["state"].keys()
    try:
        ckpt.optim_state_by_index(by_name, names[:3])
    except ckpt.CheckpointError as e:
        assert "1.bias" in str(e)
    else:
        raise AssertionError("no error")


def test_states_that_share_memory_are_saved(tmp_path):
    # FSDP1's gathered optimizer state can hold views of one buffer; safetensors refuses shared memory
    buf = torch.arange(8.0)
    sd = {"state": {0: {"exp_avg": buf[:4].view(2, 2), "exp_avg_sq": buf[4:].view(2, 2), "step": torch.tensor(1.0)}},
          "param_groups": [{"lr": 0.1, "params": [0]}]}
    ckpt.save_optimizer(sd, tmp_path, "x")
    back = ckpt.read_optimizer(tmp_path, "x")
    assert torch.equal(back["state"][0]["exp_avg_sq"], buf[4:].view(2, 2))


def test_a_channels_last_conv_saves_and_loads(tmp_path):
    # its weight and AdamW moments have channels_last strides, which safetensors refuses as they are
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    _step(list(conv.parameters()), opt)
    assert not opt.state_dict()["state"][0]["exp_avg"].is_contiguous()
    ckpt.save_module(conv, tmp_path / "conv.safetensors")
    ckpt.save_optimizer(opt, tmp_path, "conv")
    conv2 = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    ckpt.load_module(conv2, tmp_path / "conv.safetensors")
    opt2 = torch.optim.AdamW(conv2.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.read_optimizer(tmp_path, "conv"))
    for a, b in zip(conv.parameters(), conv2.parameters()):
        assert torch.equal(a, b)
    _same_state(opt2.state_dict(), opt.state_dict())
    _step(list(conv.parameters()), opt)  # and the next step is the same
    _step(list(conv2.parameters()), opt2)
    for a, b in zip(conv.parameters(), conv2.parameters()):
        assert torch.equal(a, b)


def test_a_run_written_before_a_config_field_existed_still_resumes(tmp_path):
    import json

    import pytest

    from fdistill.config import DistillConfig, to_dict
    from fdistill.trainer import _check_resume_config

    saved = to_dict(DistillConfig())
    del saved["optim"]["grad_accum"]  # as written before optim.grad_accum was added
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "ckpt-00000001").mkdir()  # a run with a checkpoint: one to protect
    (tmp_path / "ckpt-00000001" / "meta.json").write_text(json.dumps({"gen_step": 1}))
    _check_resume_config(tmp_path, DistillConfig())  # the new field at its default: same run
    cfg = DistillConfig()
    cfg.optim.grad_accum = 2
    with pytest.raises(ValueError, match="optim"):
        _check_resume_config(tmp_path, cfg)
