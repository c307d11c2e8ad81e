#!/usr/bin/env bash
# The GPU checks in one run, for a CUDA machine (README: "On a GPU" under Measured (speed), and "The `small` preset
# on a GPU" under Locomotion):
#   1. bench/decode.py on the GPU: DT decisions at 100 / 1000 tokens with 1 and 32 envs, the agent at JAT's size in
#      float32 and bfloat16, TT at the reference planner's hopper settings (beams' cache in bfloat16 and float32);
#   2. the `small` preset (6 x 384, 1,024-token context) trained on one D4RL-style dataset (built first, on the CPU),
#      two seeds side by side on the one GPU (bf16 mixed precision, train.py's default on CUDA);
#   3. both seeds played in Gato mode, DT (target = the expert's return) and DT with Multi-Game DT's expert-return
#      sampling: 20 episodes per seed, the model on the GPU, envs on the CPU.
# Every stage is bounded by `timeout` and the next runs even if one failed, so that a short lease still brings back
# what finished; the exit status is 1 if any stage failed. Logs, result JSONs and the runs' metrics land in OUT
# (relative to the repository root) and in OUT/results.tgz.
#
#   bash bench/device_checks.sh OUT                  # on a GPU machine
#   QUICK=1 bash bench/device_checks.sh OUT          # seconds-long smoke run of the same steps on the CPU
#   DATASET=hopper-medium STEPS=3000 bash bench/device_checks.sh OUT
#   # stage limits in seconds: BUILD_TIMEOUT, DECODE_TIMEOUT, TRAIN_TIMEOUT, EVAL_TIMEOUT
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/device_checks.sh OUT}
mkdir -p "$out" && rm -f "$out/results.tgz"
dataset=${DATASET:-hopper-medium-replay}
steps=${STEPS:-1000}  # 16 M tokens; on hopper-medium-replay 3,000 overfit (README)
if [ "${QUICK:-0}" = 1 ]; then
  device=cpu; steps=4; episodes=2; tag=quick; decode_flags=(--quick)
  train_flags=(--hidden_size 32 --num_layers 1 --num_heads 2 --intermediate_size 64 --seq_len 128 --batch_size 2
    --num_workers 0)
else
  device=cuda; episodes=20; tag=small; decode_flags=(); train_flags=()
fi
run=device-$tag-$dataset-${steps}steps
env_id=$(python -c "from datasets_build.locomotion import LOCOMOTION_TASKS as t; print(t['${dataset%%-*}'])")
failed=0
stage() { echo; echo "== $* ($(date +%T))"; }
check() { [ "$1" = 0 ] || { echo "!! $2 failed (exit $1)"; failed=1; }; }
summary() { grep -a -h -E "$1" "${@:2}"; }  # the result lines of logs whose progress bars were switched off

stage environment
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

stage "build $dataset (CPU)"
timeout "${BUILD_TIMEOUT:-300}" python -m datasets_build "$dataset" --out data --no_progress 2>&1 | tail -1
check $? build

stage "decoding bench on $device"
timeout "${DECODE_TIMEOUT:-300}" python bench/decode.py --device "$device" --threads 4 "${decode_flags[@]}" 2>&1 \
  | tee "$out/decode.log"
check $? decode

export TQDM_DISABLE=1  # no progress bars in the logs of what follows
stage "train: $tag preset on $dataset, $steps steps, seeds 0 and 1 side by side"
pids=()
for seed in 0 1; do
  timeout "${TRAIN_TIMEOUT:-330}" python train.py --preset small --mixture "$dataset" --imitation_threshold None \
    --no_expert_labels --warmup_steps $((steps / 20)) --total_steps "$steps" --save_every $((steps / 4)) \
    --keep_last 10 --no_run_eval --seed $seed --output_dir runs --run_name "$run-s$seed" --overwrite \
    "${train_flags[@]}" > "$out/train_s$seed.log" 2>&1 &
  pids+=($!)
done
for i in 0 1; do wait "${pids[$i]}"; check $? "train seed $i"; done
summary "^done:|held-out:|Error" "$out"/train_s*.log

stage "play: $env_id, $episodes episodes per seed"
play() {  # play NAME FLAGS...: both seeds in one eval.control call, results as OUT/<run>_NAME.json
  timeout "${EVAL_TIMEOUT:-200}" python -m eval.control --model "runs/$run-s0" "runs/$run-s1" --tasks "$env_id" \
    --episodes "$episodes" --device "$device" --out "$out" --threads 2 --name "${run//-/_}_$1" "${@:2}" \
    > "$out/eval_$1.log" 2>&1
}
pids=()
play gato --mode gato & pids+=($!)
play dt --mode dt & pids+=($!)
play dt_mgdt --mode dt --expert_returns & pids+=($!)
for i in 0 1 2; do wait "${pids[$i]}"; check $? "play $i"; done
summary "return .* over|IQM|wrote|Error" "$out"/eval_*.log

stage pack
for seed in 0 1; do
  mkdir -p "$out/run_s$seed"
  cp runs/"$run"-s$seed/{args.json,metrics.json,train_metrics.csv,eval_metrics.csv} "$out/run_s$seed/" 2>/dev/null
done
tar -czf /tmp/results.tgz -C "$out" . && mv /tmp/results.tgz "$out/" && ls -la "$out"
exit $failed
