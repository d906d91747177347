#!/bin/bash
# EchoingPixels on 2 nodes x 4 GPUs with torchrun (no scheduler): run this on every node with its
# NODE_RANK (0 or 1) and the address of node 0. Lightning reads torchrun's environment itself.
#   MODEL=/data/Qwen2.5-Omni-3B PATHS=/data/paths_train.yaml MASTER_ADDR=10.0.0.1 NODE_RANK=0 \
#     bash recipes/launch/torchrun_2x4gpu.sh
set -euo pipefail
torchrun --nnodes=2 --nproc-per-node=4 --node-rank="${NODE_RANK}" \
  --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT:-29500}" \
  -m ep_kit.cli fit --config recipes/cs2_ste_20.yaml --config "${PATHS}" \
  --model.thinker.init_args.path="${MODEL}" --trainer.num_nodes=2 --trainer.devices=4
