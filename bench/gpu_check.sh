#!/usr/bin/env bash
# The GPU check of the training step, for a machine with one CUDA GPU; one run of under 9
# minutes on an H100/H200 prints every row the step issue asks for, as JSON lines in
# ${OUT:-.}/bench-gpu.jsonl (each timed row: median and spread of windows that the variants
# take in turns, after the same warm-up for all; see bench/step.py):
#   1. numerics of the fast path vs the plain fp32 path (exit non-zero if one fails);
#   2. the profile (top kernels, device idle fraction) of the reference and of dino_core,
#      at batch 64 and 128;
#   3. the step ladder at the paper's sizes (ViT-S/16, 2x224 + 10x96, K=65536), batch 128
#      and 64: the reference semantics, dino_core, then each lever on its own (compiled
#      blocks, CUDA graphs, one packed backbone call, the chunked head-and-loss, activation
#      checkpointing, float8 if torchao is installed) and the levers together;
#   4. ViT-B/16 and ViT-S/8 rows (img/s, peak memory, vs the reference);
#   5. end to end from JPEGs: a folder decoded on the CPU, and packed shards decoded on the
#      GPU (nvjpeg) with crops of each full image, vs the synthetic-crop rate;
#   6. the multi-crop augmentation on the GPU.
# Each command has its own timeout, so a lever that hangs costs its row, not the run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/bench-gpu.jsonl"
: > "$out"
export PYTHONUNBUFFERED=1
step() { timeout "$1" python3 bench/step.py --device cuda "${@:2}" | tee -a "$out"; }
LEVERS=reference,dino_core,dino_core+compile,dino_core+cudagraphs,dino_core+packed
LEVERS=$LEVERS,dino_core+packed_sdpa,dino_core+chunked,dino_core+ckpt,dino_core+fp8
LEVERS=$LEVERS,dino_core+compile+packed+chunked
step 90 --setting paper --batch 128 --steps 3 --compile --check --variants reference,dino_core
step 60 --setting paper --batch 64 128 --warmup 3 --profile reference,dino_core
step 150 --setting paper --batch 128 --steps 8 --windows 3 --variants "$LEVERS" --e2e 1024 --e2e-packed
step 80 --setting paper --batch 64 --steps 8 --windows 3 --variants reference,dino_core,dino_core+compile+packed+chunked
step 60 --setting paper_b16 --batch 64 --steps 5 --windows 3 --variants reference,dino_core,dino_core+compile+packed+chunked
step 45 --setting paper_s8 --batch 32 --steps 5 --variants reference,dino_core,dino_core+ckpt
timeout 30 python3 bench/augment.py --device cuda --quick | tee -a "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
checks = [r for r in rows if "check" in r]
bad = [c["check"] for c in checks if not c["ok"]]
errors = [f'{r.get("variant")}: {r["error"][:80]}' for r in rows if "error" in r]
print(f"{len(rows)} rows; {len(checks)} numerics checks, failed: {bad or 'none'}; "
      f"errors: {errors or 'none'}")
sys.exit(1 if bad or not checks else 0)
PY
