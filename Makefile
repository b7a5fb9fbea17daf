# Shortcuts; the README's two commands are scripts/demo.sh and scripts/test.sh.
PY := $(if $(VIRTUAL_ENV)$(CONDA_PREFIX),python,.venv/bin/python)

.PHONY: demo test bench bench-full lint
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && $(PY) bench/run.py --quick
bench-full:
	bash scripts/setup.sh && $(PY) bench/run.py
lint:
	bash scripts/setup.sh && $(PY) -m ruff check llamaprune tests bench
