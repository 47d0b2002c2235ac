"""Configs and the command line of fdistill.lm."""

import dataclasses
from pathlib import Path

import pytest

from fdistill.commands.lm import main
from fdistill.lm.config import (CONFIGS, ConfigError, DemoConfig, DPHConfig, DPOConfig, FDPGConfig, field_docs,
                                load_config)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm"


def test_overrides_are_typed():
    cfg = load_config(DPOConfig, None, ["lr=1e-4", "steps=7", "precompute_ref_logps=true", "divergence=alpha:0.5",
                                        "ref_model=null"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.steps == 7 and cfg.precompute_ref_logps is True and cfg.divergence == "alpha:0.5"
    assert cfg.ref_model is None
    demo = load_config(DemoConfig, None, ["fdpo_divergences=js,forward_kl", "methods=[fdpo]"])
    assert demo.fdpo_divergences == ["js", "forward_kl"] and demo.methods == ["fdpo"]


@pytest.mark.parametrize("bad", ["steps=1.5", "steps=abc", "precompute_ref_logps=maybe", "beta=[1, 2]"])
def test_bad_values_name_the_key(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(DPOConfig, None, [bad])


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'bta'.*Did you mean 'beta'"):
        load_config(DPOConfig, None, ["bta=0.3"])
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.2\nlearning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(DPOConfig, path)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DPOConfig, None, ["beta"])
    # a key of another method is unknown here
    with pytest.raises(ConfigError, match="eta"):
        load_config(FDPGConfig, None, ["eta=0.1"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_configs_load_and_are_complete(name):
    path = CONFIG_DIR / f"{name}.yaml"
    text = path.read_text()
    cfg = load_config(CONFIGS[name], path)
    for f in dataclasses.fields(CONFIGS[name]):
        assert f"\n{f.name}:" in text, f"{path} lacks {f.name}"
    # overrides win over the file
    key = "seed"
    assert load_config(CONFIGS[name], path, [f"{key}=5"]).seed == 5
    assert cfg.seed == 0


def test_every_method_field_is_documented():
    for cls in (DPOConfig, FDPGConfig, DPHConfig):
        docs = field_docs(cls)
        for key in ("beta", "divergence", "eta", "clip_eps", "target", "scorer", "alpha"):
            if key in [f.name for f in dataclasses.fields(cls)]:
                assert key in docs and len(docs[key]) > 10, (cls, key)


def test_cli_help_and_errors(capsys):
    assert main(["dph", "--help"]) == 0
    out = capsys.readouterr().out
    assert "DPH-RL" in out and "near_perfect_threshold" in out and "eta" in out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("dpo", "tdpo", "fdpg", "dph", "demo"))
    assert main(["dpo", "bet=0.3"]) == 2
    assert "bet" in capsys.readouterr().err
    assert main(["dpo", "not-a-file-or-override"]) == 2
    assert main([]) == 2


def test_cli_dry_run(capsys):
    assert main(["fdpg", str(CONFIG_DIR / "fdpg.yaml"), "divergence=forward_kl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "divergence: forward_kl" in out and "target: gdc" in out
