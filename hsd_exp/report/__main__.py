"""Comparison report over evaluation runs: ``python -m hsd_exp.report DIR [DIR ...]``.

Each DIR is a Hydra multirun dir or a single run dir. Every run folder below DIR (.hydra/config.yaml,
metrics.json, predictions*.jsonl; task=compare subfolders included) is one row (see hsd_exp.report.runs and
DEVELOPERS.md "Run directory format"). The table follows the HSD paper's layout: one row per decoding
setting, one table per (model, dataset).

Outputs (into --out, default the first DIR):
  report.md              the tables (numbers rounded to 2 decimals) with notes, and the figure
  report.csv             every row at full precision, plus each metric's retention <m>_pct_full
  quality_vs_layers.png  the paper's Fig. 1: quality (--metric) vs. Avg. Layer, one line per plot
                         line (Policy.plot_line; per setting, when the runs hold several), Full as a star
--wandb also logs the table and the figure to one W&B run (offline unless WANDB_API_KEY is set);
--wandb-runs logs one W&B run per row (flat config + numbers), for runs evaluated without logger=wandb.
W&B's files go into --out's wandb/ (WANDB_DIR, when set, wins).

Columns:
  Avg. Layer  mean decoder layers run per generated token (prefill excluded)
  tokens/s    generated tokens (up to EOS) per second: output-length dependent, shown, not the Speedup
  ms/step     one decode step of the batch, the prefill timed apart (metrics.json ms_per_step)
  Speedup     ms/step(Full) / ms/step: output length cannot move it (lossless rows: tokens/s / tokens/s(Full),
              wall time per token, their output being Full's; report.csv speedup_by says which)
  FLOP ideal  the speedup the FLOPs of the layers run allow (metrics.json flop_ideal)
  Flags       "length xR of Full" (tokens per example outside [0.67, 1.5] x Full's), "Speedup > FLOP ideal"
              (above ideal x 1.10: the timing is off); a note under the table explains each
  % of full   mean over m in {R-1, R-2, R-L, BLEU-1, BERTScore} of m / m(Full) * 100

Full is the full-decoding run of the same setting: same model.name and dataset.name, and the same
model.path, model.adapter, ckpt_path, model.chat, dataset.path, split and limit, prompt format (dataset.instruction,
separator, max_source_tokens), decode.num_beams, do_sample and max_new_tokens (temperature and top_p when
sampling), read from each run's .hydra/config.yaml (the limit from metrics.json when it records one), that
scored the same examples (metrics.json's examples_hash; for runs without one, as many examples). A complete
Full run is preferred to a partial one. A row with no Full run of its own leaves Speedup and % of full
blank, and a note under its table names what differs from the nearest Full run; a Full run without timing
(e.g. scored on resume) still gives % of full, only Speedup stays blank; so does a run without ms/step. A metric missing from either run,
or whose Full value is 0, is left out of the mean; so is BERTScore when the two runs used different backbones. When the runs of one
table span several settings, each row names its setting after the method ("HSD (s=1, 0, 18) [beams=1]",
only the fields that differ), so no two rows look alike.

Rows: Full first, then CALM, SkipDecode, HSD (any other policy after them), each by Avg. Layer descending. Every number is the run's own
metrics.json value. A half-finished run is a row marked "partial (N predictions)", never dropped; its
metrics cells are blank (or its last metrics.json values) and it is not plotted.

Mixed inputs: DIRs whose runs span several models or datasets are refused (exit status 2) unless
--allow-mixed, which writes one table (and figure panel) per (model, dataset).
"""

from __future__ import annotations

import argparse
import os
import sys

from hsd_exp.errors import ConfigError, exit_on_config_error
from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.report.runs import as_text, collect_runs
from hsd_exp.report.tables import build_table, check_not_mixed, default_title, write_report
from hsd_exp.report.wandb_log import log_wandb, log_wandb_runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hsd_exp.report", usage="%(prog)s DIR [DIR ...] [options]",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="multirun or run directories of `python -m hsd_exp`")
    p.add_argument("--out", help="output directory (default: the first DIR)")
    p.add_argument("--title", help="report / figure title (default: names the model and dataset)")
    p.add_argument("--metric", default="rougeL", choices=QUALITY_KEYS, help="figure y axis (default rougeL)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="allow several models/datasets: one table (and figure panel) per (model, dataset)")
    p.add_argument("--wandb", action="store_true", help="also log the table and figure to W&B")
    p.add_argument("--wandb-runs", action="store_true",
                   help="also log one W&B run per row (config + numbers), for runs evaluated without "
                        "logger=wandb: W&B's run comparer and parallel coordinates then compare them")
    p.add_argument("--wandb-project", default="hsd_exp", help="W&B project (default hsd_exp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status: 0, 2 for bad input (one line ``error: ...``) or a usage error, 1 when
    only the W&B logging failed."""
    try:
        return _report(parse_args(argv))
    except SystemExit as e:  # argparse (--help: 0, a usage error: 2) or exit_on_config_error (2), already printed
        return int(e.code or 0)


def _report(args: argparse.Namespace) -> int:
    with exit_on_config_error():
        runs = collect_runs(args.dirs)
        if not args.allow_mixed:
            check_not_mixed(runs)
        paths = write_report(runs, args.out or args.dirs[0], metric=args.metric, title=args.title)
        rows = build_table(runs)
    if len({as_text(r["bertscore_model"]) for r in rows if r["bertscore_f1"] is not None}) > 1:
        print("warning: runs used different BERTScore backbones; BERTScore values are not comparable",
              file=sys.stderr)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if not (args.wandb or args.wandb_runs):
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and summary per run: hundreds of lines
    with exit_on_config_error():
        try:
            if args.wandb:
                log_wandb(runs, rows, paths["png"], args.title or default_title(runs), args.metric,
                          project=args.wandb_project, out_dir=paths["md"].parent)
            if args.wandb_runs:
                n = log_wandb_runs(runs, rows, project=args.wandb_project, out_dir=paths["md"].parent)
                print(f"W&B: {n} runs logged to project {args.wandb_project} (files under "
                      f"{paths['md'].parent}/wandb)", file=sys.stderr)
        except ConfigError:
            raise
        except Exception as e:  # the report files are written; say what failed instead of a stack trace
            print(f"error: W&B logging failed ({type(e).__name__}: {e}); report files are written", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
