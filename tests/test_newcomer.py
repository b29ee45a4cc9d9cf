"""A newcomer's path (issue 26): what the CLI and the tasks say and record when a user tries them.

A lossless compare keeps its Full row plain; task=generate formats a non-chat prompt as evaluation does and says
why an answer is empty; W&B records the BERTScore backbone that scores; an evaluation ends with its run folder and
the report command; a config-group typo is one line; fine-tuning without a train file says what is missing; the
libraries' boilerplate stays out of a fine-tuning's output.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from hsd_exp import console, tasks
from hsd_exp.errors import ConfigError

from helpers import TASK_BASE as BASE
from helpers import TASK_FULL as FULL
from helpers import TASK_HSD as HSD
from helpers import cli_in_process as cli
from helpers import compose_config, load, run_python

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- lossless compare
def test_lossless_compare_keeps_the_full_row_plain(tmp_path, caplog):
    """decode=lossless made Full lossless too ("Full -> lossless"): no row had a plain baseline, so no Speedup.
    Full is listed last here: it still runs first, so the lossless row's line can name its speedup."""
    cfg = compose_config(tmp_path, *BASE, "task=compare", "decode=lossless", "decode.draft_len=2",
                         f"compare_policies=[{HSD},{FULL}]")
    with caplog.at_level(logging.INFO, logger="hsd_exp.tasks"):
        results = tasks.run(cfg)
    assert list(results) == ["hsd(s=1,0,4)", "full"]  # the config's order

    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    hsd = json.loads((tmp_path / "hsd_s_1_0_4" / "metrics.json").read_text())
    assert not full.get("lossless") and hsd["lossless"] is True
    run_json = json.loads((tmp_path / "full" / "run.json").read_text())
    assert "lossless" not in run_json["decode"] and "draft_len" not in run_json["decode"]  # decode=greedy's record
    # lossless output is greedy full decoding's, token for token
    full_preds = [json.loads(ln)["prediction"] for ln in (tmp_path / "full" / "predictions.jsonl").open()]
    hsd_preds = [json.loads(ln)["prediction"] for ln in (tmp_path / "hsd_s_1_0_4" / "predictions.jsonl").open()]
    assert full_preds == hsd_preds

    import csv

    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    lossless_rows = [r for m, r in rows.items() if "lossless" in m]
    assert len(lossless_rows) == 1 and lossless_rows[0]["speedup"], rows  # paired with the plain Full row
    assert not [m for m in rows if m.startswith("Full") and "lossless" in m], rows

    lines = [r.getMessage() for r in caplog.records if "lossless" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "acceptance" in lines[0] and "x plain full decoding's tok/s" in lines[0], lines[0]


def test_wandb_run_name_names_the_decoding_mode():
    from hsd_exp.decoding import DecodeSettings
    from hsd_exp.train.trainer import wandb_run_name

    cfg = compose_config("/tmp/hsd-compose", *BASE, "decode=lossless")
    lossless = DecodeSettings.from_config(cfg.decode)
    plain = DecodeSettings.from_config(compose_config("/tmp/hsd-compose", *BASE).decode)
    assert wandb_run_name("hsd(s=1,0,4)", plain) == "hsd(s=1,0,4)"
    assert wandb_run_name("hsd(s=1,0,4)", lossless) == "hsd(s=1,0,4) lossless(k=4)"


def test_wandb_records_the_bertscore_backbone_that_scores(tmp_path):
    """W&B's config said bertscore.model=roberta-large (the config's first choice) where the scores came from the
    offline fallback: it records the backbone resolve_bertscore_backbone picks, as metrics.json does."""
    from hsd_exp.eval.metrics import resolve_bertscore_backbone
    from hsd_exp.train.trainer import logged_config

    cfg = compose_config(tmp_path, *BASE, "task=evaluate", "bertscore.enabled=true")
    try:
        used = resolve_bertscore_backbone(dict(cfg.bertscore))[2]
    except ConfigError as err:
        pytest.skip(f"no BERTScore backbone here: {err}")
    logged = logged_config(cfg, evaluates=True)
    assert logged["bertscore.model"] == used and logged["bertscore.requested"] == "roberta-large"
    assert logged_config(cfg, evaluates=False)["bertscore.model"] == "roberta-large"  # fine-tuning scores nothing


# ---------------------------------------------------------------------------------------------- task=generate
@pytest.fixture
def eos_first(monkeypatch):
    """The loaded model answers every prompt with EOS at once; ``prompts`` records the token ids it was given."""
    prompts = []
    real = tasks.build

    def build(node, **kwargs):
        lm = real(node, **kwargs)
        eos = lm.tokenizer.eos_token_id

        def generate(input_ids=None, **kw):
            prompts.append(input_ids[0].tolist())
            return torch.cat([input_ids, torch.full((len(input_ids), 1), eos)], dim=1)

        lm.model.generate = generate  # an instance attribute: layer_skipping wraps it as it wraps generate()
        return lm

    monkeypatch.setattr(tasks, "build", build)
    return prompts


def test_generate_formats_a_non_chat_prompt_as_evaluation_and_explains_an_empty_answer(tmp_path, eos_first, caplog):
    """The shipped E2E adapters (model.chat=false) printed an empty line and "Avg. Layer nan": the prompt lacked the
    dataset's separator, and nothing said why the answer was empty."""
    from hsd_exp.data.prompts import build_prompt

    cfg = compose_config(tmp_path, *BASE, "task=generate", 'prompt="name[Blue Spice], eatType[pub]"')
    with caplog.at_level(logging.INFO, logger="hsd_exp.tasks"):
        result = tasks.run(cfg)
    tok = load("tiny-llama").tokenizer
    expected = build_prompt("name[Blue Spice], eatType[pub]", cfg.dataset, tok, chat=False)
    assert expected.endswith("\n\nDescription:")
    assert eos_first == [tok(expected)["input_ids"]]  # evaluation's prompt, token for token
    assert result["prompt_format"] == {"chat": False, "instruction": cfg.dataset.instruction,
                                       "separator": "\n\nDescription:", "max_source_tokens": None}
    assert result["completion"] == "" and result["avg_layers"] is None  # not nan: there was no decode step
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "end-of-sequence token first" in warned[0], warned
    shown = [r.getMessage() for r in caplog.records if "Avg. Layer" in r.getMessage()]
    assert shown and "nan" not in shown[0], shown


# ---------------------------------------------------------------------------------------------- what to run next
def test_an_evaluation_ends_with_its_folder_and_the_report_command(tmp_path):
    run_dir = tmp_path / "run"
    assert cli([*BASE, "task=evaluate", "dataset.limit=2", "decode.max_new_tokens=4", f"hydra.run.dir={run_dir}"]) == 0
    log_text = (run_dir / "hsd.log").read_text()  # what the console showed, kept in the run's log
    assert f"run folder: {run_dir}  report: python -m hsd_exp.report {run_dir}" in log_text, log_text


def test_a_multirun_ends_with_its_sweep_folder_and_the_report_command(tmp_path):
    """Once, after the last job (Hydra's on_multirun_end); a subprocess: in-process Hydra runs share pytest's
    captured streams."""
    sweep = tmp_path / "sweep"
    out = run_python(["-m", "hsd_exp", "-m", *BASE, "task=evaluate", "dataset.limit=2", "decode.max_new_tokens=3,4",
                      f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-3000:]
    hints = [ln for ln in (out.stdout + out.stderr).splitlines() if "report: python -m hsd_exp.report" in ln]
    assert hints == [f"sweep folder: {sweep}  report: python -m hsd_exp.report {sweep}"], out.stdout
    assert len(list(sweep.glob("*/metrics.json"))) == 2


# ---------------------------------------------------------------------------------------------- group typos
@pytest.mark.parametrize(("argv", "expected"), [
    (["policy=hds"], "policy=hds is not in conf/policy/ (did you mean policy=hsd?); choose one of calm,"),
    (["model=smollm2"], "model=smollm2 is not in conf/model/ (did you mean model=smollm2-135m?)"),
    (["+experiment=dmeo"], "+experiment=dmeo is not in conf/experiment/ (did you mean +experiment=demo?)"),
    (["-m", "decode=greedy,lossles"], "decode=lossles is not in conf/decode/"),
])
def test_a_config_group_typo_is_one_line_naming_the_choices(argv, expected):
    from hsd_exp.__main__ import check_group_choices

    with pytest.raises(ConfigError) as err:
        check_group_choices(argv)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_valid_group_choices_and_other_overrides_pass():
    from hsd_exp.__main__ import check_group_choices

    check_group_choices(["policy=hsd_s1_max18", "model=tiny-llama", "+experiment=demo", "model.path=/x",
                         "policy=glob(*)", "~logger", "hydra/launcher=joblib", "decode=greedy,lossless", "-v"])


# ---------------------------------------------------------------------------------------------- own data
def test_fine_tuning_without_a_train_file_says_what_is_missing(tmp_path):
    """It advised dataset.split, which fine-tuning does not read: it always trains on the train split."""
    from hsd_exp.data.loaders import load_examples

    from helpers import dataset_cfg

    (tmp_path / "test.jsonl").write_text(json.dumps({"meaning_representation": "name[A]",
                                                     "human_reference": "A."}) + "\n")
    with pytest.raises(ConfigError) as err:
        load_examples(dataset_cfg("e2e", path=str(tmp_path)), split="train", limit=1)
    message = str(err.value)
    assert "train.jsonl" in message and "dataset.split=" not in message, message
    assert "dataset.split_fractions={train:0.9,test:0.1} dataset.split_source=test" in message
    # the fix it names works: the train split is carved out of test
    cfg = dataset_cfg("e2e", path=str(tmp_path), split_fractions={"train": 0.9, "test": 0.1}, split_source="test")
    assert load_examples(cfg, split="train") is not None


# ---------------------------------------------------------------------------------------------- noise
@pytest.fixture
def quiet(restore_console):
    """console.quiet_libraries for one test (restore_console, tests/conftest.py, puts its state back); the warnings
    raised meanwhile are recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries(verbose=False)
        yield caught


def test_lora_runs_without_the_gradient_checkpointing_future_warning(quiet):
    from transformers import AutoModelForCausalLM

    from hsd_exp.train.lora import apply_lora

    lm = load("tiny-llama")
    model = AutoModelForCausalLM.from_config(lm.model.config)
    apply_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0})
    assert not [w for w in quiet if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in quiet]


def test_fine_tuning_prints_no_model_summary_and_no_eval_mode_warning(tmp_path, quiet, capsys):
    tasks.run(compose_config(tmp_path, *BASE, "task=finetune", "finetune=lora", "finetune.batch_size=4",
                             "finetune.train_limit=4", "finetune.max_length=96", "trainer.max_steps=1"))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Total params" not in text and "Trainable params" not in text, text  # Lightning's model summary
    assert not [w for w in quiet if "in eval mode" in str(w.message)], [str(w.message) for w in quiet]


def test_setuptools_reads_the_project_without_a_deprecation_warning():
    """pip printed setuptools' licence deprecation (the ``project.license`` table form) on every install."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [str(w.message) for w in caught if "license" in str(w.message).lower()]
    assert dist.metadata.license_expression == "Apache-2.0"
