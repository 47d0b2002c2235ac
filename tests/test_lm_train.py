"""Model plumbing, trainers and a tiny demo of fdistill.lm, on tiny GPT-2s built from configs (offline)."""

import json
import math
import sys
import types

import pytest
import torch

from fdistill.lm import toy
from fdistill.lm.config import DemoConfig, DPHConfig, DPOConfig, FDPGConfig, TDPOConfig
from fdistill.lm.evaluate import pass_at_k
from fdistill.lm.modeling import build_batch, load_causal_lm, response_texts, sample, token_logps_of
from fdistill.lm.tokenizer import CharTokenizer, load_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: more threads only contend on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lm")
    tok = toy.tokenizer()
    model = toy.build_model(tok, n_layer=1, n_embd=32, n_head=2, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _common(tmp_path, model, **kw):
    return {**dict(out=str(tmp_path / "run"), model=model, steps=2, eval_samples=2, eval_prompts="toy", threads=1,
                   log_every=100), **kw}


# --- tokenizer, batching, sampling ------------------------------------------------------------------------------

def test_char_tokenizer(tmp_path):
    tok = CharTokenizer("0123456789:")
    ids = tok.encode("13:418")
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == "13:418"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<bos>")
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x")
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, CharTokenizer) and again.encode("07:") == tok.encode("07:")


def test_padding_does_not_change_log_probs(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompts = [tok.encode("5:"), tok.encode("13:"), tok.encode("1")]
    responses = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in ("418", "9", "12345")]
    batch = build_batch(prompts, responses, tok.pad_token_id)
    lp, mask = token_logps_of(model, batch)
    assert mask.sum(-1).tolist() == [4, 2, 6]
    for i in range(3):
        alone = build_batch([prompts[i]], [responses[i]], tok.pad_token_id)
        lp1, m1 = token_logps_of(model, alone)
        torch.testing.assert_close(lp[i].sum(), lp1.sum(), rtol=1e-5, atol=1e-5)
        # against the plain HF forward without any padding
        ids = torch.tensor([prompts[i] + responses[i]])
        logits = model(ids).logits[0, :-1].log_softmax(-1)
        direct = logits[len(prompts[i]) - 1:].gather(-1, ids[0, len(prompts[i]):, None]).sum()
        torch.testing.assert_close(lp[i].sum(), direct, rtol=1e-5, atol=1e-5)


def test_sampling_is_from_the_model_distribution(tiny_model):
    # no top-k / top-p: the first sampled token follows softmax(logits) exactly
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompt = tok.encode("13:")
    n = 4000
    g = torch.Generator().manual_seed(0)
    batch = sample(model, [prompt] * n, 1, tok.eos_token_id, tok.pad_token_id, generator=g)
    first = batch.input_ids[:, len(prompt)]
    probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1).detach()
    freq = torch.bincount(first, minlength=probs.numel()).double() / n
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)


def test_sampled_responses_stop_at_eos(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    batch = sample(model, [tok.encode("13:"), tok.encode("7:")] * 20, 6, tok.eos_token_id, tok.pad_token_id,
                   generator=torch.Generator().manual_seed(1))
    for ids, rm in zip(batch.input_ids, batch.response_mask):
        toks = ids[rm.bool()].tolist()
        assert len(toks) <= 6
        if tok.eos_token_id in toks:
            assert toks.index(tok.eos_token_id) == len(toks) - 1  # nothing scored after eos
    texts = response_texts(tok, batch)
    assert len(texts) == 40 and all("<" not in t for t in texts)


def test_pass_at_k_matches_brute_force():
    from itertools import combinations

    for n, c, k in [(6, 2, 3), (8, 0, 2), (5, 5, 1), (7, 3, 7)]:
        items = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(items[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pass_at_k(4, 0, 8)  # undefined, not 1


def test_toy_verifier_and_pairs():
    assert toy.verify("13:", "418") == 1.0 and toy.verify("13:", "419") == 0.0
    assert toy.verify("13:", "4180") == 0.0 and toy.verify("13:", "4a8") == 0.0
    assert all(toy.verify(toy.prompt_for(t), s) == 1.0 for t in toy.TARGETS for s in toy.solutions(t))
    assert min(len(toy.solutions(t)) for t in toy.TARGETS) == 21
    for p in toy.preference_pairs(50, seed=3):
        assert toy.verify(p["prompt"], p["chosen"]) == 1.0 and toy.verify(p["prompt"], p["rejected"]) == 0.0


# --- trainers ---------------------------------------------------------------------------------------------------

def _final_weights(path):
    return {k: v.clone() for k, v in load_causal_lm(path).state_dict().items()}


def test_dpo_trainer_and_precomputed_reference(tmp_path, tiny_model):
    from fdistill.lm.trainers import train_dpo

    res = train_dpo(DPOConfig(**_common(tmp_path / "a", tiny_model, toy_pairs=48, batch_size=8, divergence="js")),
                    log=None)
    res2 = train_dpo(DPOConfig(**_common(tmp_path / "b", tiny_model, toy_pairs=48, batch_size=8, divergence="js",
                                         precompute_ref_logps=True)), log=None)
    out = tmp_path / "a" / "run"
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "pairs.jsonl", "final/config.json",
                 "final/char_tokenizer.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step
    assert 0 <= res["eval"]["all"]["reward"] <= 1
    # the same run with reference log-probs computed up front trains the same weights
    w1, w2 = _final_weights(res["final"]), _final_weights(res2["final"])
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)
    assert any((w1[k] - _final_weights(tiny_model)[k]).abs().max() > 0 for k in w1)  # it did train


def test_tdpo_trainer(tmp_path, tiny_model):
    from fdistill.lm.trainers import train_dpo

    res = train_dpo(TDPOConfig(**_common(tmp_path, tiny_model, toy_pairs=32, batch_size=8, variant=2)), log=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["seq_kl_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[1]["seq_kl_chosen"] > 0  # after one update the policy has moved
    with pytest.raises(ValueError, match="precompute|variant"):
        train_dpo(TDPOConfig(**_common(tmp_path, tiny_model, variant=3)), log=None)
    assert "eval" in res


@pytest.fixture
def digit_reward(monkeypatch):
    mod = types.ModuleType("lm_test_scorers")
    mod.first_digit = lambda p, y: float(y[0]) / 9 if y[:1].isdigit() else -1.0
    monkeypatch.setitem(sys.modules, "lm_test_scorers", mod)
    return "lm_test_scorers:first_digit"


def test_fdpg_rlhf_target(tmp_path, tiny_model, digit_reward):
    from fdistill.lm.trainers import train_fdpg

    train_fdpg(FDPGConfig(**_common(tmp_path, tiny_model, samples_per_prompt=4, prompts_per_step=2, target="rlhf",
                                    scorer=digit_reward, beta=0.5, eval_prompts="")), log=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # a(x) exp(r/beta) has full support: every log Z is finite
    state = json.loads((tmp_path / "run" / "fdpg_state.json").read_text())
    assert all(math.isfinite(v) for v in state["log_z"].values()) and len(rows) == 2


def test_fdpg_trainer(tmp_path, tiny_model):
    from fdistill.lm.trainers import train_fdpg

    res = train_fdpg(FDPGConfig(**_common(tmp_path, tiny_model, samples_per_prompt=4, prompts_per_step=4,
                                          divergence="forward_kl")), log=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    state = json.loads((tmp_path / "run" / "fdpg_state.json").read_text())
    assert len(state["log_z"]) == 8  # two steps of four prompts, cycled without repetition
    load_causal_lm(res["final"])
    with pytest.raises(ValueError, match="target"):
        train_fdpg(FDPGConfig(**_common(tmp_path, tiny_model, target="bogus")), log=None)


@pytest.fixture
def even_verifier(monkeypatch):
    # every answer to an even target passes (those prompts become near-perfect); for odd targets, answers that
    # start with an even digit do, so that GRPO groups of an untrained model have a signal and the policy moves
    mod = types.ModuleType("lm_test_verifiers")
    mod.even_always = lambda p, y: 1.0 if toy.target_of(p) % 2 == 0 else float(y[:1] in tuple("02468"))
    monkeypatch.setitem(sys.modules, "lm_test_verifiers", mod)
    return "lm_test_verifiers:even_always"


def test_dph_trainer_split_and_stored_reference(tmp_path, tiny_model, even_verifier):
    from safetensors.torch import load_file

    from fdistill.lm.trainers import train_dph

    res = train_dph(DPHConfig(**_common(tmp_path, tiny_model, verifier=even_verifier, presample=4, group_size=4,
                                        prompts_per_step=2, ref_batch_size=16, divergence="js")), log=None)
    out = tmp_path / "run"
    split = json.loads((out / "dph_split.json").read_text())
    evens = [p for p in toy.prompts() if toy.target_of(p) % 2 == 0]
    assert split["near_perfect"] == evens
    assert set(split["exploration"]) == set(toy.prompts()) - set(evens)
    stored = load_file(str(out / "reference_samples.safetensors"))
    assert stored["input_ids"].shape[0] == 4 * len(evens)
    # the stored log-probs are the initial policy's: recomputing them reproduces them exactly
    from fdistill.lm.modeling import SeqBatch

    lp, _ = token_logps_of(load_causal_lm(tiny_model).eval(),
                           SeqBatch(stored["input_ids"], stored["attention_mask"], stored["response_mask"]))
    torch.testing.assert_close(lp, stored["ref_token_logps"], rtol=1e-5, atol=1e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["penalty"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before the first update
    assert rows[1]["penalty"] > 0
    assert "near_perfect" in res["eval"]


def test_grpo_baseline_explores_every_prompt(tmp_path, tiny_model, even_verifier):
    from fdistill.lm.trainers import train_dph

    train_dph(DPHConfig(**_common(tmp_path, tiny_model, verifier=even_verifier, presample=2, group_size=2,
                                  prompts_per_step=2, divergence="none")), log=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("penalty" not in r and "reward" in r for r in rows)


# --- the demo, tiny -----------------------------------------------------------------------------------------------

def test_tiny_demo(tmp_path):
    from fdistill.lm.demo import run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), pretrain_steps=10, fdpo_divergences=["reverse_kl", "js"],
                     tdpo_variants=[2], fdpg_divergences=["js"], dph_divergences=["none", "forward_kl"],
                     dpo_pairs=32, dpo_steps=2, fdpg_steps=2, dph_steps=2, eval_samples=4, pass_k=2)
    result = run_demo(cfg, log=None)
    table = result["table"]
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 2 + 1 + 1 + 2
    ideal = result["rows"][0]
    assert ideal["reward"] == 1.0 and 4 > ideal["distinct"] > 3.5  # 4 samples from >= 21 answers
    for needle in ("base model", "f-DPO | reverse_kl", "f-DPO | js", "TDPO2", "f-DPG", "GRPO (no KL)",
                   "DPH-RL | forward_kl", "pass@2"):
        assert needle in table, needle
    assert (tmp_path / "demo" / "table.md").read_text().strip() == table
    for row in result["rows"]:
        assert 0 <= row["reward"] <= 1 and row["distinct"] <= 4
    # the base model is cached: a second call does not pretrain again
    stamp = (tmp_path / "demo" / "base" / "model.safetensors").stat().st_mtime_ns
    toy.ensure_base_model(tmp_path / "demo" / "base", steps=10, seed=0, log=None)
    assert (tmp_path / "demo" / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_dpo_on_a_jsonl_with_an_hf_tokenizer(tmp_path):
    """The non-toy path: a PreTrainedTokenizerFast (built offline) without bos or pad, a JSONL of pairs,
    an empty prompt; the model folder is loaded with AutoTokenizer / AutoModelForCausalLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from fdistill.lm.data import encode_prompt, write_jsonl
    from fdistill.lm.trainers import train_dpo

    vocab = {"<unk>": 0, "<|endoftext|>": 1}
    for c in "0123456789:abcdefghijklmnopqrstuvwxyz ?":
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    # GPT-2's default dropout (0.1) stays in the config: the trainer must switch it off for the policy
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    loaded = load_tokenizer(str(model_dir))
    assert not isinstance(loaded, CharTokenizer) and loaded.pad_token_id == loaded.eos_token_id == 1
    assert encode_prompt(loaded, "") == [1]  # an empty prompt still gives the response a context token
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [{"prompt": "what is 2 and 2? ", "chosen": "4", "rejected": "five"},
                       {"prompt": "", "chosen": "hello", "rejected": "x"}] * 4)
    res = train_dpo(DPOConfig(out=str(tmp_path / "run"), model=str(model_dir), data=str(data), steps=2,
                              batch_size=4, eval_prompts="", threads=1, divergence="alpha:0.5"), log=None)
    assert "eval" not in res
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert load_tokenizer(res["final"]).encode("ab") == loaded.encode("ab")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="rejected"):
        train_dpo(DPOConfig(out=str(tmp_path / "run2"), model=str(model_dir), data=str(bad), steps=1,
                            eval_prompts="", threads=1), log=None)
