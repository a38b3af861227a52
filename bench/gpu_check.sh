#!/usr/bin/env bash
# The CUDA checks, in one go, for a machine that has a GPU and torch + timm but not trainctl installed
# (a lent GPU box with no network): a real CUDA out-of-memory error stepping down the ladder, then
# items 2-4 of bench/ (training throughput, checkpoint cost, recovery time) with the model on the GPU.
#
#     bash bench/gpu_check.sh [LOG_DIR] [STEPS]   # ~8 min on one H200; logs to LOG_DIR (default bench/out/gpu);
#                                                 # STEPS: only these, comma-separated (oom_ladder, checkpoint,
#                                                 # recovery, determinism, throughput, group)
#
# Each step has its own time limit, so one that hangs does not take the others' results with it. The limits add
# up to 13 min: where one command may run 10 min at most, run `oom_ladder,checkpoint,recovery`, then
# `determinism,throughput`. Where trainctl is pip-installed, the PYTHONPATH shim below is harmless.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-bench/out/gpu}
only=${2:-}
mkdir -p "$logs" /tmp/trainctl-shim/trainctl
ln -sfn "$PWD/contract" /tmp/trainctl-shim/trainctl/contract
ln -sfn "$PWD/supervisor" /tmp/trainctl-shim/trainctl/supervisor
ln -sfn "$PWD/worker" /tmp/trainctl-shim/trainctl/worker
export PYTHONPATH=/tmp/trainctl-shim${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$logs/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$logs/versions.txt"
(nproc; free -g; df -h /dev/shm /tmp) >> "$logs/versions.txt" 2>&1

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    [[ -z $only || ",$only," == *",$name,"* ]] || return 0
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$logs/$name.txt" 2>&1
    echo "exit $?" >> "$logs/$name.txt"
    tail -n 25 "$logs/$name.txt"
}
step oom_ladder 120 python3 bench/oom_ladder.py --device cuda
step checkpoint 100 python3 bench/checkpoint.py --device cuda --repeats 3 --batch 8 --accum 4 --dir /tmp/trainctl-ckpt
step recovery 130 python3 bench/recovery.py --device cuda --kills 3
# The suspect behind the 0.95x below, alone (synthetic batch, no loaders): ~1.5 min, not yet run on a GPU.
step determinism 150 python3 bench/determinism_cost.py --device cuda --model resnet50 --batch 64 --steps 40 --repeats 3
# 80 steps, the first 16 (8 loaders' prefetch) left out, over 640 photos cycled as epochs. On the H200 of
# 2026-11-27 only a 24-step version ran (0.95x); this longer one has not run on a GPU yet.
step throughput 300 python3 bench/throughput.py --device cuda --model resnet50 --batch 64 --steps 80 --skip 16 --photos 640 --workers 8 --repeats 2
# A group rung over every GPU (issue 19) where there are two or more: K GPUs vs one, supervised vs torchrun
# directly. Not yet run on a GPU (the machine lent so far had one).
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if (( gpus >= 2 )); then
    step group 300 python3 bench/group_throughput.py --device cuda --nproc "$gpus" --model resnet50 --batch $((32 * gpus)) --steps 40 --photos 640 --repeats 2
fi
