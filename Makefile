# The two set-up commands of the README. Both create/refresh .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

# Reinstalled whenever the package definition or the pins change.
$(STAMP): setup.py requirements/cpu.txt requirements/quant.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/quant.txt  # includes cpu.txt (the torch pin)
	$(PY) -m pip install --quiet -e ".[test,quant,rosbags]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m tmanet.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
