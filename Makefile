# Two commands do all the set-up on a fresh machine:
#   make train   bootstrap if needed, then train the example LM on 2 workers
#   make test    bootstrap if needed, then run the test suite
# DISTRIB_PYTHON=/path/to/python: use an environment you already have (its torch and Horovod) instead of .venv.
PY := $(or $(DISTRIB_PYTHON),.venv/bin/python)
NP ?= 2
ARGS ?=

.PHONY: setup train test bench soak gpu-check docs clean-runs

setup:
	@bash scripts/bootstrap.sh

train: setup
	$(PY) -m launch -np $(NP) examples/train_lm.py $(ARGS)

test: setup
	@bash scripts/slurm_setup.sh
	@bash scripts/nodes_setup.sh
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout=600 $(ARGS)

# A full run (no ARGS) also renders the README's Performance section from benchmarks/results.json.
bench: setup
	$(PY) -m benchmarks $(ARGS)
	@if [ -z "$(ARGS)" ]; then $(PY) -m benchmarks.render_readme; fi

# The churn soak on the 3 namespace hosts of tests/nodes.py (root): kills a worker, then a host, every 60 s
# for 10 min and every 15 s for 2 min, elastic and with --max-restarts, against a failure-free run
# (~30 min; ARGS="--minutes 3 --modes elastic" for a shorter one). Writes benchmarks/results-soak.json and .md.
soak: setup
	$(PY) -m benchmarks.soak $(ARGS)

# On a machine with NVIDIA GPUs: builds Horovod with NCCL for the machine's torch when missing, then
# runs every user path on the GPU and the step-time table (scripts/gpu_check.sh; ARGS=--cpu: dry run).
gpu-check:
	@bash scripts/gpu_check.sh $(ARGS)

# The API reference from the docstrings of what `distrib` exports: build/docs/index.html.
docs: setup
	$(PY) -m pdoc --docformat restructuredtext --output-directory build/docs distrib

clean-runs:
	rm -rf runs
