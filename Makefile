# The two set-up commands of the README. Both create/refresh .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

# Reinstalled whenever the package definition or the pins change.
$(STAMP): setup.py requirements/cpu.txt requirements/quant.txt requirements/serve.txt requirements/tritonserver.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/quant.txt -r requirements/serve.txt  # quant includes cpu.txt (the torch pin)
	$(PY) -m pip install --quiet --no-deps -r requirements/tritonserver.txt  # the tritonserver binary only
	$(PY) -m pip install --quiet -e ".[test,quant,rosbags,serve,openvino]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m tmanet.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
