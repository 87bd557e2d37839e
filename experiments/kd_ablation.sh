#!/usr/bin/env bash
# Issue 4 ablation: the same tiny student, the same 5,000 training examples of
# data/big, the same 1,200 steps x 16 examples, trained three ways; the teacher is
# out/small60/best.pt (small preset, 60 min on data/big, see the README).
# Each run uses one thread; two chains run side by side on the 2-core machine.
#   bash experiments/kd_ablation.sh            # ~1 h
set -euo pipefail
PY=${PY:-.venv/bin/python}
TEACHER=${TEACHER:-out/small60/best.pt}
COMMON="--data_dir data/big --preset tiny --max_examples 5000 --max_steps 1200 --batch_size 16
        --lr 5e-3 --eval_interval 200"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
timed() { local name=$1; shift; local t0=$(date +%s); "$@" > out/kd_$name.stdout 2>&1;
          echo "$name $(( $(date +%s) - t0 )) s" >> out/kd_times.txt; }
evaluate() { $PY eval.py --ckpt out/kd_$1/best.pt --data_dir data/big --test_file data/big/test.jsonl \
             --out out/kd_$1/eval_test.json > out/kd_$1/eval_test.txt 2>&1; }
(
  timed gold $PY train.py $COMMON --out_dir out/kd_gold && evaluate gold
  timed soft $PY distill.py $COMMON --mode soft --teacher $TEACHER --out_dir out/kd_soft && evaluate soft
) &
(
  timed hard $PY distill.py $COMMON --mode hard --teacher $TEACHER --out_dir out/kd_hard && evaluate hard
) &
wait
cat out/kd_times.txt
