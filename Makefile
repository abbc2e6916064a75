# Every target creates .venv if missing and installs the project with its pinned dependencies.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: test monitor-check demo bench protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

# The README's monitoring set-up for real: a mesh with the Ray dashboard on, Prometheus (file_sd on
# Ray's discovery file) and headless Chromium, all on 127.0.0.1 (tests/monitoring; minutes, not in `test`).
MONITOR_OUT ?= build/monitor
monitor-check: $(STAMP)
	command -v prometheus >/dev/null && command -v chromium >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus chromium; }
	mkdir -p $(MONITOR_OUT)
	EXPERT_MESH_MONITOR_CHECK=1 MONITOR_OUT=$(MONITOR_OUT) $(PY) -m pytest tests/monitoring -q
	@echo "figures: $(MONITOR_OUT)/figures.json, screenshot: $(MONITOR_OUT)/dashboard-actors.png"

demo: $(STAMP)
	$(PY) -m cluster.demo

bench: $(STAMP)
	$(PY) bench/bench_layer.py

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
