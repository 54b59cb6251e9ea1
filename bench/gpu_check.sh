#!/usr/bin/env bash
# The GPU checks in one call (about 6 to 8 minutes on one H100 or H200), for a lent GPU machine:
#   1. pytest -m cuda tests/test_cuda.py: bf16 autocast, NF4 QLoRA, paged AdamW, and strategy: fsdp (FSDP2 as a
#      one-process group: bf16 mixed precision with gradient checkpointing, CPU offload, QLoRA), packing with SDPA;
#   2. bench/gpu_sft.py: LoRA and QLoRA SFT of a random ~1.1B Llama at sequence 2048, deltatune's Trainer against
#      peft + transformers' Trainer (tokens/s, peak GPU memory), each setting in its own process.
# It runs from the repository root of a copy without .venv: python3 (or $PYTHON) with PYTHONPATH=., importing only
# torch, transformers, peft, accelerate, pytest, safetensors, PyYAML (no datasets, typer, rich or matplotlib);
# bitsandbytes when importable (BNB_WHEEL=path/to/wheel installs one first).
# Results go to $OUT (default bench/results/gpu): env.txt, pytest.txt, pytest.xml, gpu_sft.{json,md,txt}.
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh                       # on the GPU machine
#   PYTHON=.venv/bin/python GPU_CHECK_TINY=1 OUT=/tmp/gpu bash bench/gpu_check.sh   # CPU dry run of the logic
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE  # bitsandbytes' CPU threads and torch's otherwise starve each other
if [ -n "${BNB_WHEEL:-}" ]; then "$PY" -m pip install -q --no-deps "$BNB_WHEEL" 2>&1 | tail -n 2; fi
{
    date -u
    nvidia-smi || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.is_available())"
    "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null || echo "no bitsandbytes"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
echo "== pytest -m cuda tests/test_cuda.py"
timeout 200 "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider --junitxml "$OUT/pytest.xml" \
    > "$OUT/pytest.txt" 2>&1 || status=1
tail -n 40 "$OUT/pytest.txt"
echo "== bench/gpu_sft.py"
tiny=()
if [ -n "${GPU_CHECK_TINY:-}" ]; then tiny=(--tiny --steps 2 --warmup 1 --seq-len 64); fi
timeout 260 "$PY" bench/gpu_sft.py --out "$OUT" "${tiny[@]}" > "$OUT/gpu_sft.txt" 2>&1 || status=1
tail -n 12 "$OUT/gpu_sft.txt"
if grep -q '"error"' "$OUT/gpu_sft.json" 2>/dev/null; then status=1; fi
exit $status
