#!/usr/bin/env bash
# Quickstart: set up (idempotent), train a small HMoE on 2 CPU ranks through the deepspeed
# launcher (~5 minutes on a 2-core machine, plus a first-time set-up), evaluate it, and say
# where the TensorBoard logs, the checkpoint and the evaluation are.
#
#   run/quickstart.sh                         # outputs/quickstart
#   OUT=outputs/qs2 run/quickstart.sh         # another output directory
#   run/quickstart.sh --set run.train_steps=100    # extra arguments go to run/train.py
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
start=$(date +%s)

./run/setup.sh
source run/env.sh

out="${OUT:-outputs/quickstart}"
if [ -e "$out/checkpoints/latest" ]; then
  echo "error: $out already holds a trained quickstart run. Look at it with" >&2
  echo "  .venv/bin/tensorboard --logdir $out/tensorboard" >&2
  echo "or train again into a new directory: OUT=outputs/quickstart2 run/quickstart.sh (or rm -rf $out)." >&2
  exit 1
fi
# A free port, so the quickstart never collides with another run on this machine.
port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

echo "[quickstart] training run/configs/quickstart.yaml on 2 ranks -> $out"
.venv/bin/deepspeed --num_accelerators 2 --master_port "$port" run/train.py \
  --config run/configs/quickstart.yaml --deepspeed_config ds_configs/cpu_default.json \
  --set "run.output_dir=$out" "$@"

echo "[quickstart] evaluating the final checkpoint on the whole validation split"
.venv/bin/python run/eval.py "$out"

cat <<MSG

[quickstart] finished in $(( $(date +%s) - start )) s
  TensorBoard:  .venv/bin/tensorboard --logdir $out/tensorboard     (then open http://localhost:6006;
                on a remote machine add --bind_all or forward the port: ssh -L 6006:localhost:6006 <host>)
                scalars: train/*, val/*, moe/* (per-layer expert load);  images: moe/expert_load
  metrics:      $out/metrics.jsonl  (the same scalars, one JSON object per logged step)
  checkpoint:   $out/checkpoints/$(cat "$out/checkpoints/latest")  (DeepSpeed; resume with --resume)
  experiment:   $out/experiment.yaml, $out/ds_config.json
  evaluation:   $out/eval_$(cat "$out/checkpoints/latest").json
  export:       .venv/bin/python run/export.py $out exported/$(basename "$out")   (Hugging Face format)
MSG
