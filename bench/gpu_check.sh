#!/usr/bin/env bash
# The GPU check of the training step, for a machine with one CUDA GPU (about 2 minutes on
# an H100): numerics of the fast path against the plain fp32 path, the step benchmark at the
# paper's sizes (reference semantics vs. the project's step, eager and compiled), the
# end-to-end rate from JPEGs (a folder decoded on the CPU, and packed shards decoded on the
# GPU with crops of each full image), and the multi-crop augmentation on the GPU. Exits non-zero if a
# numerics check fails. Writes JSON lines to ${OUT:-.}/bench-gpu.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/bench-gpu.jsonl"
export PYTHONUNBUFFERED=1
timeout 240 python3 bench/step.py --device cuda --setting paper --batch 128 --steps 10 \
    --compile --check --e2e 1024 --e2e-packed --variants reference,dino_core,dino_core+compile | tee "$out"
timeout 60 python3 bench/step.py --device cuda --setting paper --batch 64 --steps 10 \
    --variants reference,dino_core | tee -a "$out"
timeout 60 python3 bench/augment.py --device cuda --quick | tee -a "$out"
python3 - "$out" <<'PY'
import json, sys
checks = [r for r in map(json.loads, open(sys.argv[1])) if "check" in r]
bad = [c["check"] for c in checks if not c["ok"]]
print(f"{len(checks)} numerics checks, failed: {bad or 'none'}")
sys.exit(1 if bad or not checks else 0)
PY
