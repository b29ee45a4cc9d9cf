"""The tasks end to end on a tiny model: generate, compare (one run dir per policy), finetune_evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from hsd_exp import preflight, tasks
from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import read_predictions
from hsd_exp.run_settings import bertscore_config
from hsd_exp.train.trainer import make_trainer, world_size

from helpers import TASK_BASE as BASE
from helpers import TASK_FULL as FULL
from helpers import TASK_HSD as HSD
from helpers import cli_in_process, compose_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp: Path, *overrides: str):
    return compose_config(tmp, *BASE, *overrides)


def cli(args: list[str], run_dir: Path) -> int:
    """``python -m hsd_exp ARGS hydra.run.dir=RUN_DIR`` in this process (runpy runs __main__.py)."""
    return cli_in_process([*args, f"hydra.run.dir={run_dir}"])


# ---------------------------------------------------------------------------------------------- generate
def test_generate_applies_the_policy(tmp_path):
    full = tasks.run(make_cfg(tmp_path, "task=generate", "policy=full"))
    hsd = tasks.run(make_cfg(tmp_path, "task=generate", "policy=hsd", "policy.s=1", "policy.min=0", "policy.max=4"))
    assert full["avg_layers"] == 6.0 and full["num_layers"] == 6
    assert hsd["avg_layers"] < 6.0
    assert hsd["policy"] == "hsd(s=1,0,4)" and isinstance(hsd["completion"], str)


# ---------------------------------------------------------------------------------------------- compare
def test_compare_writes_one_run_dir_per_policy(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "task=compare", f"compare_policies=[{FULL},{HSD}]")
    results = tasks.run(cfg)

    assert list(results) == ["full", "hsd(s=1,0,4)"]
    subdirs = {"full": tmp_path / "full", "hsd(s=1,0,4)": tmp_path / "hsd_s_1_0_4"}
    for label, run_dir in subdirs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["policy_label"] == label
        assert metrics["num_examples"] == 4 and metrics["complete"] is True
        assert metrics["avg_layers"] == pytest.approx(results[label]["avg_layers"])
        records = read_predictions(run_dir)
        assert len(records) == 4 and len({r["id"] for r in records}) == 4
    full = json.loads((subdirs["full"] / "metrics.json").read_text())
    hsd = json.loads((subdirs["hsd(s=1,0,4)"] / "metrics.json").read_text())
    assert full["avg_layers"] == 6.0
    assert hsd["avg_layers"] < 6.0
    # same inputs for every policy
    assert [r["id"] for r in read_predictions(subdirs["full"])] == [r["id"] for r in read_predictions(
        subdirs["hsd(s=1,0,4)"])]
    assert not (tmp_path / "predictions.jsonl").exists()  # nothing for the top-level `policy`


def test_compare_rejects_policies_sharing_a_run_dir(tmp_path):
    """Two entries with one label would share a run dir: the second would 'resume' the first's predictions."""
    # tau only matters with decay on, so these two are the same policy under one label
    tau = "{_target_:hsd_exp.build_policy,name:calm,d:0.02,tau:2.0}"
    plain = "{_target_:hsd_exp.build_policy,name:calm,d:0.02}"
    with pytest.raises(ConfigError, match="calm"):
        tasks.run(make_cfg(tmp_path, "task=compare", "model=phi2", f"compare_policies=[{plain},{tau}]"))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- finetune_evaluate
def test_finetune_evaluate_end_to_end_cli(tmp_path):
    """``python -m hsd_exp task=finetune_evaluate ...``: trains, checkpoints, evaluates the trained weights."""
    run_dir = tmp_path / "run"
    code = cli([*BASE, "task=finetune_evaluate", "finetune=full", "finetune.lr=1e-3", "finetune.batch_size=4",
                "finetune.train_limit=4", "finetune.max_length=96", "trainer.max_steps=2", "policy=hsd",
                "policy.s=1", "policy.min=0", "policy.max=4"], run_dir)
    assert code == 0

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    export = run_dir / "hf_model"  # the trained weights as safetensors: model=... model.path=<run>/hf_model
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_examples"] == 4 and metrics["complete"] is True
    assert metrics["policy_label"] == "hsd(s=1,0,4)" and metrics["avg_layers"] < 6.0
    assert metrics["ckpt_path"] == str(ckpt)  # the fine-tuned weights were evaluated, and the report can tell
    assert len(read_predictions(run_dir)) == 4
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["task"] == "finetune_evaluate" and saved["model"]["name"] == "tiny-llama"
    assert (run_dir / "hsd.log").is_file()
    assert list(run_dir.glob("csv/**/metrics.csv"))


def test_finetune_evaluate_keeps_training_curves(tmp_path):
    tasks.run(make_cfg(tmp_path, "task=finetune_evaluate", "finetune=full", "finetune.batch_size=4",
                       "finetune.train_limit=4", "finetune.max_length=96", "trainer.max_steps=2",
                       "trainer.log_every_n_steps=1"))
    header = "".join(p.read_text().splitlines()[0] for p in tmp_path.glob("csv/**/metrics.csv"))
    assert "test/avg_layers" in header
    assert "train/loss_step" in header


def test_sweep_objective_penalises_runs_over_the_layer_budget():
    from hsd_exp.__main__ import objective

    run = {"rougeL": 40.0, "avg_layers": 18.0, "num_layers": 30}
    assert objective(run, None) == 40.0
    assert objective(run, 20) == 40.0
    assert objective(run, 15) == pytest.approx(40.0 - 100.0 - 100.0 * 3 / 30)  # over budget: below any in-budget run
    assert objective(run, 15) < objective({"rougeL": 0.0, "avg_layers": 15.0, "num_layers": 30}, 15)
    assert objective({"task": "finetune"}, 15) is None


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_evaluation_scores_every_example_once_and_resumes(tmp_path):
    """trainer.devices=2 strategy=ddp on CPU (gloo): the same code path as several GPUs, config alone.

    Lightning re-launches ``python -m hsd_exp ...`` for rank 1, so this runs the real CLI. Each rank streams
    its own file; DistributedSampler repeats one of the 5 examples to even the ranks out; rank 0 scores
    each id once. A rerun after losing a rank's last line regenerates only that example.
    """
    import subprocess

    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "hsd_exp", "task=evaluate", *[o for o in BASE if "limit" not in o],
           "dataset.limit=5", "trainer.devices=2", "trainer.strategy=ddp", "policy=hsd", "policy.s=1",
           "policy.max=4", "callbacks=none", f"hydra.run.dir={run_dir}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(run_dir.glob("predictions*.jsonl"))
    assert [f.name for f in files] == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    per_rank = [read_predictions(f) for f in files]
    assert [len(r) for r in per_rank] == [3, 3]
    ids = {r["id"] for recs in per_rank for r in recs}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(ids) == 5 and metrics["num_examples"] == 5

    # Lose one example that only rank 1 holds (not the sampler's repeat): the rerun must generate it again.
    lost = next(r for r in per_rank[1] if r["id"] not in {x["id"] for x in per_rank[0]})
    kept = [line for line in files[1].read_text().splitlines(keepends=True) if json.loads(line)["id"] != lost["id"]]
    files[1].write_text("".join(kept))
    (run_dir / "metrics.json").unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = [r for f in sorted(run_dir.glob("predictions*.jsonl")) for r in read_predictions(f)]
    assert lost["id"] in [r["id"] for r in again]  # (on both ranks: the sampler pads 1 example to 2)
    assert {r["id"] for r in again} == ids
    assert json.loads((run_dir / "metrics.json").read_text())["num_examples"] == 5


def test_ddp_inside_a_multirun_is_refused(tmp_path):
    """Lightning relaunches rank 1 with the command line, -m included: each rank would run a sweep of its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def hydra_cfg(mode: str, *overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="config", return_hydra_config=True,
                           overrides=[*BASE, f"hydra.mode={mode}", f"paths.output_dir={tmp_path}", *overrides])

    ddp = ("task=evaluate", "model=phi2", "trainer.devices=2", "trainer.strategy=ddp")  # phi2: not loadable offline
    try:
        cfg = hydra_cfg("MULTIRUN", *ddp)
        HydraConfig.instance().set_config(cfg)
        with pytest.raises(ConfigError) as err:
            tasks.run(cfg)
        for text in ("trainer.devices=2", "MULTIRUN", "policy=$p", "trainer.devices=1"):
            assert text in str(err.value)
        assert "microsoft/phi-2" not in str(err.value)  # refused before the model loads
        for ok in (hydra_cfg("MULTIRUN", "task=evaluate"), hydra_cfg("RUN", *ddp),
                   hydra_cfg("MULTIRUN", "task=generate", "trainer.devices=2")):
            HydraConfig.instance().set_config(ok)
            ranks = 1 if ok.task == "generate" else world_size(ok.trainer)
            preflight.check_multirun_ddp(ok, ranks)  # one device, a single run, or no Trainer at all
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(("trainer", "cuda", "expected"), [
    ({"devices": 2}, 0, 2), ({"devices": "2"}, 0, 2), ({"devices": [0, 1]}, 2, 2), ({"devices": "0,1"}, 2, 2),
    ({"devices": "auto", "accelerator": "cpu"}, 4, 1), ({"devices": -1, "accelerator": "gpu"}, 4, 4),
    ({"devices": "auto", "accelerator": "auto"}, 0, 1), ({"devices": 2, "num_nodes": 2}, 0, 4),
    ({"devices": 1}, 4, 1),
])
def test_num_processes(trainer, cuda, expected):
    """The rank count comes from Lightning's own Trainer (built, never run)."""
    from omegaconf import OmegaConf

    with mock.patch.object(torch.cuda, "is_available", return_value=cuda > 0), \
            mock.patch.object(torch.cuda, "device_count", return_value=cuda):
        assert world_size(OmegaConf.create({"_target_": "pytorch_lightning.Trainer", **trainer})) == expected


# ---------------------------------------------------------------------------------------------- device / dtype
def _on_gpu_machine():
    """Pretend a bf16-capable GPU is visible (the checks must not depend on the test machine)."""
    return mock.patch.multiple(torch.cuda, is_available=mock.DEFAULT, is_bf16_supported=mock.DEFAULT,
                               device_count=mock.DEFAULT)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["trainer=cpu"], {"device": "cpu"}),
    (["trainer=gpu"], {}),  # one GPU: as before (auto -> cuda, bf16)
    (["trainer=ddp"], {"device": "cpu", "dtype": "bfloat16"}),  # each rank: Lightning moves it to its own GPU
    (["trainer=ddp", "model.device=cuda"], {"device": "cpu", "dtype": "bfloat16"}),  # not every rank on cuda:0
    (["trainer=ddp", "task=generate"], {}),  # no Trainer: generate() runs where the model is
    (["trainer=gpu", "task=finetune", "finetune=full"], {"dtype": "float32"}),
    (["trainer=gpu", "task=finetune_evaluate", "finetune=lora"], {}),  # peft keeps the adapters fp32
    (["trainer=gpu", "task=evaluate", "finetune=full"], {}),  # evaluating a full checkpoint: bf16 is fine
    (["trainer=ddp", "task=finetune", "finetune=full"], {"device": "cpu", "dtype": "float32"}),
])
def test_model_device_and_dtype_follow_the_trainer(tmp_path, overrides, expected):
    with _on_gpu_machine() as cuda:
        cuda["is_available"].return_value, cuda["is_bf16_supported"].return_value = True, True
        cuda["device_count"].return_value = 2
        cfg = compose_config(tmp_path, "model=smollm2-135m", "task=evaluate", *overrides)
        assert tasks.model_overrides(cfg, world_size(cfg.trainer)) == expected


def test_trainer_cpu_loads_a_float32_cpu_model_on_a_gpu_machine(tmp_path):
    with _on_gpu_machine() as cuda:
        cuda["is_available"].return_value, cuda["is_bf16_supported"].return_value = True, True
        cuda["device_count"].return_value = 1
        cfg = make_cfg(tmp_path, "task=evaluate", "trainer=cpu", "model.device=auto", "model.dtype=auto")
        lm = tasks.build(cfg.model, **tasks.model_overrides(cfg, world_size(cfg.trainer)))
        assert lm.model.device.type == "cpu" and lm.model.dtype == torch.float32
        assert bertscore_config(cfg)["device"] == "cpu"  # bertscore.device=auto follows the run


def test_full_finetune_refuses_half_precision_weights(tmp_path):
    cfg = compose_config(tmp_path, "model=smollm2-135m", "task=finetune", "finetune=full", "model.dtype=bf16")
    with pytest.raises(ConfigError, match=r"model.dtype=bf16.*model.dtype=auto"):
        tasks.model_overrides(cfg, 1)


# ---------------------------------------------------------------------------------------------- early checks
def test_skip_aware_training_with_calm_is_refused_before_the_model_loads(tmp_path):
    cfg = make_cfg(tmp_path, "task=finetune_evaluate", "model=phi2", "finetune=full", "finetune.skip_aware=true",
                   "policy=calm")
    with pytest.raises(ConfigError) as err:
        tasks.run(cfg)
    assert "finetune.skip_aware=true" in str(err.value) and "policy=calm" in str(err.value)
    assert "policy=hsd_s1_max18" in str(err.value)


def test_bad_bertscore_device_is_refused_before_the_model_loads(tmp_path):
    cfg = make_cfg(tmp_path, "task=evaluate", "model=phi2", "bertscore.enabled=true", "bertscore.device=gpu")
    with pytest.raises(ConfigError, match="bertscore.device=gpu"):
        tasks.run(cfg)


def test_missing_bertscore_backbone_is_refused_before_the_model_loads(tmp_path):
    """Not after the whole decoding loop, with no metrics.json written (model=phi2 is not cached here)."""
    cfg = make_cfg(tmp_path, "task=evaluate", "model=phi2", "bertscore.enabled=true", "bertscore.device=cpu",
                   "bertscore.model=hsd-exp-tests/not-cached", "bertscore.fallback=hsd-exp-tests/none-either")
    with pytest.raises(ConfigError, match="bertscore.enabled=false"):
        tasks.run(cfg)


# ---------------------------------------------------------------------------------------------- progress
@pytest.mark.parametrize(("mode", "bar"), [("default", "RichProgressBar"), ("plain", "TQDMProgressBar"),
                                           ("none", None)])
def test_progress_bar_for_evaluation_too(tmp_path, mode, bar):
    trainer = make_trainer(make_cfg(tmp_path, "task=evaluate", f"callbacks={mode}"), [], tmp_path)  # evaluation
    got = trainer.progress_bar_callback
    assert (type(got).__name__ if got is not None else None) == bar


# ---------------------------------------------------------------------------------------------- W&B
def test_wandb_gives_each_policy_its_own_run(tmp_path, monkeypatch):
    """WandbLogger reuses a run still open in the process: without finishing it after each evaluation, every
    policy of a compare (and every job of a basic-launcher multirun) logged into the first one's run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    tasks.run(make_cfg(tmp_path, "task=compare", f"compare_policies=[{FULL},{HSD}]", "logger=wandb"))

    runs = {d: list((tmp_path / d / "wandb").glob("offline-run-*")) for d in ("full", "hsd_s_1_0_4")}
    assert all(len(found) == 1 for found in runs.values()), runs
    ids = {found[0].name.rsplit("-", 1)[1] for found in runs.values()}
    assert len(ids) == 2
    import wandb
    assert wandb.run is None  # nothing left open for the next job


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_mismatch_names_the_model_preset(tmp_path):
    """The error names the preset the user sets (model=tiny-llama), not its family's model_type (llama)."""
    import pytorch_lightning as pl

    ckpt = tmp_path / "other.ckpt"  # a Lightning checkpoint of another model: keys that do not fit
    torch.save({"state_dict": {"model.transformer.wte.weight": torch.zeros(4, 2)},
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, ckpt)
    with pytest.raises(ConfigError, match=rf"ckpt_path={ckpt} does not fit model=tiny-llama with finetune=none"):
        tasks.run(make_cfg(tmp_path, "task=evaluate", f"ckpt_path={ckpt}"))


# ---------------------------------------------------------------------------------------------- what a run prints
def test_generate_writes_its_result_to_the_run_log(tmp_path):
    """hsd.log (the Hydra job log) stayed empty for task=generate: its result was printed, not logged."""
    run_dir = tmp_path / "run"
    assert cli([*BASE, "task=generate", "prompt=Hello there"], run_dir) == 0
    log_text = (run_dir / "hsd.log").read_text()
    assert "Avg. Layer" in log_text and "Hello there" in log_text


def test_generate_ticks_its_token_bar(tmp_path, monkeypatch):
    """task=generate has a bar too (README): one tick per generated token; callbacks=none turns it off."""
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def fake_bar(total, description, unit="tokens", enabled=True, min_interval=0.1):
        ticks = []
        seen.append((total, enabled, ticks))
        yield lambda description=None: ticks.append(1)

    monkeypatch.setattr(tasks, "progress_bar", fake_bar)
    tasks.run(make_cfg(tmp_path, "task=generate", "+decode.min_new_tokens=8"))
    tasks.run(make_cfg(tmp_path, "task=generate", "callbacks=none"))
    assert [(total, enabled) for total, enabled, _ in seen] == [(8, True), (8, False)]
    assert len(seen[0][2]) == 8


def test_comparison_shows_each_prediction_on_one_line(tmp_path, capsys, monkeypatch):
    """The demo's side-by-side view broke on raw newlines in predictions."""
    import hsd_exp.report.tables as tables

    for name, prediction in (("full", "one line"), ("hsd_s_1_0_18", "Blue\n\n und-red\r\n too")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text(json.dumps(
            {"id": "0", "source": "name[Blue Spice]", "references": ["A coffee shop."], "prediction": prediction,
             "layers_per_token": [30]}) + "\n")
    (tmp_path / "report.md").write_text("table\n")
    monkeypatch.setattr(tables, "write_report", lambda runs, out: {"md": str(tmp_path / "report.md"),
                                                                  "png": str(tmp_path / "plot.png")})
    tasks.print_comparison(tmp_path)
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert "hsd_s_1_0_18: Blue\\n\\n und-red\\n too" in lines, lines


# ---------------------------------------------------------------------------------------------- Ctrl-C
@pytest.fixture
def sigint_restored():
    import signal

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT once it has caught one
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("where", ["decoding", "loading"])
def test_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch, sigint_restored, where):
    """Ctrl-C exits 130 with one line naming the rerun that resumes (inside trainer.test Lightning turns it into
    sys.exit(1); while the model loads it is a plain KeyboardInterrupt)."""
    from hsd_exp.train.module import CausalLMModule

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    target = (CausalLMModule, "generate_batch") if where == "decoding" else (tasks, "build")
    monkeypatch.setattr(*target, interrupt)
    run_dir = tmp_path / "run"
    assert cli([*BASE, "task=evaluate", "policy=full"], run_dir) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("interrupted: ")]
    assert len(err) == 1 and f"hydra.run.dir={run_dir}" in err[0], err
