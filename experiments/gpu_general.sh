#!/usr/bin/env bash
# The general router (catalogue in the prompt) on one GPU: the 26m preset with the
# levers that won on the CPU (prefix LM, pointer heads, copy head, Muon), rows of at
# most 8 tools (retrieve.py keeps 8 of a longer catalogue), 4 hours of training.
# Not run here (no GPU): docs/results.md, "The general router: accuracy against compute", has the
# number the CPU runs' trend predicts for it, and what that prediction assumes.
#
#   bash experiments/gpu_general.sh                     # a CUDA machine
#   torchrun: NPROC=4 bash experiments/gpu_general.sh   # 4 GPUs, 4x the batch
#   DEVICE=cpu BATCH=4 STOP_AT=2 N_TRAIN=300 VOCAB=600 DATA_ARGS="--n_val 20 --n_test 20 --n_test_unseen 20" \
#       bash experiments/gpu_general.sh                 # its first steps on a CPU (tests/test_train.py)
#
# bf16 autocast and fused AdamW are chosen by runtime.py on a bf16-capable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATA=${DATA:-data/general_gpu}
OUT=${OUT:-out/general_26m}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-1}
N_TRAIN=${N_TRAIN:-200000}     # ~46M tokens: a 4-hour run sees each example many times
VOCAB=${VOCAB:-8192}
BATCH=${BATCH:-64}
MINUTES=${MINUTES:-240}
STOP_AT=${STOP_AT:-0}          # >0: stop after that many steps (last.pt; --resume goes on)

[ -f "$DATA/meta.json" ] || $PY data.py --out_dir "$DATA" --max_tools 8 --max_len 512 \
    --n_train "$N_TRAIN" --vocab_size "$VOCAB" ${DATA_ARGS:-}
train=(train.py --data_dir "$DATA" --out_dir "$OUT" --preset 26m --block_size 512 --prefix_lm --copy_head \
       --tagger --optimizer muon --batch_size "$BATCH" --warmup_steps 500 --eval_interval 2000 \
       --log_interval 100 --max_minutes "$MINUTES" --device "$DEVICE" --stop_at "$STOP_AT")
if [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NPROC" "${train[@]}"
else
    $PY "${train[@]}"
fi
if [ "$STOP_AT" -gt 0 ]; then exit 0; fi
$PY eval.py --ckpt "$OUT/best.pt" --device "$DEVICE"
$PY eval.py --ckpt "$OUT/best.pt" --device "$DEVICE" --apibank evaldata/apibank/level-1-api.json
$PY eval.py --ckpt "$OUT/best.pt" --device "$DEVICE" --when2call evaldata/when2call/when2call_test_llm_judge.jsonl
