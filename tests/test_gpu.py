"""The GPU path, skipped where CUDA is absent (`pytest -m gpu` on a GPU machine): the engine's exactness on
CUDA, bf16 generation under every kind of policy, and evaluation / LoRA fine-tuning through the CLI with
`trainer=gpu` (bf16-mixed), as a user with a GPU runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import build_policy

from helpers import CACHE_DIR, PROMPTS, ROOT, TINY_POLICIES, load, output_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
T = 12


def cuda_model(family: str, dtype: str):
    return load(f"tiny-{family}", device="cuda", dtype=dtype)


def generate(lm, policy, beams: int, use_cache: bool):
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with layer_skipping(lm.model, policy, max_new_tokens=T) as stats, torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, num_beams=beams, do_sample=False,
                                use_cache=use_cache)
    return out, stats


@pytest.mark.parametrize("family", ["gpt2", "phi", "llama"])
@pytest.mark.parametrize("name,params", TINY_POLICIES)
@pytest.mark.parametrize("beams", [1, 4])
def test_cuda_cached_equals_no_cache_reference(family, name, params, beams):
    lm = cuda_model(family, "float32")
    policy = build_policy(name, num_layers=6, **params)
    cached, stats = generate(lm, policy, beams, use_cache=True)
    reference, ref_stats = generate(lm, policy, beams, use_cache=False)
    assert cached.device.type == "cuda"
    assert torch.equal(cached, reference)
    assert stats.per_step == ref_stats.per_step


@pytest.mark.parametrize("family", ["gpt2", "phi", "llama"])
def test_cuda_bf16_full_equals_plain_and_policies_run(family):
    lm = cuda_model(family, "bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        plain = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False)
    full, stats = generate(lm, build_policy("full"), 1, use_cache=True)
    assert torch.equal(plain, full) and stats.avg_layers == 6
    for policy in (build_policy("hsd", s=1, min=0, max=4), build_policy("skipdecode", min=1, max=4),
                   build_policy("calm", d=0.2, criterion="softmax")):
        out, stats = generate(lm, policy, 4, use_cache=True)
        assert out.shape == (len(PROMPTS), plain.shape[1]) and 0 < stats.avg_layers <= 6


def test_cuda_calm_keeps_the_cache_complete():
    lm = cuda_model("llama", "float32")
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with layer_skipping(lm.model, build_policy("calm", d=0.3, criterion="softmax"), max_new_tokens=T) as stats, \
            torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                return_dict_in_generate=True)
    assert min(stats.per_step) < 6  # some steps exited early
    lengths = {layer.get_seq_length() for layer in output_cache(out).layers}
    assert lengths == {enc["input_ids"].shape[1] + T - 1}  # every layer holds K/V for every position


def run_cli(tmp_path, *overrides: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HSD_CACHE_DIR": CACHE_DIR, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "hsd_exp", "model=tiny-llama", "dataset=e2e", "dataset.path=sample",
                           "trainer=gpu", "model.device=cuda", "bertscore.enabled=false", "callbacks=none", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cuda_lora_finetune_then_evaluate_bf16(tmp_path):
    train = run_cli(tmp_path, "task=finetune", "finetune=lora", "trainer.max_steps=4", "dataset.limit=16",
                    f"hydra.run.dir={tmp_path / 'train'}")
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    evaluate = run_cli(tmp_path, "task=evaluate", "finetune=lora", f"ckpt_path={ckpt}", "policy=hsd",
                       "policy.max=4", "model.dtype=bfloat16", "dataset.limit=8", "decode=beam4",
                       f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_examples"] == 8 and 0 < metrics["avg_layers"] < 6 and metrics["tokens_per_s"] > 0
