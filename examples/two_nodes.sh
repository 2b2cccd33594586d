#!/usr/bin/env bash
# Two torchrun agents on one machine stand for two nodes (--nnodes=2, 2 ranks each), meeting at a
# c10d rendezvous on the loopback. Each "node" gets a DIFFERENT PLUTO_RUN_ID, as the
# `export PLUTO_RUN_ID="training-$(date +%s)"` recipe gives nodes that start a second apart:
# pluto still makes it one run (rank 0's id) and the other node's ranks warn, naming both ids.
#
#   pluto up &                        # Redis + backend + worker on this machine
#   bash examples/two_nodes.sh        # then: pluto runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
agent() {  # $1 = node index (0 hosts the rendezvous store)
  PLUTO_RUN_ID="training-$(date +%Y%m%d-%H%M%S)-node$1" OMP_NUM_THREADS=1 \
    $PY -m torch.distributed.run --nnodes=2 --nproc-per-node=2 \
      --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$PORT" --rdzv-id="two-nodes-$PORT" \
      --rdzv-conf="is_host=$([ "$1" = 0 ] && echo 1 || echo 0)" --local-addr=127.0.0.1 \
      examples/ddp_train.py
}
agent 0 & first=$!
sleep 1
agent 1 & second=$!
wait "$first" "$second"
