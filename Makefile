# Two commands do everything on a fresh machine:
#   make demo   virtual env + install + the whole pipeline on the tiny default (CPU, ~17 min)
#   make test   virtual env + install + the test suite (CPU, a few minutes)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := data/demo
OUT    := out/demo

.PHONY: demo test venv data train eval sample clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: venv
	$(PY) data.py --out_dir $(DATA)

train: venv
	$(PY) train.py --data_dir $(DATA) --out_dir $(OUT) --preset tiny

eval: venv
	$(PY) eval.py --ckpt $(OUT)/best.pt

sample: venv
	$(PY) sample.py --ckpt $(OUT)/best.pt --tools examples/tools.json "Where's my order ORD-1234?"

demo: venv
	$(MAKE) data train eval sample

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf data out
