# Two commands do everything on a fresh machine:
#   make demo   virtual env + install + the whole pipeline: a compiled router for an
#               assistant app's 38 tools (CPU, ~10 min)
#   make test   virtual env + install + the test suite (CPU, a few minutes)
# and one more for the benchmark:
#   make atis   the compiled router on ATIS (evaldata/atis, in the repository): import,
#               train (15 min), report against the published results
#               (ATIS_DIR=... for another folder in the same format; ATIS_MINUTES=1
#               for a quick check of the whole chain)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := data/demo
OUT    := out/demo
# the demo app: eight domains of the hand-written catalogue, 38 tools
DOMAINS := timers_alarms,messaging,calendar,weather,smart_home,music,notes_reminders,shopping
# the compiled router's recipe (README, "Your tools, compiled in")
ROUTER := --preset tiny --prefix_lm --copy_head --tagger --intent_vote --optimizer muon --min_lr 0 --keep_last --batch_size 32 --length_window 64 \
          --warmup_steps 100 --eval_interval 500 --log_interval 100
# training budgets in minutes: the schedule is fitted to them (train.py --max_minutes),
# so a run uses its budget the same way on any machine
DEMO_MINUTES ?= 8
# distinct training examples: more than 8 minutes repeat 6 times (val: 20,000 -> 40,000
# +1.2 points, 60,000 loses the held-out phrasings; docs/results.md, part ten)
DEMO_EXAMPLES ?= 40000
ATIS_DIR ?= evaldata/atis
ATIS_MINUTES ?= 15

.PHONY: demo test venv data train eval sample atis clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: venv
	$(PY) data.py --compiled --domains $(DOMAINS) --out_dir $(DATA) --vocab_size 2048 --n_train $(DEMO_EXAMPLES)

train: venv
	$(PY) train.py --data_dir $(DATA) --out_dir $(OUT) $(ROUTER) --max_minutes $(DEMO_MINUTES)

eval: venv
	$(PY) eval.py --ckpt $(OUT)/best.pt

sample: venv
	$(PY) sample.py --ckpt $(OUT)/best.pt "Where's my order ORD-1234?"

demo: venv
	$(MAKE) data train eval sample

atis: venv
	@test -f $(ATIS_DIR)/train.seq.in || { echo "error: $(ATIS_DIR)/train.seq.in not found: ATIS ships in evaldata/atis (see evaldata/atis/README.md); for another copy put {train,valid,test}.{seq.in,seq.out,label} in one folder and pass ATIS_DIR=that/folder" >&2; exit 2; }
	$(PY) data.py --intent_slot $(ATIS_DIR) --out_dir data/atis --vocab_size 1000
	$(PY) train.py --data_dir data/atis --out_dir out/atis $(ROUTER) --max_minutes $(ATIS_MINUTES)
	$(PY) eval.py --ckpt out/atis/best.pt --out out/atis/eval_atis.json

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf data out
