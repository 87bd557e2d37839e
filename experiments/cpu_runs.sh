#!/usr/bin/env bash
# The measured runs behind the README's serving, throughput, architecture A/B and
# 26m-on-CPU numbers, in order (each wants the machine to itself): ~30 min on 2 cores.
#   bash experiments/cpu_runs.sh
set -uo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p out/runs
# 1. training throughput per preset, against a matmul measured in the same run
$PY utils/bench_throughput.py --data_dir data/demo > out/runs/throughput.txt 2>&1
# 2. the server under 8 concurrent clients for 60 s (the small60 model, constrained decoding)
$PY serve.py --ckpt out/small60/best.pt --data_dir data/big --port 8011 > out/runs/serve.log 2>&1 &
SERVER=$!
for i in $(seq 60); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
$PY utils/loadtest.py --base_url http://127.0.0.1:8011 --clients 8 --seconds 60 > out/runs/loadtest.txt 2>&1
kill $SERVER; wait $SERVER 2>/dev/null
# 3. architecture A/B on the small preset at equal parameters: 6 layers with the GELU MLP
#    vs 15 attention-only layers (4.98M vs 4.98M), same data, batches and steps; one thread each
export OMP_NUM_THREADS=1
AB="--data_dir data/demo --preset small --max_steps 300 --batch_size 16 --lr 3e-3 --eval_interval 100"
$PY train.py $AB --out_dir out/ab_gelu > out/runs/ab_gelu.txt 2>&1 &
$PY train.py $AB --out_dir out/ab_none --ffn none --n_layer 15 > out/runs/ab_none.txt 2>&1 &
wait
$PY eval.py --ckpt out/ab_gelu/best.pt --limit 300 --out out/ab_gelu/eval_test.json > out/runs/ab_gelu_eval.txt 2>&1 &
$PY eval.py --ckpt out/ab_none/best.pt --limit 300 --out out/ab_none/eval_test.json > out/runs/ab_none_eval.txt 2>&1 &
wait
$PY eval.py --compare out/ab_gelu/eval_test.json out/ab_none/eval_test.json > out/runs/ab_compare.txt 2>&1
unset OMP_NUM_THREADS
# 4. the 26m preset on the CPU: a few hundred steps, loss falling
$PY train.py --data_dir data/demo --preset 26m --out_dir out/26m_cpu --max_steps 200 --batch_size 4 \
    --lr 1e-3 --warmup_steps 20 --eval_interval 100 > out/runs/26m.txt 2>&1
echo done > out/runs/DONE
