# The README's two commands: `make demo` and `make test`. Each sets up its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is enough for the demo and the tests; override for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# --no-cache-dir: pip's wheel cache doubles the disk an install takes (a CI run ran out of disk at install).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m shrink experiment=demo
	@$(PY) -m eval.report $(CURDIR)/outputs/demo/eval/report.json

# One pytest worker a core (tests/conftest.py runs torch on one thread: tiny models), each taking
# whole files so that module fixtures are built once. A third worker on the CI's two cores measured
# 809 s against 885 s in the twenty-fourth session and 1,816 s against ~1,590 s in the twenty-fifth
# (a slower machine that day): no gain to count on.
TEST_WORKERS ?= 2
test: $(STAMP)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) outputs
