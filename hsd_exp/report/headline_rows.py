"""The headline tables' spec: which runs of which ``docs/results/<dir>/report.csv`` each row shows.

``hsd_exp.report.headlines`` renders them (its docstring: the checks, and how to add a row or a table). A row
names its run by the ``method`` the report wrote (``Pick``); a ``Line`` adds its own full-depth row, the plain
fine-tune's (fair framing: retention against both), its budget (rows of different budgets are never compared)
and, for a constant schedule, the policy whose ``layers()`` name its layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsd_exp.eval.metrics import QUALITY_KEYS


@dataclass(frozen=True)
class Pick:
    """The row of ``docs/results/<result>/report.csv`` whose ``method`` is ``method``."""
    result: str
    method: str


@dataclass(frozen=True)
class Line:
    """One row of a headline table: a run, its own full-depth run, and (fair framing) the plain fine-tune's."""
    what: str
    budget: str
    run: Pick
    own_full: Pick
    plain_full: Pick | None = None  # same data and budget, plain fine-tune; None: the run is the plain one
    policy: tuple | None = None  # (name, {params}) of a constant static schedule: names the layers
    best_at_most: float | None = None  # checked: the best % of full at <= this many layers among ``among``
    among: tuple[str, ...] = ()  # result folders holding the checkpoint's rows (default: the run's own)


@dataclass(frozen=True)
class Grid:
    """A matrix: one column per result folder, one row per label, each cell a method of that column's folder
    (a cell may name a Pick of another folder); cells read "Avg. Layer / % of full / R-L % of full"."""
    columns: tuple[tuple[str, str], ...]  # (header, result folder)
    rows: tuple[tuple[str, dict], ...]  # (label, {header: method | Pick})


@dataclass(frozen=True)
class Bench:
    """Rows of ``docs/results/<result>/bench.csv`` (what ``python -m hsd_exp.bench`` wrote) whose columns equal
    ``where``, in file order, shown as ``columns`` ((header, bench.csv column) pairs)."""
    result: str
    columns: tuple[tuple[str, str], ...]
    where: tuple[tuple[str, str], ...] = ()


BENCH_LOSSLESS = (("batch", "batch_size"), ("length", "length"), ("draft", "policy"), ("tokens", "tokens"),
                  ("acceptance", "acceptance"), ("speedup vs plain `generate()`", "measured_speedup"),
                  ("decode: measured", "decode_measured_speedup"), ("decode: bound", "decode_ideal_speedup"),
                  ("identical", "identical"), ("above ideal", "above_ideal"))
BENCH_STATIC = (("batch", "batch_size"), ("policy", "policy"), ("Avg. Layer", "avg_layers"),
                ("speedup vs plain `generate()`", "measured_speedup"), ("decode: measured", "decode_measured_speedup"),
                ("decode: FLOP ideal", "decode_ideal_speedup"), ("above ideal", "above_ideal"))


PAPER = ("Full", "SkipDecode (10,24)", "SkipDecode (10,20)", "HSD (s=1, 0, 18)", "HSD (s=1, 0, 12)",
         "HSD (s=1, 0, 8)", "HSD (s=2, 0, 18)", "HSD (s=2, 0, 12)", "HSD (s=2, 0, 8)", "CALM (d=0.005)",
         "CALM (d=0.02)")
GRID_COLUMNS = (("E2E, LoRA", "e2e_lora"), ("E2E, full FT", "e2e_full"), ("E2E, skip-aware LoRA", "e2e_skipaware"),
                ("CommonGen, LoRA", "cg_lora"), ("CommonGen, full FT", "cg_full"), ("XSum, no FT", "xsum"))
KEEP = "e2e_full_keepfirst"
PLAIN_200 = "Full [adapter=outputs/study/e2e_plain/hf_model]"
ROBUST = "[adapter=outputs/study/e2e_robust/hf_model]"
PLAIN = "[adapter=outputs/study/e2e_plain/hf_model]"
SHIPPED = "e2e_robust_shipped"  # the compare of +experiment=smollm2_e2e_robust with the shipped files
HEADLINE = ("skipdecode", {"min": 11, "max": 11, "keep_first": 6})
B100 = "100 steps x 8, first 600 train MRs"
B200 = "200 steps x 8, whole train split"
LORA100 = Pick("e2e_lora", "Full")  # the plain fine-tune of the 100-step budget (LoRA q/k/v/o)


def _robust(method: str, policy=None) -> Line:
    return Line("skip-robust LoRA, all linear layers", B200, Pick("e2e_robust", f"{method} {ROBUST}"),
                Pick("e2e_robust", f"Full {ROBUST}"), Pick("e2e_robust", PLAIN_200), policy)


def _shipped(method: str, policy=None) -> Line:
    """The shipped fp16 files themselves (+experiment=smollm2_e2e_robust), not the fp32 training output."""
    return Line("skip-robust LoRA, shipped fp16 adapter", B200, Pick(SHIPPED, method), Pick(SHIPPED, "Full"),
                Pick("e2e_robust", PLAIN_200), policy)


def _plain200(method: str, policy=None) -> Line:
    return Line("plain LoRA, all linear layers", B200, Pick("e2e_robust", f"{method} {PLAIN}"),
                Pick("e2e_robust", PLAIN_200), None, policy)


def _recipe(what: str, budget: str, own: Pick, hsd: Pick | None, best: Pick, among=(), plain=LORA100) -> list[Line]:
    """A recipe's rows: the paper's HSD (s=1, 0, 18) on it, and its best row at <= 22 layers (checked)."""
    rows = [Line(what, budget, hsd, own, plain)] if hsd else []
    return rows + [Line(what, budget, best, own, plain, best_at_most=22, among=among)]


TABLES: dict[str, list[Line] | Grid | Bench] = {
    "bench_robust_static": Bench("bench_robust", BENCH_STATIC, (("decode", "greedy"), ("length", "fixed"))),
    "bench_robust_lossless": Bench("bench_robust", BENCH_LOSSLESS, (("decode", "lossless"),)),
    "readme": [
        Line("the paper's schedules, plain LoRA q/k/v/o", B100, Pick("e2e_lora", "HSD (s=1, 0, 18)"), LORA100),
        Line("the paper's schedules, plain LoRA q/k/v/o", B100, Pick("e2e_lora", "SkipDecode (10,20)"), LORA100),
        Line("the paper's schedules, plain LoRA q/k/v/o", B100, Pick("e2e_lora", "CALM (d=0.005)"), LORA100),
        Line("SkipLayer router, LoRA q/k/v/o + router", B100, Pick("e2e_router", "SkipLayer (threshold=0.7)"),
             Pick("e2e_router", "Full"), LORA100),
        _robust("SkipDecode (11,11, keep_first=6)", HEADLINE),
        _shipped("SkipDecode (11,11, keep_first=6)", HEADLINE),
        _plain200("SkipDecode (11,11, keep_first=6)", HEADLINE),
        Line("Gemma-3-270M (Q4_K_M GGUF, dequantised), plain LoRA q/k/v/o", B100, Pick("gemma_e2e_lora", "HSD (s=1, 0, 10.8)"),
             Pick("gemma_e2e_lora", "Full")),
    ],
    "summary": Grid(GRID_COLUMNS, (
        *((m, {h: m for h, _ in GRID_COLUMNS}) for m in PAPER),
        ("*Ablation:* HSD (s=1, 0, 18), layers 1-2 kept", {"E2E, full FT": Pick(KEEP, "HSD (s=1, 0, 18, keep_first=2)"),
                                                           "XSum, no FT": "HSD (s=1, 0, 18, keep_first=1)"}),
        ("*Ablation:* HSD (s=2, 0, 18), layers 1-2 kept", {"E2E, full FT": Pick(KEEP, "HSD (s=2, 0, 18, keep_first=2)")}),
        ("*Ablation:* SkipDecode (10,20), layers 1-2 kept",
         {"E2E, full FT": Pick(KEEP, "SkipDecode (10,20, keep_first=2)")}),
        ("SkipLayer (threshold 0.7), LoRA + router†", {"E2E, LoRA": Pick("e2e_router", "SkipLayer (threshold=0.7)")}),
        ("SkipLayer (threshold 0.75), LoRA + router†", {"E2E, LoRA": Pick("e2e_router", "SkipLayer (threshold=0.75)")}),
    )),
    "robust_val": [Line("skip-robust LoRA (validation, 100 MRs)", B200, Pick("e2e_robust_val", m),
                        Pick("e2e_robust_val", "Full"), None, p and ("skipdecode", p))
                   for m, p in (("Full", None), *((f"SkipDecode ({n},{n}, keep_first={k})", {"min": n, "max": n,
                                "keep_first": k}) for n, k in ((11, 8), (11, 6), (9, 8), (13, 4), (9, 6), (11, 4))))],
    "robust_test": [_plain200("Full"), _plain200("SkipDecode (11,11, keep_first=6)", HEADLINE),
                    _plain200("HSD (s=1, 0, 18)"), _robust("Full"), _robust("SkipDecode (11,11, keep_first=6)",
                                                                          HEADLINE), _robust("HSD (s=1, 0, 18)"),
                    _shipped("Full"), _shipped("SkipDecode (11,11, keep_first=6)", HEADLINE),
                    _shipped("HSD (s=1, 0, 18)")],
    "recipes": [
        *_recipe("plain LoRA (q/k/v/o)", B100, LORA100, Pick("e2e_lora", "HSD (s=1, 0, 18)"),
                 Pick("e2e_lora", "SkipDecode (10,24)")),
        *_recipe("full fine-tuning", B100, Pick("e2e_full", "Full"), Pick("e2e_full", "HSD (s=1, 0, 18)"),
                 Pick(KEEP, "HSD (s=1, 0, 18, keep_first=2)"), among=("e2e_full", KEEP)),
        *_recipe("skip-aware LoRA (HSD (s=1, 0, 18) on half the steps)", B100, Pick("e2e_skipaware", "Full"),
                 Pick("e2e_skipaware", "HSD (s=1, 0, 18)"), Pick("e2e_skipaware", "CALM (d=0.02)")),
        *_recipe("LoRA + SkipLayer router (+ distillation)", B100, Pick("e2e_router", "Full"), None,
                 Pick("e2e_router", "SkipLayer (threshold=0.7)")),
        *_recipe("plain LoRA (every linear layer)", B200, Pick("e2e_robust", PLAIN_200),
                 Pick("e2e_robust", f"HSD (s=1, 0, 18) {PLAIN}"),
                 Pick("e2e_robust", f"SkipDecode (11,11, keep_first=6) {PLAIN}"), plain=None),
        *_recipe("**skip-robust LoRA** (`finetune=robust`)", B200, Pick("e2e_robust", f"Full {ROBUST}"),
                 Pick("e2e_robust", f"HSD (s=1, 0, 18) {ROBUST}"),
                 Pick("e2e_robust", f"SkipDecode (11,11, keep_first=6) {ROBUST}"), plain=Pick("e2e_robust", PLAIN_200)),
    ],
}
PAGES = {"README.md": ("readme",), "docs/results.md": ("summary", "robust_val", "robust_test", "recipes",
                                                       "bench_robust_static", "bench_robust_lossless")}
COLUMNS = {  # table -> its columns (keys of headlines.HEADERS)
    "readme": ("what", "budget", "setting", "avg", "own", "plain", "from"),
    "robust_val": ("setting", "avg", "rougeL", "own_rl", "own5"),
    "robust_test": ("what", "setting", "avg", *QUALITY_KEYS, "own_rl", "own5", "plain"),
    "recipes": ("what", "budget", "own_full_rl", "setting", "avg", "own", "plain"),
}
