"""The Hydra CLI: every config group member and experiment composes; bad input fails with one clear line.

Composition is checked in-process with Hydra's compose API (fast). The bad-input cases run the real
``python -m hsd_exp`` in subprocesses, all started at once (each pays ~5-10 s importing Lightning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hsd_exp.errors import ConfigError
from hsd_exp.skip.policies import Policy

from helpers import run_python

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("model", "dataset", "policy", "decode", "finetune", "trainer", "callbacks", "logger", "paths", "bertscore",
          "hydra")
TASKS = ("generate", "evaluate", "finetune", "finetune_evaluate", "compare")


def members(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], tmp: Path | str = "/tmp/hsd-compose", hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.output_dir={tmp}"],
                       return_hydra_config=hydra_cfg)


def resolved(cfg) -> dict:
    """Every interpolation of the job config resolves (no missing keys, no unknown resolvers)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def build_policies(cfg) -> list[Policy]:
    """``policy`` and every ``compare_policies`` entry, validated against the model's layer count."""
    nodes = [cfg.policy, *(cfg.get("compare_policies") or [])]
    return [instantiate(node, num_layers=cfg.model.num_layers) for node in nodes]


# ---------------------------------------------------------------------------------------------- compose
GROUP_MEMBERS = [(g, m) for g in GROUPS if g != "hydra" for m in members(g)]


def test_every_group_has_members():
    for group in GROUPS:
        assert members(group), f"conf/{group}/ is empty"


# what a member leaves to the user (???), as its header comment's example sets it
USER_VALUES = {("dataset", "custom"): ["dataset.path=/data/notes", "dataset.source_field=text",
                                       "dataset.target_field=summary", "dataset.instruction=Summarize the note.",
                                       "dataset.separator=Summary:"]}


@pytest.mark.parametrize(("group", "member"), GROUP_MEMBERS, ids=[f"{g}={m}" for g, m in GROUP_MEMBERS])
def test_group_member_composes(group, member):
    cfg = compose_cfg([f"{group}={member}", *USER_VALUES.get((group, member), [])])
    job = resolved(cfg)
    assert job["task"] in TASKS
    if group == "model":
        assert cfg.model.name == member
        assert cfg.model._target_ == "hsd_exp.models.load_model"
        assert isinstance(cfg.model.num_layers, int) and cfg.model.num_layers > 0
        from hsd_exp.models.layout import TESTED

        assert cfg.model.family in TESTED
    elif group == "dataset":
        assert cfg.dataset.name == member
        for key in ("source_field", "target_field", "split", "max_new_tokens", "separator"):
            assert cfg.dataset.get(key) is not None, f"dataset={member}: {key} unset"
        assert job["decode"]["max_new_tokens"] == cfg.dataset.max_new_tokens
    elif group == "policy":
        # the default model (smollm2-135m, 30 layers) takes every preset, paper grid included
        (policy,) = build_policies(cfg)
        assert isinstance(policy, Policy)
        assert policy.name == cfg.policy.name
        assert member.startswith(policy.name)
    elif group == "decode":
        from transformers import GenerationConfig

        d = job["decode"]
        assert d["batch_size"] >= 1 and d["num_beams"] >= 1 and d["max_new_tokens"] > 0
        GenerationConfig(max_new_tokens=d["max_new_tokens"], num_beams=d["num_beams"], do_sample=d["do_sample"],
                         temperature=d["temperature"], top_p=d["top_p"]).validate()
    elif group == "finetune":
        from hsd_exp.train.recipes import Recipe

        recipe = Recipe.from_config(job["finetune"], None, cfg.model.num_layers)  # its keys fit the default model
        assert cfg.finetune.mode == member or (cfg.finetune.mode == "lora" and not recipe.plain)  # a LoRA recipe
        if member != "none":
            assert cfg.finetune.lr > 0 and cfg.finetune.batch_size >= 1
        if cfg.finetune.mode == "lora":
            assert cfg.finetune.lora.r > 0
    elif group == "trainer":
        assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
        if member in ("default", "cpu"):  # the others need GPUs
            import pytorch_lightning as pl

            trainer = instantiate(job["trainer"], logger=False, enable_progress_bar=False)
            assert isinstance(trainer, pl.Trainer)
    elif group == "callbacks":
        for node in job["callbacks"].values():
            assert node["_target_"].startswith("pytorch_lightning.callbacks.")
        if not job["callbacks"]:  # no bar of ours: Lightning's default one must stay off too
            assert job["trainer"]["enable_progress_bar"] is False
    elif group == "bertscore":  # the one home of the BERTScore defaults: what eval.metrics fills in
        from hsd_exp.eval.metrics import bertscore_defaults

        assert job["bertscore"] == bertscore_defaults() and job["bertscore"]["enabled"] is True
    elif group == "logger":
        assert job["logger"], "logger group member defines no logger"
        for node in job["logger"].values():
            assert node["_target_"].startswith("pytorch_lightning.loggers.")


def test_hydra_group_composes():
    cfg = compose_cfg(["model=tiny-llama"], hydra_cfg=True)
    hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert hydra_node["job"]["chdir"] is False  # relative dataset/model paths stay relative to the launch dir
    assert "${task_name}" in hydra_node["run"]["dir"] and "${task_name}" in hydra_node["sweep"]["dir"]
    assert "${hsd_policy_slug:${policy}}" in hydra_node["sweep"]["subdir"]  # multirun folders name their policy
    assert hydra_node["job_logging"]["handlers"]["file"]["filename"].startswith("${hydra.runtime.output_dir}")


@pytest.mark.parametrize(("policy", "num", "folder"), [
    (["policy=hsd_s1_max18"], 5, "5_hsd_s_1_0_18"),
    (["policy=hsd", "policy.s=2", "policy.max=8", "policy.keep_first=2"], 0, "0_hsd_s_2_0_8_keep_first_2"),
    (["policy=skipdecode_10_20"], 3, "3_skipdecode_10_20"),
    (["policy=calm_d002"], 1, "1_calm_d_0.02_softmax"),
    (["policy=full"], 0, "0_full"),
])
def test_multirun_job_folder_names_the_policy_label(policy, num, folder):
    """Multirun job folders read like task=compare's (slug of the label), after the job number: `5_hsd` said
    nothing about s, min or max."""
    from hsd_exp.run_folder import slug

    cfg = compose_cfg(["model=tiny-llama", *policy], hydra_cfg=True)
    OmegaConf.update(cfg, "hydra.job.num", num, force_add=True)
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == folder
    assert folder.split("_", 1)[1] == slug(instantiate(cfg.policy).label)


EXPERIMENTS = members("experiment") if (CONF / "experiment").is_dir() else []


@pytest.mark.parametrize("experiment", EXPERIMENTS or [pytest.param(None, marks=pytest.mark.skip("no experiments"))])
def test_experiment_composes(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    job = resolved(cfg)
    assert job["task"] in TASKS
    policies = build_policies(cfg)  # every policy fits the experiment's model
    if cfg.task == "compare":
        assert len(policies) >= 2, f"experiment={experiment}: task=compare needs compare_policies"
    if cfg.task in ("finetune", "finetune_evaluate"):
        assert cfg.finetune.mode in ("full", "lora"), f"experiment={experiment}: {cfg.task} with finetune=none"
    if cfg.dataset.get("path") == "sample":
        assert (ROOT / "hsd_exp" / "samples" / cfg.dataset.name).is_dir()
    if cfg.dataset.name == "common_gen" and not cfg.dataset.get("path"):  # from the Hub
        assert cfg.dataset.split != "test", f"experiment={experiment}: the Hub's CommonGen test split has no references"


SWEEPS = members("sweep") if (CONF / "sweep").is_dir() else []


@pytest.mark.parametrize("sweep", SWEEPS or [pytest.param(None, marks=pytest.mark.skip("no sweeps"))])
def test_sweep_composes(sweep):
    cfg = compose_cfg(["+experiment=smollm2_e2e" if "smollm2_e2e" in EXPERIMENTS else "model=smollm2-135m",
                       f"+sweep={sweep}"], hydra_cfg=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params
    if "policy" in params:  # a list of policy presets: each must compose and fit the model
        for preset in str(params.policy).split(","):
            sub = compose_cfg([f"policy={preset.strip()}"])
            build_policies(sub)


def sweep_tasks(overrides: list[str], tmp: Path) -> list[str]:
    """``task`` of every job a real multirun would launch (Hydra's own sweeper and launcher, in-process), with
    a stand-in task function that records each job's config instead of loading a model."""
    from hydra.core.global_hydra import GlobalHydra

    tasks: list[str] = []

    def job(cfg) -> float:
        tasks.append(cfg.task)
        return 0.0  # Optuna needs a number

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        GlobalHydra.instance().hydra.multirun(
            config_name="config", task_function=job, with_log_configuration=False,
            overrides=[*overrides, f"hydra.sweep.dir={tmp}", f"paths.output_dir={tmp}"])
    return tasks


@pytest.mark.parametrize("sweep", ["paper", "optuna"])
@pytest.mark.parametrize("order", ["sweep-last", "sweep-first"])
def test_sweep_task_wins_over_the_experiment_whatever_the_order(sweep, order, tmp_path):
    """+experiment=phi2_xsum sets task=finetune_evaluate; whichever comes first, each job of the sweep must
    evaluate (a finetune_evaluate job would fine-tune again), and task=... on the command line still wins."""
    pair = ["+experiment=phi2_xsum", f"+sweep={sweep}"]
    overrides = pair if order == "sweep-last" else pair[::-1]
    # two jobs each (every job composes afresh: ~2 s each on a busy CPU), the sweep's task param unchanged
    if sweep == "optuna":
        overrides.append("hydra.sweeper.n_trials=2")
    else:
        overrides.append("hydra.sweeper.params.policy='full,hsd_s2_max8'")
    assert sweep_tasks(overrides, tmp_path / "a") == ["evaluate", "evaluate"]
    if order == "sweep-first":
        assert sweep_tasks([*overrides, "task=generate"], tmp_path / "b") == ["generate", "generate"]


# ---------------------------------------------------------------------------------------------- CLI
def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def run_cli(*args: str, tmp: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsd_exp", *args, f"hydra.run.dir={tmp}"], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def test_help_lists_groups(tmp_path):
    out = run_cli("--help", tmp=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    for group in ("model", "dataset", "policy", "decode", "finetune", "trainer", "logger"):
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(f"{group}: ")), None)
        assert line is not None, f"--help does not list the {group} group:\n{out.stdout[:2000]}"
        assert set(members(group)) <= {m.strip() for m in line.split(":", 1)[1].split(",")}


def test_cfg_job_prints_composed_config(tmp_path):
    out = run_cli("--cfg", "job", "model=tiny-llama", "policy=hsd", "policy.max=4", "decode=beam4",
                  tmp=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert "hydra" not in cfg
    assert cfg["model"]["name"] == "tiny-llama"
    assert cfg["policy"]["name"] == "hsd" and cfg["policy"]["max"] == 4
    assert cfg["decode"]["num_beams"] == 4
    assert set(GROUPS) - {"hydra"} <= set(cfg)
    assert not list(tmp_path.iterdir()), "--cfg job must not run the task"


# Bad input: id -> (overrides, strings the error must contain, exit code or None for "not 0").
# Cases that add model=phi2 (not cached, offline) prove the check runs before the model loads: were it
# checked after, the run would fail on the model instead.
BAD = {
    "unknown-model": (["model=nope"], ["model=nope is not in conf/model/", "smollm2-135m"], 2),
    # a group typo: one line with the choices, not Hydra's listing of the search path and every group
    "group-typo": (["policy=hds"], ["policy=hds", "did you mean policy=hsd?", "skipdecode_10_20"], 2),
    "missing-model-path": (["task=evaluate", "model=gpt2", "model.path=/nonexistent/gpt2", "dataset.path=sample"],
                           ["model.path=/nonexistent/gpt2"], 2),
    "offline-hub-id": (["task=evaluate", "model=phi2", "dataset.path=sample"], ["microsoft/phi-2"], 2),
    "hsd-negative-s": (["model=phi2", "policy=hsd", "policy.s=-1"], ["policy.s=-1"], 2),
    "hsd-max-over-layers": (["model=smollm2-135m", "policy=hsd", "policy.max=40"], ["policy.max=40", "30"], 2),
    "calm-zero-d": (["model=phi2", "policy=calm", "policy.d=0"], ["policy.d=0"], 2),
    "lora-eval-no-ckpt": (["task=evaluate", "model=phi2", "finetune=lora", "dataset.path=sample"],
                          ["ckpt_path", "finetune=lora"], 2),
    "missing-ckpt": (["task=evaluate", "model=phi2", "dataset.path=sample", "ckpt_path={tmp}/gone/last.ckpt"],
                     ["ckpt_path={tmp}/gone/last.ckpt"], 2),
    "missing-split": (["task=evaluate", "model=phi2", "dataset.path=sample", "dataset.split=nosuch"],
                      ["nosuch", "train"], 2),
    # Lightning would relaunch rank 1 with this command line (-m included): a second sweep of its own
    "ddp-in-multirun": (["-m", "task=evaluate", "model=phi2", "dataset.path=sample", "trainer.accelerator=cpu",
                         "trainer.devices=2", "trainer.strategy=ddp", "hydra.sweep.dir={tmp}/sweep"],
                        ["trainer.devices=2", "MULTIRUN", "trainer.devices=1"], 2),
}
# Each runs for real as `python -m hsd_exp`, all started at once in the background when this module's first
# test runs (each pays ~5-10 s of imports). In-process runs of Hydra's main proved fragile: its job logging
# binds to pytest's captured streams.
SUBPROCESS = tuple(BAD)


def check_failure(name: str, code: int, stdout: str, stderr: str, tmp: Path) -> None:
    """Exit status != 0 (2 for ConfigError), one clear line naming the value, no traceback, no model load."""
    _, expected, want = BAD[name]
    output = stdout + stderr
    assert code != 0, output[-3000:]
    if want is not None:
        assert code == want, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if want == 2:  # our ConfigError path: exactly one `error: ...` line on stderr
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, stderr[-3000:]
        message = errors[0]
    else:
        message = stderr
    for text in expected:
        assert text.format(tmp=tmp) in message, f"{name}: {text.format(tmp=tmp)!r} not in {message!r}"
    assert "Loading weights" not in output, f"{name}: the model was loaded before the input was checked"


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Start the real-CLI runs at once, in the background; their tests (at the end) wait for them."""
    procs = {}
    for name in SUBPROCESS:
        tmp = tmp_path_factory.mktemp(name)
        args = [a.format(tmp=tmp) for a in BAD[name][0]]
        procs[name] = (tmp, subprocess.Popen([sys.executable, "-m", "hsd_exp", *args, f"hydra.run.dir={tmp}/run"],
                                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_input_cli(cli_runs, name):
    tmp, proc = cli_runs[name]
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{name}: python -m hsd_exp did not finish")
    check_failure(name, proc.returncode, stdout, stderr, tmp)


# ---------------------------------------------------------------------------------------------- in-process errors
def _run(overrides: list[str], tmp_path):
    from hsd_exp.tasks import run

    return run(compose_cfg(["bertscore.enabled=false", *overrides], tmp=tmp_path))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["task=nope"], "task=nope"),
    (["task=compare", "model=phi2"], "compare_policies"),
    (["task=finetune", "model=phi2", "finetune=none", "dataset.path=sample"], "finetune=full"),
    (["task=evaluate", "model=phi2", "dataset.path=/nonexistent/data"], "/nonexistent/data"),
    (["task=evaluate", "model=phi2", "dataset.path=sample", "dataset.limit=abc"], "dataset.limit='abc'"),
    (["task=finetune", "model=phi2", "finetune=full", "dataset.path=sample", "dataset.name=xsum"], "sample"),
], ids=["unknown-task", "compare-without-policies", "finetune-none", "missing-dataset-path", "bad-limit",
        "no-sample"])
def test_config_errors_before_model_load(tmp_path, overrides, expected):
    """ConfigError (-> `error: ...`, exit 2) naming the value, raised before model=phi2 would fail to load."""
    with pytest.raises(ConfigError) as err:
        _run(overrides, tmp_path)
    assert expected in str(err.value)
    assert "microsoft/phi-2" not in str(err.value)


@pytest.mark.parametrize(("launcher", "target"), [("joblib", "joblib"), ("submitit_slurm", "submitit")])
def test_launchers_compose(launcher, target):
    cfg = compose_cfg(["+sweep=paper", f"hydra/launcher={launcher}"], hydra_cfg=True)
    assert target in cfg.hydra.launcher._target_.lower()


def test_slurm_gpu_launcher_asks_for_a_gpu_per_job():
    """submitit_slurm's defaults ask for no GPU and 60 minutes: the paper presets need both changed."""
    cfg = compose_cfg(["+experiment=phi2_xsum", "+sweep=paper", "hydra/launcher=slurm_gpu"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_.lower() and "slurm" in launcher._target_.lower()
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.timeout_min >= 600


def test_optuna_search_space_holds_only_valid_policies():
    """Optuna's integer ranges include their end: every point of the space must build for a 30-layer model."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_cfg(["+experiment=smollm2_e2e", "+sweep=optuna"], hydra_cfg=True)
    parser = OverridesParser.create()
    space = {}
    for key, value in cfg.hydra.sweeper.params.items():
        sweep = parser.parse_override(f"{key}={value}")
        if not sweep.is_sweep_override():  # a fixed param (task=evaluate)
            continue
        if sweep.is_choice_sweep():
            space[key] = [int(v) for v in sweep.sweep_string_iterator()]
        else:  # range(start, stop, step) as Optuna reads it: the end included
            r = sweep.value()
            space[key] = list(range(int(r.start), int(r.stop) + 1, int(r.step)))
    for s in space["policy.s"]:
        for lo in space["policy.min"]:
            for hi in space["policy.max"]:
                instantiate(OmegaConf.create({"_target_": "hsd_exp.build_policy", "name": "hsd",
                                              "s": s, "min": lo, "max": hi}), num_layers=30)


PAPER_SETTINGS = {  # the paper's 11 decoding settings: preset name -> its parameters
    "full": {"name": "full"},
    "calm_d002": {"name": "calm", "d": 0.02, "criterion": "softmax"},
    "calm_d0005": {"name": "calm", "d": 0.005, "criterion": "softmax"},
    "skipdecode_10_20": {"name": "skipdecode", "min": 10, "max": 20, "keep_first": 0},
    "skipdecode_10_24": {"name": "skipdecode", "min": 10, "max": 24, "keep_first": 0},
    **{f"hsd_s{s}_max{m}": {"name": "hsd", "s": s, "min": 0, "max": m, "keep_first": 0}
       for s in (1, 2) for m in (18, 12, 8)},
}


def test_paper_sweep_is_the_papers_eleven_settings():
    cfg = compose_cfg(["+sweep=paper"], hydra_cfg=True)
    presets = [p.strip() for p in str(cfg.hydra.sweeper.params.policy).split(",")]
    assert len(presets) == 11 and set(presets) == set(PAPER_SETTINGS)
    labels = set()
    for preset in presets:
        sub = compose_cfg([f"policy={preset}"])
        node = OmegaConf.to_container(sub.policy, resolve=True)
        assert {k: node[k] for k in PAPER_SETTINGS[preset]} == PAPER_SETTINGS[preset], preset
        if node["name"] == "calm":
            assert node["decay"] is False and node["first_exit"] == 1, preset
        (policy,) = build_policies(sub)
        labels.add(policy.label)
    assert len(labels) == 11  # eleven distinct rows in the report


# ---------------------------------------------------------------------------------------------- sweeps' objective
def test_optuna_sweep_searches_under_the_layer_budget(tmp_path):
    """+sweep=optuna end to end on a tiny model: every trial evaluates, Optuna records the best objective."""
    import yaml

    from hsd_exp.__main__ import objective

    sweep = tmp_path / "optuna"
    res = run_python(["-m", "hsd_exp", "+sweep=optuna", "model=tiny-llama", "dataset.path=sample", "dataset.limit=2",
               "decode.max_new_tokens=4", "decode.batch_size=2", "bertscore.enabled=false", "avg_layer_budget=4",
               "hydra.sweeper.n_trials=3",
               'hydra.sweeper.params={policy.s:"choice(1,2)",policy.min:"choice(0)",policy.max:"range(2,6)"}',
               f"hydra.sweep.dir={sweep}"])
    assert res.returncode == 0, res.stderr[-3000:]
    trials = [json.loads((j / "metrics.json").read_text()) for j in sorted(sweep.iterdir()) if j.is_dir()]
    assert len(trials) == 3 and all(t["policy"] == "hsd" for t in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(objective(t, 4) for t in trials)
    in_budget = [t for t in trials if t["avg_layers"] <= 4]
    assert in_budget, [t["avg_layers"] for t in trials]
    (winner,) = [t for t in trials if objective(t, 4) == best["best_value"]][:1]
    assert winner["avg_layers"] <= 4  # an over-budget trial never wins while one within the budget exists


@pytest.mark.parametrize(("over", "within"), [
    ({"rougeL": 16.92, "avg_layers": 15.94}, {"rougeL": 15.02, "avg_layers": 14.9}),  # the audit's case
    ({"rougeL": 100.0, "avg_layers": 15.001}, {"rougeL": 0.0, "avg_layers": 15.0}),  # the extremes
])
def test_objective_ranks_every_over_budget_run_below_every_run_within(over, within):
    from hsd_exp.__main__ import objective

    over, within = {**over, "num_layers": 30}, {**within, "num_layers": 30}
    assert objective(over, 15) < 0 <= objective(within, 15)
    assert objective(within, 15) == within["rougeL"]
    assert objective(over, None) == over["rougeL"]  # no budget: plain ROUGE-L
    closer = {**over, "avg_layers": (over["avg_layers"] + 15) / 2}
    assert objective(over, 15) < objective(closer, 15)  # over the budget, fewer layers still score higher
