#!/usr/bin/env bash
# Every GPU check of deltatune in one call, for a lent GPU machine (one H100/H200: about 4 to 5 minutes; hard cap
# 400 s). Each check runs under its own time limit; a failure does not stop the others; a summary comes last.
#   env          versions, GPUs, bitsandbytes
#   imports      deltatune, its trainer, FSDP2 and DCP glue, packing import with this torch/transformers; a GPU is seen
#   estimate_gpu bench/estimate_gpu.py: `deltatune estimate` against torch.cuda.max_memory_allocated on random-weight
#                Llama 3 shapes (1B: full, LoRA, QLoRA, prompt tuning; 8B: LoRA, QLoRA), bf16, batch 1 x 2048.
#   pytest_cuda  pytest -m cuda tests/test_cuda.py: bf16 autocast, NF4 QLoRA, paged AdamW, strategy: fsdp (bf16
#                mixed precision + gradient checkpointing, CPU offload, QLoRA) as a one-process NCCL group, packing
#                with SDPA, accelerate's FSDP2 plugin driving transformers' Trainer. With 2 or more GPUs it also runs
#                test_fsdp_on_two_gpus_over_nccl_matches_one_gpu (torchrun, one process per GPU); with one GPU that
#                test is skipped: NCCL cannot put two processes on one GPU.
#   gpu_sft      bench/gpu_sft.py: LoRA and QLoRA SFT of a random-weight ~1.1B Llama (sequence 2048), deltatune's
#                Trainer against peft + transformers' Trainer: tokens/s and peak GPU memory, one process each.
#
# Needs python (or $PYTHON) with torch, transformers, peft, accelerate, pytest, safetensors, PyYAML; bitsandbytes for
# the QLoRA checks (found through $PYTHONPATH, which is kept). No datasets, typer, rich, matplotlib or network. Run
# it from the repository root (not pip-installed: "." goes on PYTHONPATH). Results: $OUT (default bench/results/gpu):
# summary.txt, <check>.log (env.log: versions), pytest.xml, estimate_gpu.{json,md}, gpu_sft.{json,md}.
#
#   OUT=/tmp/gpu PYTHONPATH=/tmp/site bash bench/gpu_check.sh      # on the GPU machine
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run     # on a CPU box: the same steps, tiny sizes, the
#                                                                 # GPU tests skip; checks that it all imports and runs
set -u
DRY=${GPU_CHECK_TINY:-}
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]   (results in \$OUT, default bench/results/gpu)" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the checks run from the repository root
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=400  # seconds for everything
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE  # bitsandbytes' CPU threads and torch's otherwise starve each other
rm -f "$OUT"/{env,imports,estimate_gpu,pytest_cuda,gpu_sft}.log "$OUT"/pytest.xml "$OUT"/{estimate_gpu,gpu_sft}.{json,md}  # nothing left from an earlier run
: > "$OUT/summary.txt"
failed=0

# check NAME SECONDS FUNCTION: run it under min(SECONDS, what is left of the budget), log to $OUT/NAME.log
check() {
    local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc verdict
    shift 2
    if [ "$left" -lt 15 ]; then
        echo "SKIP  $name (no time left of the ${BUDGET} s budget)" | tee -a "$OUT/summary.txt"
        failed=$((failed + 1))
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="FAIL (timed out after ${limit} s)" ;;
        *) verdict="FAIL (exit $rc)" ;;
    esac
    if [ "$rc" -ne 0 ]; then failed=$((failed + 1)); fi
    echo "$verdict  $name  $((SECONDS - start)) s" >> "$OUT/summary.txt"
}

env_info() {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, transformers, peft, accelerate; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "no bitsandbytes: the QLoRA checks skip"
}

imports() {
    "$PY" - "$DRY" <<'EOF'
import sys
import torch
import deltatune as dt
from deltatune.train import CausalLMTask, TrainConfig, Trainer  # noqa: F401
from deltatune.train import distributed, packing  # noqa: F401
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
print("deltatune", dt.__version__ if hasattr(dt, "__version__") else "(repo)", "imports with torch", torch.__version__)
if not sys.argv[1] and not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: no GPU for the checks that follow")
EOF
    "$PY" bench/gpu_sft.py --help > /dev/null && echo "bench/gpu_sft.py parses"
}

estimate_gpu() {
    if [ -n "$DRY" ]; then
        "$PY" bench/estimate_gpu.py --tiny --out "$OUT"
    else
        "$PY" bench/estimate_gpu.py --out "$OUT"
    fi
}

pytest_cuda() {
    "$PY" -m pytest -m cuda tests/test_cuda.py -v -rA -p no:cacheprovider --junitxml "$OUT/pytest.xml"
}

gpu_sft() {
    if [ -n "$DRY" ]; then  # seconds on a CPU; QLoRA needs bitsandbytes' GPU kernels to mean anything
        "$PY" bench/gpu_sft.py --out "$OUT" --tiny --steps 2 --warmup 1 --seq-len 64 --settings deltatune-lora,peft-lora
    else
        "$PY" bench/gpu_sft.py --out "$OUT" --steps 8 --warmup 2 --timeout 75
    fi
    local rc=$?
    [ "$rc" -eq 0 ] && ! grep -q '"error"' "$OUT/gpu_sft.json"  # a setting that failed fails the check
}

export PY OUT DRY
export -f env_info imports estimate_gpu pytest_cuda gpu_sft

check env 45 env_info
check imports 60 imports
check estimate_gpu 120 estimate_gpu
check pytest_cuda 130 pytest_cuda
check gpu_sft 150 gpu_sft

# pytest's own tally, with each skip's reason (a skipped GPU test is not a passed one)
if [ -f "$OUT/pytest.xml" ]; then
    echo "pytest_cuda, test by test:" >> "$OUT/summary.txt"
    "$PY" - "$OUT/pytest.xml" >> "$OUT/summary.txt" <<'EOF'
import sys
import xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
for case in cases:
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    reason = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
    print(f"      {outcome:8} {case.get('name')} {case.get('time')} s {reason[:150]}")
EOF
fi
[ -f "$OUT/estimate_gpu.md" ] && cat "$OUT/estimate_gpu.md" >> "$OUT/summary.txt"
[ -f "$OUT/gpu_sft.md" ] && cat "$OUT/gpu_sft.md" >> "$OUT/summary.txt"
echo "total $SECONDS s; $failed check(s) failed${DRY:+ (dry run: tiny sizes, GPU tests skipped)}" >> "$OUT/summary.txt"
echo "================ summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
[ "$failed" -eq 0 ]
