"""CausalLMModule: fine-tuning (full / LoRA), checkpoints and resume, skip-aware training, SkipLayer's router.

Every test loads its own tiny model (``tasks.build(cfg.model)``, seeded): training changes weights in place
and LoRA wraps the model, so the session-cached models of conftest.load must not be used here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from hsd_exp import preflight, tasks
from hsd_exp.data.datamodule import HSDDataModule
from hsd_exp.errors import ConfigError
from hsd_exp.eval.layer_map import RATES_FILE, RATES_PLOT
from hsd_exp.models.layout import decoder_layers, unwrap
from hsd_exp.run_settings import RunSettings
from hsd_exp.skip.policies import build_policy
from hsd_exp.skip.router import SkipRouter
from hsd_exp.train.module import CausalLMModule

from helpers import compose_config, load

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model=tiny-llama", "dataset.path=sample", "bertscore.enabled=false", "decode.max_new_tokens=8",
        "dataset.limit=3", "finetune.batch_size=4", "finetune.train_limit=4", "finetune.max_length=96",
        "finetune.lr=1e-3", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "logger=csv", "callbacks=plain"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


def make_module(cfg) -> tuple:
    lm = tasks.build(cfg.model)
    module = tasks.lightning_module(cfg, lm, RunSettings.from_config(cfg))
    return lm, module


def restore(cfg, lm, module, ckpt: str) -> None:
    """Lightning restores ``ckpt`` into ``module`` as task=evaluate does (a short evaluation into cfg's folder)."""
    settings = RunSettings.from_config(cfg)
    tasks.evaluate(cfg, settings, lm, module, settings.policy, Path(cfg.paths.output_dir), ckpt, restore=ckpt)


def fixed_batch(cfg, lm, n: int = 4) -> dict:
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, train_batch_size=n, max_length=cfg.finetune.max_length,
                       train_limit=cfg.finetune.train_limit)
    dm.setup("fit")
    return dm.collate_train(dm.train_pairs[:n])


@torch.no_grad()
def eval_loss(module, batch) -> float:
    was = module.model.training
    module.model.eval()
    loss = module._loss(batch).item()
    module.model.train(was)
    return loss


def record_training_steps(module, monkeypatch) -> list[dict]:
    """Wrap ``module.training_step``: what each step saw (batch, train mode, loss)."""
    seen = []
    orig = module.training_step

    def step(batch, batch_idx):
        entry = {"batch": batch, "training": module.model.training}
        loss = orig(batch, batch_idx)
        entry["loss"] = float(loss.detach())
        seen.append(entry)
        return loss

    monkeypatch.setattr(module, "training_step", step)
    return seen


# ---------------------------------------------------------------------------------------------- full fine-tuning
def test_full_finetune_lowers_loss_in_train_mode(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=full", "finetune.lr=3e-3", "trainer.max_steps=10")
    lm, module = make_module(cfg)
    batch = fixed_batch(cfg, lm)
    before = eval_loss(module, batch)
    steps = record_training_steps(module, monkeypatch)

    ckpt = tasks.finetune(cfg, lm, module, None)

    after = eval_loss(module, batch)
    assert len(steps) == 10
    # from_pretrained() returns a model in eval mode; training must still run with dropout on
    assert all(s["training"] for s in steps), [s["training"] for s in steps]
    assert after < before - 1.0, (before, after)  # random init: ~ln(vocab) = 10.8 before
    first, last = steps[:3], steps[-3:]
    assert sum(s["loss"] for s in last) / 3 < sum(s["loss"] for s in first) / 3 - 0.5, [s["loss"] for s in steps]
    assert Path(ckpt).is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 10
    # loss is logged per step (CSV logger under the run dir)
    metrics_csv = next(tmp_path.glob("csv/**/metrics.csv"))
    assert "train/loss_step" in metrics_csv.read_text().splitlines()[0]


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_checkpoint_holds_adapter_only_reloads_and_evaluates(tmp_path):
    train_dir = tmp_path / "train"
    cfg = make_cfg(train_dir, "task=finetune", "finetune=lora", "trainer.max_steps=3")
    out = tasks.run(cfg)
    path = out["ckpt_path"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert ckpt.get("hsd_adapter_only") is True
    assert keys and all("lora_" in k for k in keys), keys[:5]
    # every linear of attention and MLP (q/k/v/o, gate/up/down) of 6 layers, A and B each: the frozen base is not saved
    assert len(keys) == 7 * 6 * 2, len(keys)
    assert any(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if "lora_B" in k), "adapter did not train"
    export = train_dir / "hf_model"  # the adapter for peft, as safetensors
    assert (export / "adapter_model.safetensors").is_file() and (export / "adapter_config.json").is_file()

    # a fresh module (same seeded base) takes the adapter back
    fresh_cfg = make_cfg(tmp_path / "x", "finetune=lora")
    lm, module = make_module(fresh_cfg)
    x = fixed_batch(fresh_cfg, lm, n=2)
    inputs = {k: x[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        untrained = module.model(**inputs).logits  # lora_B = 0: the base model's logits
    restore(fresh_cfg, lm, module, path)
    state = module.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        assert not torch.allclose(module.model(**inputs).logits, untrained)

    # an adapter checkpoint is refused without LoRA: one clear message
    with pytest.raises(ConfigError, match="finetune=lora"):
        tasks.run(make_cfg(tmp_path / "y", "task=evaluate", "finetune=full", f"ckpt_path={path}"))

    # task=evaluate with the adapter
    eval_dir = tmp_path / "eval"
    metrics = tasks.run(make_cfg(eval_dir, "task=evaluate", "finetune=lora", f"ckpt_path={path}"))
    assert metrics["num_examples"] == 3
    assert metrics["ckpt_path"] == path
    assert (eval_dir / "metrics.json").is_file()


@pytest.mark.parametrize(("model", "targets", "missing", "existing"), [
    ("tiny-llama", ["q_proj", "nope_proj"], ["nope_proj"], ["q_proj", "o_proj", "gate_proj"]),
    ("tiny-gpt2", ["q_proj"], ["q_proj"], ["c_attn", "c_proj", "c_fc"]),
])
def test_lora_unknown_target_modules_name_the_existing_ones(model, targets, missing, existing):
    lm = load(model)  # raises before peft touches the model
    with pytest.raises(ConfigError) as err:
        CausalLMModule(lm.model, lm.tokenizer, finetune={"mode": "lora", "lora": {"target_modules": targets}})
    message = str(err.value)
    assert "target_modules" in message
    named, _, listed = message.partition("not found")
    for name in missing:
        assert name in named, message
    for name in existing:
        assert name in listed, message
    assert not hasattr(lm.model, "peft_config")


def test_lora_unknown_target_modules_via_config(tmp_path):
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=lora", "finetune.lora.target_modules=[qkv]")
    with pytest.raises(ConfigError, match="qkv.*q_proj"):
        tasks.run(cfg)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_resumes_from_last_checkpoint(tmp_path, monkeypatch, mode):
    first = tasks.run(make_cfg(tmp_path / "a", "task=finetune", f"finetune={mode}", "trainer.max_steps=2"))
    last = first["ckpt_path"]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2

    calls = []
    orig = CausalLMModule.training_step

    def counting(self, batch, batch_idx):
        calls.append(self.global_step)
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "training_step", counting)
    second = tasks.run(make_cfg(tmp_path / "b", "task=finetune", f"finetune={mode}", "trainer.max_steps=4",
                                f"ckpt_path={last}"))
    assert calls == [2, 3]  # continued at step 2, not restarted at 0
    resumed = torch.load(second["ckpt_path"], map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    assert bool(resumed.get("hsd_adapter_only")) == (mode == "lora")


def test_last_checkpoint_holds_the_final_step(tmp_path):
    """Periodic checkpoints (every N steps) must not leave last.ckpt behind the end of training."""
    out = tasks.run(make_cfg(tmp_path / "a", "task=finetune", "finetune=full", "trainer.max_steps=3",
                             "++finetune.checkpoint_every_n_steps=2"))
    assert torch.load(out["ckpt_path"], map_location="cpu", weights_only=True)["global_step"] == 3
    # and training resumes from it
    out = tasks.run(make_cfg(tmp_path / "b", "task=finetune", "finetune=full", "trainer.max_steps=5",
                             "++finetune.checkpoint_every_n_steps=2", f"ckpt_path={out['ckpt_path']}"))
    assert torch.load(out["ckpt_path"], map_location="cpu", weights_only=True)["global_step"] == 5


# ---------------------------------------------------------------------------------------------- skip-aware training
@pytest.mark.parametrize("full_depth_rate", [0.0, 1.0])
def test_skip_aware_training_runs_the_decode_time_layer_sets(tmp_path, monkeypatch, full_depth_rate):
    """Target position with generated-token index T runs exactly policy.layers(T); prompt positions run all."""
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=full", "trainer.max_steps=2", "policy=hsd", "policy.s=1",
                   "policy.min=0", "policy.max=4", "finetune.skip_aware=true",
                   f"finetune.full_depth_rate={full_depth_rate}")
    lm, module = make_module(cfg)
    steps = record_training_steps(module, monkeypatch)
    layers = decoder_layers(unwrap(module.model))
    L = len(layers)
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step, per layer: (input, output)

    def hook(idx):
        def fn(layer, args, kwargs, output):
            if not layer.training:  # training steps only
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if idx == 0:
                seen.append([])
            seen[-1].append((hidden.detach().clone(), out.detach().clone()))
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        tasks.finetune(cfg, lm, module, None)
    finally:
        for h in handles:
            h.remove()

    assert len(steps) == 2 and len(seen) == 2
    skipping = full_depth_rate == 0.0
    assert module.train_steps_skipped == (2 if skipping else 0)
    policy, tmax = module.skip_policy, int(cfg.finetune.skip_max_new_tokens)
    assert not any("forward" in layer.__dict__ for layer in layers), "engine left installed after training"
    skipped_at_target = 0
    for step, per_layer in zip(steps, seen, strict=True):
        batch = step["batch"]
        P = int(batch["prompt_len"])
        mask = batch["attention_mask"].bool()  # (B, P + S)
        assert len(per_layer) == L
        for idx, (h_in, h_out) in enumerate(per_layer):
            for b, c in mask.nonzero().tolist():
                T = c - P
                runs = T < 0 or not skipping or idx in policy.layers(T, tmax, L)
                unchanged = torch.equal(h_in[b, c], h_out[b, c])
                assert unchanged == (not runs), f"layer {idx + 1} at T={T} (row {b}): ran={not unchanged}"
                skipped_at_target += unchanged
    # The two kinds of step are logged apart (train/loss_skipped vs train/loss_full_depth).
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert ("train/loss_skipped_step" in header) == skipping
    assert ("train/loss_full_depth_step" in header) == (not skipping)
    if skipping:
        assert skipped_at_target > 0
        # HSD s=1 skips layer 1 for every generated token, so it must have been dropped at every target position
        assert 0 not in policy.layers(0, tmax, L)


def test_checkpoint_that_does_not_fit_is_a_config_error(tmp_path):
    cfg = make_cfg(tmp_path, "finetune=full")
    _, trained = make_module(cfg)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.01)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": trained.state_dict(), "global_step": 1, "pytorch-lightning_version": pl.__version__},
               full)

    evaluation = [o for o in BASE if not o.startswith("finetune.")]  # finetune=none has no training keys
    plain_cfg = compose_config(tmp_path / "plain", *evaluation, "task=evaluate", f"ckpt_path={full}")
    plain_lm, plain = make_module(plain_cfg)  # finetune=none takes a full checkpoint too
    restore(plain_cfg, plain_lm, plain, str(full))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), trained.state_dict().values(),
                                                  strict=True))

    with pytest.raises(ConfigError, match="finetune=lora"):
        tasks.run(make_cfg(tmp_path / "lora", "task=evaluate", "finetune=lora", f"ckpt_path={full}"))
    with pytest.raises(ConfigError, match="model=tiny-gpt2 "):
        tasks.run(make_cfg(tmp_path / "gpt2", "task=evaluate", "finetune=full", "model=tiny-gpt2",
                           f"ckpt_path={full}"))
    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="notes.ckpt"):
        tasks.run(compose_config(tmp_path / "garbage", *evaluation, "task=evaluate", f"ckpt_path={garbage}"))


# ---------------------------------------------------------------------------------------------- training dtype / policy
def test_full_finetune_trains_float32_weights(tmp_path):
    """A bf16 model (dtype=auto on a GPU) must not be trained in bf16: bf16-mixed only autocasts the forward."""
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=full")
    lm, module = make_module(cfg)
    module.model.to(torch.bfloat16)
    module.setup("test")  # evaluation leaves the dtype alone
    assert next(module.model.parameters()).dtype == torch.bfloat16
    module.setup("fit")
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}


def test_skip_aware_training_refuses_a_dynamic_policy_but_evaluation_accepts_it(tmp_path):
    ckpt = tmp_path / "skip_aware.ckpt"  # what the preflight reads of a checkpoint
    torch.save({"state_dict": {}, "pytorch-lightning_version": pl.__version__}, ckpt)
    calm = ["finetune=full", "finetune.skip_aware=true", "policy=calm", f"ckpt_path={ckpt}"]
    preflight.check(make_cfg(tmp_path, "task=evaluate", *calm))  # evaluating a skip-aware checkpoint with CALM
    with pytest.raises(ConfigError, match=r"finetune.skip_aware=true.*calm"):
        preflight.check(make_cfg(tmp_path, "task=finetune", *calm))


# ---------------------------------------------------------------------------------------------- per-token layer records
class _EndRowZeroAt:
    """Logits processor: row 0 must emit EOS as its ``at``-th new token (0-based); other rows are left alone."""

    def __init__(self, prompt_len: int, at: int, eos: int):
        self.prompt_len, self.at, self.eos = prompt_len, at, eos

    def __call__(self, input_ids, scores):  # (B, t), (B, V)
        if input_ids.shape[1] - self.prompt_len == self.at:
            scores[0] = torch.where(torch.arange(scores.shape[1]) == self.eos, 0.0, -math.inf)
        return scores


def test_layer_record_of_a_row_does_not_depend_on_the_rest_of_its_batch(tmp_path, monkeypatch):
    """A row that ends early gets the steps that produced its tokens (n - 1 of them: token 0 comes from the
    prefill) whether it decodes alone or beside a longer row. Counting the step that fed its EOS back, which
    runs only because the longer row goes on, once made Avg. Layer depend on decode.batch_size."""
    from transformers import LogitsProcessorList

    from hsd_exp.skip.engine import layer_skipping

    cfg = make_cfg(tmp_path, "finetune=full")
    lm, module = make_module(cfg)
    module.generation_config.max_new_tokens, module.generation_config.num_beams = 8, 1
    policy = build_policy("hsd", s=1, min=0, max=4)
    tok = lm.tokenizer
    tok.padding_side = "left"
    generate = module.model.generate

    def records(prompts: list[str]) -> list[list[int]]:
        batch = tok(prompts, return_tensors="pt", padding=True)
        forced = _EndRowZeroAt(batch["input_ids"].shape[1], at=2, eos=tok.eos_token_id)

        def forcing(*args, logits_processor=(), **kwargs):  # before the module's own (its step timer)
            return generate(*args, logits_processor=LogitsProcessorList([forced, *logits_processor]), **kwargs)

        monkeypatch.setattr(module.model, "generate", forcing)
        with layer_skipping(module.model, policy, max_new_tokens=8) as stats:
            module.skip_stats = stats
            return module.generate_batch(batch)[1]

    alone = records(["name[The Eagle], food[French]"])
    beside = records(["name[The Eagle], food[French]", "name[Blue Spice], eatType[coffee shop], area[riverside]"])
    want = [len(policy.layers(t, 8, 6)) for t in range(2)]  # 3 tokens (the last one EOS): steps T = 0, 1
    assert alone == [want]
    assert beside[0] == want
    assert len(beside[1]) == 7  # the long row: 8 tokens, steps T = 0..6


# ---------------------------------------------------------------------------------------------- SkipLayer's router
ROUTER = ["model=tiny-llama", "dataset.path=sample", "bertscore.enabled=false", "decode.max_new_tokens=8",
          "dataset.limit=4", "finetune.batch_size=4", "finetune.train_limit=32", "finetune.max_length=96",
          "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "logger=csv", "callbacks=none",
          "finetune.router=true", "router.kind=linear", "router.density=0.5", "router.lr=0.05", "policy=skiplayer"]


@pytest.mark.parametrize("mode", ["lora", "none"])
def test_router_trains_toward_the_density_is_saved_and_evaluates(tmp_path, mode):
    """The density loss pulls the run rate toward P; the router goes into the checkpoint (beside a LoRA adapter,
    or alone on a frozen backbone) and policy=skiplayer evaluates it."""
    def make(tmp, *overrides):
        return compose_config(tmp, *ROUTER, *overrides)

    out = tasks.run(make(tmp_path / "ft", "task=finetune_evaluate", f"finetune={mode}", "trainer.max_steps=30"))
    assert 0 < out["avg_layers"] < 6  # the trained router skips at decode time
    ckpt = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert ckpt["hsd_router"]["num_layers"] == 6 and any(k.startswith("router.gates.") for k in keys)
    assert all(k.startswith("router.") or "lora_" in k for k in keys)  # trained weights only
    if mode == "none":
        assert all(k.startswith("router.") for k in keys)  # the frozen backbone stays out
    metrics = (tmp_path / "ft" / "csv" / "metrics.csv").read_text().splitlines()
    header, rows = metrics[0].split(","), [r.split(",") for r in metrics[1:]]
    rates = [float(r[header.index("train/run_rate")]) for r in rows if r[header.index("train/run_rate")]]
    assert rates[0] > 0.9 and abs(rates[-1] - 0.5) < abs(rates[0] - 0.5)  # pulled from dense toward P
    router = SkipRouter.load(tmp_path / "ft" / "hf_model" / "router")
    assert router.num_layers == 6
    again = tasks.run(make(tmp_path / "ev", "task=evaluate", f"finetune={mode}",
                           f"ckpt_path={tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'}"))
    assert again["avg_layers"] == pytest.approx(out["avg_layers"])  # the same router, restored by Lightning
    full = tasks.run(make(tmp_path / "full", "task=evaluate", f"finetune={mode}", "policy=full",
                          f"ckpt_path={tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'}"))
    assert full["avg_layers"] == 6  # the same checkpoint at full depth: its router is left out
    layer_map = json.loads((tmp_path / "ev" / RATES_FILE).read_text())  # which layers ran at which token
    assert (tmp_path / "ev" / RATES_PLOT).read_bytes().startswith(b"\x89PNG")
    assert len(layer_map["by_token"]) == 6 and 1 <= len(layer_map["by_token"][0]) <= 7  # T = 0 .. Tmax-2
    rates = list(layer_map["per_layer"].values())
    assert all(0 <= r <= 1 for r in rates) and 0 < sum(rates) < 6


# ---------------------------------------------------------------------------------------------- speed
def test_step_timer_brackets_prefill_and_decode_steps():
    """Calls at t = 3, 5, 6, 7 after a start at t = 1: prefill 2 s, then 3 decode forwards in 2 s."""
    from hsd_exp.eval.step_timer import StepTimer

    ticks = iter([1.0, 3.0, 5.0, 6.0, 7.0])
    timer = StepTimer(clock=lambda: next(ticks))
    assert timer.prefill_seconds is None and timer.decode_steps == 0 and timer.decode_seconds == 0.0
    timer.start()
    scores = torch.randn(2, 5)
    for _ in range(4):
        assert timer(torch.zeros(2, 1, dtype=torch.long), scores) is scores  # the scores as they came
    assert (timer.prefill_seconds, timer.decode_steps, timer.decode_seconds) == (2.0, 3, 4.0)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_batch_times_each_decode_step_of_the_batch(tmp_path, beams):
    """One StepTimer call per generate() step (greedy and beam search): N generated positions give N - 1 decode
    steps, however long each row's own output is; the tokens are those of a run without the timer."""
    cfg = make_cfg(tmp_path, "finetune=full")
    lm, module = make_module(cfg)
    gen = module.generation_config
    gen.max_new_tokens, gen.num_beams, gen.min_new_tokens = 6, beams, 6
    tok = lm.tokenizer
    tok.padding_side = "left"
    batch = tok(["name[The Eagle], food[French]", "name[Blue Spice], area[riverside]"], return_tensors="pt",
                padding=True)
    out = module.generate_batch(batch)
    assert out.decode_steps == 5 and out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.lengths == [6, 6] and out.tokens == 12
    plain = module.model.generate(**batch, generation_config=gen)
    assert out.texts == [tok.decode(row, skip_special_tokens=True).strip()
                         for row in plain[:, batch["input_ids"].shape[1]:].tolist()]
