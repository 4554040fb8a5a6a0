# Every target creates .venv with pip when it is missing and installs the project into it.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The tests run on every core (pytest-xdist); a single process takes about 12 minutes on 2 cores.
PYTEST_ARGS ?= -q -n auto

.PHONY: install diagnose test influence-check lint generated gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Exit 1 means the doctor ran and found the pipeline sick: that is a diagnosis, not a failed command.
diagnose: $(STAMP)
	@$(BIN)/influence-doctor diagnose $(ARGS); status=$$?; \
	  if [ $$status -eq 1 ]; then echo "(exit 1: the pipeline is sick; see the findings above)"; fi; \
	  [ $$status -le 1 ]

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The project's own pipelines through its pytest plugin, held to the committed baselines.
influence-check: $(STAMP)
	$(BIN)/python -m pytest --influence-check -n 2 -p no:cacheprovider -q $(PYTEST_ARGS) tests/test_influence_check.py

lint: $(STAMP)
	$(BIN)/ruff check .

# Files written from the code: the report schema's enums and the README's list of causes (a test holds both).
generated: $(STAMP)
	$(BIN)/python -m influence_doctor.report.schema
	$(BIN)/python -m influence_doctor.causes README.md

# On a machine with CUDA: the GPU path for real (demos on the device, GPU-only tests included).
gpu-check: $(STAMP)
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
	$(BIN)/python -m pytest -m "gpu or not gpu" -q tests
	@for demo in uci-mlp conv tiny-lm; do \
	  $(BIN)/influence-doctor diagnose --demo $$demo --device cuda --out reports/gpu-check --quiet --format text; \
	  [ $$? -le 1 ] || exit 1; done

clean:
	rm -rf .pytest_cache .ruff_cache
