#!/usr/bin/env bash
# The ATIS runs behind docs/results.md ("Compiled catalogue: ATIS"): variants of the
# compiled router trained on ATIS train, chosen on valid (eval.py on val.jsonl).
# Usage: bash experiments/atis.sh NAME [train.py flags...]
#   e.g. bash experiments/atis.sh pc_d01 --prefix_lm --copy_head --dropout 0.1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
name=$1; shift
[ -f data/atis/meta.json ] || $PY data.py --intent_slot evaldata/atis --out_dir data/atis --vocab_size 1000
mkdir -p out/atis
$PY train.py --data_dir data/atis --out_dir out/atis/$name --preset tiny --batch_size 32 --length_window 64 \
    --eval_interval 500 --log_interval 100 --warmup_steps 100 "$@" > out/atis/$name.log 2>&1
$PY eval.py --ckpt out/atis/$name/best.pt --test_file data/atis/val.jsonl --out out/atis/$name/eval_val.json \
    > out/atis/$name.eval.txt 2>&1
grep -A6 "intent/slot scores" out/atis/$name.eval.txt | tail -1
