# The two commands of the README. Each one creates .venv on first use (Python 3.11),
# installing torch/torchvision from the machine's local wheels and medfold in editable mode.
# `make test` also installs what the tests run for real: Debian's Chromium (report), slurm-wlm
# and munge (a real Slurm), DCMTK (JPEG encoders for the DICOM tests), and Horovod built from
# source (install/horovod.sh).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
CORES ?= 2
# the suite runs in this many pytest-xdist workers (tests/conftest.py groups what must share one);
# PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= 2

HOROVOD := $(VENV)/.horovod
SYSTEM := $(VENV)/.system-packages
# the MLflow tracking server the tracking tests start (a service of its own: mlflow pins pyarrow<26,
# medfold reads Parquet with 26; medfold itself needs only the client, mlflow-skinny)
MLFLOW_SERVER := .venv-mlflow/.installed

.PHONY: demo test lint docs clean-results horovod system-packages mlflow-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the whole workflow on the bundled demo data
	$(VENV)/bin/snakemake --cores $(CORES)

$(HOROVOD): $(STAMP) install/horovod.sh
	bash install/horovod.sh
	touch $(HOROVOD)

$(SYSTEM): install/system-packages.sh
	bash install/system-packages.sh
	@mkdir -p $(VENV) && touch $(SYSTEM)

$(MLFLOW_SERVER):
	$(PYTHON) -m venv .venv-mlflow
	.venv-mlflow/bin/pip install --quiet mlflow==3.17.2
	touch $(MLFLOW_SERVER)

horovod: $(HOROVOD)  ## optional: Horovod for distributed.backend horovod
system-packages: $(SYSTEM)
mlflow-server: $(MLFLOW_SERVER)  ## optional: an MLflow server and UI (mlflow ui on results/mlruns)

test:  ## the test suite
	@# its installs side by side (Debian's packages, the MLflow server's venv, then the project's venv
	@# and Horovod built in it): about 12 minutes one after the other on a fresh 2-core machine
	$(MAKE) -j3 $(STAMP) $(SYSTEM) $(HOROVOD) $(MLFLOW_SERVER)
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --no-loadscope-reorder -q -ra --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check workflow/Snakefile workflow/rules

docs: $(STAMP)  ## the documentation site in site/ (strict: a broken link fails it)
	$(VENV)/bin/mkdocs build --strict

clean-results:
	rm -rf results resources .snakemake
