"""SkipPolicyCallback (engine attached only while testing) and PredictionsCallback (streamed
predictions.jsonl, metrics.json, resume after a crash), through Lightning and through task=evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from hsd_exp import tasks
from hsd_exp.data.datamodule import HSDDataModule
from hsd_exp.data.loaders import load_examples
from hsd_exp.decoding import DecodeSettings
from hsd_exp.errors import ConfigError
from hsd_exp.eval.callbacks import SkipPolicyCallback
from hsd_exp.eval.predictions import read_predictions
from hsd_exp.models.layout import decoder_layers, unwrap
from hsd_exp.skip.policies import build_policy
from hsd_exp.train.module import CausalLMModule

from helpers import compose_config

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 8
BASE = ["model=tiny-llama", "dataset.path=sample", "dataset.limit=5", "decode.batch_size=2",
        f"decode.max_new_tokens={MAX_NEW}", "bertscore.enabled=false", "trainer.accelerator=cpu",
        "policy=hsd", "policy.s=1", "policy.min=0", "policy.max=4", "callbacks=plain"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


def installed(model) -> dict:
    """What the skip engine puts on a model: an instance ``generate`` and instance ``forward`` per layer."""
    base = unwrap(model)
    return {"generate": "generate" in base.__dict__,
            "layers": [("forward" in layer.__dict__) for layer in decoder_layers(base)]}


class Probe(pl.Callback):
    """Records, at every test batch, whether the engine is installed."""

    def __init__(self):
        self.seen = []

    def _record(self, pl_module):
        self.seen.append({**installed(pl_module.model), "stats": pl_module.skip_stats is not None})

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(pl_module)


@pytest.fixture
def decode(tmp_path) -> DecodeSettings:
    return DecodeSettings.from_config(make_cfg(tmp_path).decode)  # max_new_tokens=MAX_NEW


@pytest.fixture
def setup(tmp_path, decode):
    cfg = make_cfg(tmp_path)
    lm = tasks.build(cfg.model)  # a fresh model: a leaked engine must not reach other tests
    module = CausalLMModule(lm.model, lm.tokenizer, decode.generation_config(lm.tokenizer))
    dm = HSDDataModule(cfg.dataset, lm.tokenizer, lm.chat, eval_batch_size=2)
    policy = build_policy("hsd", s=1, min=0, max=4)
    return lm, module, dm, policy


def trainer_with(*callbacks) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


# ---------------------------------------------------------------------------------------------- SkipPolicyCallback
def test_skip_policy_attached_only_while_decoding(setup, decode):
    lm, module, dm, policy = setup
    assert installed(lm.model) == {"generate": False, "layers": [False] * 6}
    skip, probe = SkipPolicyCallback(policy, decode), Probe()
    trainer = trainer_with(skip, probe)
    trainer.test(module, datamodule=dm)

    assert len(probe.seen) == 3  # 5 examples, batches of 2
    for seen in probe.seen:  # during: generate() and every layer wrapped, stats readable by the module
        assert seen == {"generate": True, "layers": [True] * 6, "stats": True}
    # after: the plain model again
    assert installed(lm.model) == {"generate": False, "layers": [False] * 6}
    assert module.skip_stats is None
    # the policy really ran: HSD skips layer 1 for every generated token
    assert skip.stats.per_step and max(skip.stats.per_step) < 6
    assert all(0 not in layers for layers in skip.stats.step_layers)
    # and fit/validate would see the plain model: a forward is the same as before
    x = lm.tokenizer(["name[Blue Spice]"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(lm.model(**x).logits).all()


def test_skip_policy_detached_after_an_exception(setup, decode, monkeypatch):
    lm, module, dm, policy = setup
    probe = Probe()

    def boom(batch, batch_idx):
        raise RuntimeError("boom in test_step")

    monkeypatch.setattr(module, "test_step", boom)
    trainer = trainer_with(SkipPolicyCallback(policy, decode), probe)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.test(module, datamodule=dm)
    assert probe.seen and probe.seen[0]["generate"]
    assert installed(lm.model) == {"generate": False, "layers": [False] * 6}
    assert module.skip_stats is None


# ---------------------------------------------------------------------------------------------- predictions / metrics
def count_generated(monkeypatch, run_dir: Path) -> list[tuple[int, int]]:
    """Wrap generate_batch: (lines already in predictions.jsonl, examples in this batch) per batch."""
    calls = []
    orig = CausalLMModule.generate_batch

    def wrapped(self, batch):
        file = run_dir / "predictions.jsonl"
        lines = len(file.read_text().splitlines()) if file.exists() else 0
        calls.append((lines, len(batch["ids"])))
        return orig(self, batch)

    monkeypatch.setattr(CausalLMModule, "generate_batch", wrapped)
    return calls


def test_predictions_stream_and_metrics_match(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "task=evaluate")
    calls = count_generated(monkeypatch, tmp_path)
    metrics = tasks.run(cfg)

    # one line per example, on disk as soon as its batch is done (before the next batch starts)
    assert calls == [(0, 2), (2, 2), (4, 1)]
    records = read_predictions(tmp_path / "predictions.jsonl")
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 5
    expected_ids = [ex.id for ex in load_examples(cfg.dataset)]
    assert [r["id"] for r in records] == expected_ids
    for r in records:
        assert set(r) >= {"id", "source", "references", "prediction", "layers_per_token"}
        assert r["references"]
        # token t was produced by the forward of token t-1, which ran HSD's set for T = t-1
        policy = build_policy("hsd", s=1, min=0, max=4)
        want = [len(policy.layers(t, MAX_NEW, 6)) for t in range(len(r["layers_per_token"]))]
        assert r["layers_per_token"] == want
        assert 0 < len(r["layers_per_token"]) < MAX_NEW + 1

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    tokens = [n for r in records for n in r["layers_per_token"]]
    assert on_disk["avg_layers"] == pytest.approx(sum(tokens) / len(tokens))
    assert on_disk["avg_layers"] < 6
    assert on_disk["num_examples"] == 5 and on_disk["complete"] is True
    assert on_disk["num_layers"] == 6 and on_disk["policy_label"] == "hsd(s=1,0,4)"
    for key in ("rouge1", "rouge2", "rougeL", "bleu1", "tokens_per_s", "model", "dataset", "policy"):
        assert key in on_disk, key
    assert metrics["avg_layers"] == pytest.approx(on_disk["avg_layers"])


def test_evaluation_resumes_after_a_crash(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "task=evaluate")
    tasks.run(cfg)
    file = tmp_path / "predictions.jsonl"
    first = read_predictions(file)
    all_ids = [r["id"] for r in first]

    # the crash: two complete lines (marked, to tell kept from regenerated), a torn third, no metrics.json
    kept = [dict(r, prediction=f"KEPT {r['id']}") for r in first[:2]]
    torn = json.dumps(first[2])[:25]
    file.write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    (tmp_path / "metrics.json").unlink()

    calls = count_generated(monkeypatch, tmp_path)
    metrics = tasks.run(cfg)

    assert sum(n for _, n in calls) == 3  # only the three missing ids are generated
    records = read_predictions(file)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(all_ids) and len(ids) == len(set(ids)) == 5  # each id exactly once
    assert [r["prediction"] for r in records[:2]] == [f"KEPT {i}" for i in all_ids[:2]]
    assert all(json.loads(line) for line in file.read_text().splitlines())  # the torn line is gone
    assert metrics["num_examples"] == 5
    assert json.loads((tmp_path / "metrics.json").read_text())["num_examples"] == 5

    # crashed after the last prediction, before metrics.json (e.g. during BERTScore): the rerun only scores
    calls.clear()
    before = (tmp_path / "metrics.json").read_text()
    (tmp_path / "metrics.json").unlink()
    metrics = tasks.run(cfg)
    assert calls == []
    assert metrics["num_examples"] == 5 and metrics["complete"] is True
    assert json.loads((tmp_path / "metrics.json").read_text())["num_examples"] == 5
    assert json.loads(before)["avg_layers"] == pytest.approx(metrics["avg_layers"])

    # and a finished run rerun: nothing generated, its metrics.json returned as it is
    calls.clear()
    finished = (tmp_path / "metrics.json").read_text()
    assert tasks.run(cfg)["num_examples"] == 5
    assert calls == []
    assert (tmp_path / "metrics.json").read_text() == finished
    assert len(read_predictions(file)) == 5


def test_resume_refuses_another_setting_in_the_same_folder(tmp_path):
    """A rerun into a folder that holds another policy's (or decoding's) predictions must not mix them in."""
    tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=2"))
    assert json.loads((tmp_path / "run.json").read_text())["policy"] == "hsd(s=1,0,4)"
    for override, key in (("policy.max=3", "policy"), ("decode.max_new_tokens=6", "decode")):
        with pytest.raises(ConfigError, match=rf"holds predictions of another setting \({key}: .*hydra.run.dir"):
            tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=2", override))
    # the same setting resumes; a larger dataset.limit extends the run, another decode.batch_size is fine
    assert tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=3", "decode.batch_size=1"))["num_examples"] == 3


def test_resume_refuses_a_smaller_limit_than_the_folder_holds(tmp_path):
    """metrics.json covers every prediction in the folder: a rerun under a smaller dataset.limit would label
    the finished run's 3 examples with limit=2 (and the report would pair them with limit=2 runs)."""
    tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=3"))
    before = (tmp_path / "metrics.json").read_text()
    assert json.loads(before)["limit"] == 3
    with pytest.raises(ConfigError, match=r"holds predictions for 3 examples but dataset.limit=2.*"
                                          r"dataset.limit=3 or more \(or null\).*hydra.run.dir"):
        tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=2"))
    assert (tmp_path / "metrics.json").read_text() == before  # the finished run is left as it was
    # the same limit reruns as a finished run; a larger one extends it and records the limit it scored under
    assert tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=3"))["num_examples"] == 3
    metrics = tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.limit=4"))
    assert metrics["num_examples"] == 4 and json.loads((tmp_path / "metrics.json").read_text())["limit"] == 4


def test_metrics_json_records_what_the_report_pairs_runs_on(tmp_path):
    """Data identity and prompt format beside decoding: the report pairs a run with a Full run on these."""
    from hsd_exp.eval.predictions import examples_hash

    tasks.run(make_cfg(tmp_path, "task=evaluate", "dataset.separator=' Text:'"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert metrics["examples_hash"] == examples_hash(records)
    assert {k: metrics[k] for k in ("dataset_path", "limit", "chat", "separator", "max_source_tokens", "do_sample",
                                    "max_new_tokens", "model_path")} == {
        "dataset_path": "sample", "limit": 5, "chat": False, "separator": " Text:", "max_source_tokens": 128,
        "do_sample": False, "max_new_tokens": MAX_NEW, "model_path": None}
    assert metrics["instruction"].startswith("Write a short restaurant description")
    assert "temperature" in metrics and "top_p" in metrics


# ---------------------------------------------------------------------------------------------- WarmUpCallback
def test_warm_up_runs_once_on_the_placed_model_before_the_policy(setup, decode, monkeypatch):
    """Under DDP the model is loaded on the CPU: warm-up must wait until Lightning has moved it, and its
    tokens must count neither in the policy's stats nor in tokens/s (so it runs before the other callbacks)."""
    from hsd_exp.eval.callbacks import WarmUpCallback

    lm, module, dm, policy = setup
    seen = []
    orig = CausalLMModule.warm_up

    def warm_up(self):
        seen.append({"device": self.model.device.type, "engine": installed(self.model)["generate"],
                     "stats": self.skip_stats is not None})
        return orig(self)

    monkeypatch.setattr(CausalLMModule, "warm_up", warm_up)
    trainer = trainer_with(WarmUpCallback(), SkipPolicyCallback(policy, decode))
    trainer.test(module, datamodule=dm)
    trainer.test(module, datamodule=dm)
    assert seen[0] == {"device": "cpu", "engine": False, "stats": False}
    assert module._warm  # the second loop found it warm already (warm_up returns at once)


# ---------------------------------------------------------------------------------------------- TokenProgressCallback
@pytest.mark.parametrize("bar", ["default", "plain"])
def test_evaluation_bar_moves_within_a_batch(tmp_path, monkeypatch, bar):
    """A batch's tokens move the bar (a CALM batch sat at 0/1 for 76 s): Rich advances by token / max_new_tokens
    of a batch and names the token, tqdm shows it as postfix; predictions are those of a run without a bar."""
    from hsd_exp.eval.callbacks import TokenProgressCallback

    seen = []
    show = TokenProgressCallback._show

    def spy(self, text, completed):
        show(self, text, completed)
        if text is None:
            return
        if isinstance(self.bar, pl.callbacks.RichProgressBar):
            task = self.bar.progress.tasks[self.bar.test_progress_bar_id]
            seen.append((task.description, task.completed))
        else:
            seen.append((self.bar._test_progress_bar.postfix, None))

    monkeypatch.setattr(TokenProgressCallback, "MIN_INTERVAL", 0.0)
    monkeypatch.setattr(TokenProgressCallback, "_show", spy)
    tasks.run(make_cfg(tmp_path / "bar", "task=evaluate", f"callbacks={bar}"))
    assert len(seen) >= 3 * MAX_NEW - 3  # 3 batches of up to MAX_NEW tokens (a batch may end early at EOS)
    text, completed = seen[2]
    assert f"token 3/{MAX_NEW}" in text
    if bar == "default":
        assert completed == pytest.approx(3 / MAX_NEW)  # the first batch, 3 of its 8 tokens
        assert any(1 < c < 2 for _, c in seen)  # the second batch moves the bar between 1 and 2
    tasks.run(make_cfg(tmp_path / "none", "task=evaluate", "callbacks=none"))
    assert read_predictions(tmp_path / "bar") == read_predictions(tmp_path / "none")
