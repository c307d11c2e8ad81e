#!/usr/bin/env bash
# The GPU checks in one run, for a CUDA machine (the README's "Measured on a GPU" figures):
#   1. bench/decode.py on the GPU: DT decisions at 100 / 1000 tokens with 1 and 32 envs, the agent at JAT's size in
#      float32 and bfloat16, TT at the reference planner's hopper settings (beams' cache in bfloat16 and float32);
#   2. the `small` preset (6 x 384, 1,024-token context) trained on one D4RL-style dataset, two seeds side by side on
#      the one GPU (bf16 mixed precision, train.py's default on CUDA), while the dataset was built on the CPU;
#   3. both seeds played in Gato mode, DT (target = the expert's return) and DT with Multi-Game DT's expert-return
#      sampling: 20 episodes per seed, the model on the GPU, envs on the CPU.
# Every stage is bounded by `timeout` and runs even if an earlier one failed, so that a short lease still brings
# back what finished. Everything lands in OUT (logs, result JSONs, the runs' metrics) and in OUT/results.tgz.
#
#   bash bench/device_checks.sh OUT                  # on a GPU machine
#   QUICK=1 bash bench/device_checks.sh OUT          # seconds-long smoke run of the same steps on the CPU
#   DATASET=hopper-medium STEPS=3000 bash bench/device_checks.sh OUT   # stage limits: DECODE_/TRAIN_/EVAL_TIMEOUT (s)
set -u
out=${1:?usage: bench/device_checks.sh OUT}
mkdir -p "$out"
dataset=${DATASET:-hopper-medium-replay}
steps=${STEPS:-1000}  # 16 M tokens: near the lowest held-out action loss on hopper-medium-replay (README)
if [ "${QUICK:-0}" = 1 ]; then
  device=cpu; steps=4; episodes=2; quick=(--quick); small=(--hidden_size 32 --num_layers 1 --num_heads 2
    --intermediate_size 64 --seq_len 128 --batch_size 2 --num_workers 0)
else
  device=cuda; episodes=20; quick=(); small=(--num_workers 4)
fi
env_id=$(python -c "from datasets_build.locomotion import LOCOMOTION_TASKS as t; print(t['${dataset%%-*}'])")
stage() { echo; echo "== $* ($(date +%T))"; }
summary() { grep -a -h -E "$1" "${@:2}"; }  # the result lines of logs whose progress bars were switched off

stage environment
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

stage "decoding bench on $device; $dataset built on the CPU meanwhile"
python -m datasets_build "$dataset" --out data --no_progress > "$out/build.log" 2>&1 &
timeout "${DECODE_TIMEOUT:-300}" python bench/decode.py --device "$device" --threads 4 "${quick[@]}" 2>&1 \
  | tee "$out/decode.log"
wait
tail -2 "$out/build.log"

export TQDM_DISABLE=1  # no progress bars in the logs of what follows
stage "train: small preset on $dataset, $steps steps, seeds 0 and 1 side by side"
for seed in 0 1; do
  timeout "${TRAIN_TIMEOUT:-330}" python train.py --preset small --mixture "$dataset" --imitation_threshold None \
    --no_expert_labels --warmup_steps $((steps / 20)) --total_steps "$steps" --save_every $((steps / 4)) \
    --keep_last 10 --no_run_eval --seed $seed --output_dir runs --run_name "device-$dataset-s$seed" \
    --overwrite "${small[@]}" > "$out/train_s$seed.log" 2>&1 &
done
wait
summary "^done:|held-out:|Error|error" "$out"/train_s*.log

stage "play: $env_id, $episodes episodes per seed"
name=device_small_${dataset//-/_}
models=(--model "runs/device-$dataset-s0" "runs/device-$dataset-s1" --tasks "$env_id" --episodes "$episodes"
  --device "$device" --out "$out" --threads 2)
timeout "${EVAL_TIMEOUT:-200}" python -m eval.control "${models[@]}" --mode gato --name "${name}_gato" > "$out/eval_gato.log" 2>&1 &
timeout "${EVAL_TIMEOUT:-200}" python -m eval.control "${models[@]}" --mode dt --name "${name}_dt" > "$out/eval_dt.log" 2>&1 &
timeout "${EVAL_TIMEOUT:-200}" python -m eval.control "${models[@]}" --mode dt --expert_returns --name "${name}_dt_mgdt" \
  > "$out/eval_mgdt.log" 2>&1 &
wait
summary "return .* over|IQM|wrote|Error|error" "$out"/eval_*.log

stage pack
for seed in 0 1; do
  mkdir -p "$out/run_s$seed"
  cp runs/device-"$dataset"-s$seed/{args.json,train_metrics.csv,eval_metrics.csv} "$out/run_s$seed/" 2>/dev/null
done
tar -czf /tmp/results.tgz -C "$out" . && mv /tmp/results.tgz "$out/" && ls -la "$out"
