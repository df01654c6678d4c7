# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test install clean paper paper-quick

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned to the release this project is tested with (a CPU-capable build)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/carrot demo

test: $(STAMP)
	$(PY) -m pytest -q

paper: $(STAMP)
	$(VENV)/bin/carrot paper out=paper_out

paper-quick: $(STAMP)
	$(VENV)/bin/carrot paper --quick out=paper_out_quick

clean:
	rm -rf $(VENV) .carrot_cache runs paper_out paper_out_quick bench_out
