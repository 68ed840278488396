# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs rewardflow, trains the Shapes Flow-GRPO demo and writes the run's HTML report
#               (how long each command takes: README.md, "Timings")
#   make test   creates .venv, installs rewardflow with its dev tools, runs lint and the default test tier
#               (two pytest-xdist workers, one core each)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU build where a local wheel or PyPI's CPU index provides it); a bare `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint clean-venv

$(BIN)/rewardflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/rewardflow

demo: $(BIN)/rewardflow
	run=runs/shapes_grpo_cpu-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/rewardflow train shapes_grpo_cpu --run-dir $$run && \
	$(BIN)/rewardflow report $$run

test: $(BIN)/rewardflow
	$(BIN)/ruff check rewardflow tests benchmarks
	$(BIN)/ruff format --check rewardflow tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

clean-venv:
	rm -rf $(VENV)
