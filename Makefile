# Two set-up commands: `make demo` (the main job end to end) and `make test` (the test suite).
# Each creates the virtual environment in .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# The tested pair; setup.py itself only asks for torch>=2.1.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel
	$(VPY) -m pip install --quiet $(TORCH)
	# basicsr 1.4.2's setup.py imports torch and numpy: build it against the ones just installed.
	$(VPY) -m pip install --quiet numpy
	$(VPY) -m pip install --quiet --no-build-isolation basicsr==1.4.2
	$(VPY) -m pip install --quiet --no-build-isolation -e '.[dev,demo,plots,flops]'
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q tests

demo: venv
	$(VPY) scripts/demo.py

clean-venv:
	rm -rf $(VENV)
