# Every target creates .venv if missing and installs the project with its pinned dependencies.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: test demo bench protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) -m cluster.demo

bench: $(STAMP)
	$(PY) bench/bench_layer.py

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
