#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one run sized for one 10-minute device call.
# Not run by CI (no GPU there); nothing in the test suite depends on it.
#
#   bash bench/gpu_checks.sh            # on a CUDA machine, from the repository root
#   bash bench/gpu_checks.sh --smoke    # the same steps on this CPU with a tiny Qwen3 and tiny batches:
#                                       # checks the script runs (tests/test_gpu_checks_smoke.py), measures nothing
#
# Issue 5: fake-quant compiled == eager on CUDA (bit-exact) and the NVFP4 W4A4 step vs bf16
#          (eager and compiled fake-quant side by side), Qwen3-1.7B-shaped random model.
# Issue 6: offline QAD (top-k / sampled cache) vs online QAD (qadpipe's fused head, and the full-logits
#          step of today's online tools), tokens/s and peak memory, B x T = 4 x 2048.
# Issue 4: HF backend top-k capture vs its plain prefill.
# Every step has its own time limit, so one that hangs costs its slot, not the run; each
# table also lands in $OUT (or runs/bench/gpu) as a text file.  Needs torch with CUDA,
# transformers, pyarrow and zstandard -- not vLLM, SmolLM2, gguf or datasets, not an installed
# qadpipe (PYTHONPATH is the repo).  Wheels in .whl/ (git-ignored: name it in the device call's
# carry) are installed first, for a machine that lacks one and has no index -- the device image
# lacks zstandard -- e.g. (Python 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
set -u
case "${1:-}" in
  ""|--smoke) ;;
  *) echo "bench/gpu_checks.sh: unknown argument '$1'; expected none (CUDA run) or --smoke (CPU)" >&2; exit 2;;
esac
python="${PYTHON:-python3}"
site=""
if [ -z "${1:-}" ] && ls .whl/*.whl > /dev/null 2>&1; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qadpipe-site \
    .whl/*.whl && site=/tmp/qadpipe-site
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
# Every table row reaches its file as printed: a step killed at its limit keeps the rows it made
# (a block-buffered stdout would lose them all with the process).
export PYTHONUNBUFFERED=1
# online QAD of the 1.7B at 4 x 2048 holds ~60 of the H100's 80 GB: no room lost to fragmentation
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
dest="${OUT:-runs/bench/gpu}"                       # the tables (small: they come back from a device call)
work="${TMPDIR:-/tmp}/qadpipe-gpu-checks"           # models and caches (large: never under $OUT)
mkdir -p "$dest" "$work"

failed=""
slack=0    # seconds earlier steps left unused: the next step may take them (the total stays the same)
step() {   # step NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 + slack)); shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -s KILL "$limit" "$@" > "$dest/$name.txt" 2> "$dest/$name.err"   # KILL: a trainer would save on TERM
  local rc=$?
  tail -n 25 "$dest/$name.txt"
  grep -h "differs from eager" "$dest/$name.err"   # a compiled fake-quant that fell back to eager
  [ $rc -eq 0 ] || { echo "--- $name exited $rc; stderr tail:"; tail -n 15 "$dest/$name.err"; failed="$failed $name"; }
  echo "=== $name: rc=$rc, $((SECONDS - start)) s"
  slack=$((limit - (SECONDS - start) - 1))   # SECONDS counts whole seconds: never hand on more than was left
  [ $slack -ge 0 ] || slack=0
}

if [ "${1:-}" = "--smoke" ]; then
  device=cpu; model=qwen3-tiny-random; shape="256 128"; batch=1; seq=64; rounds=1; steps=3; warmup=1; sequences=4
else
  device=cuda; model=qwen3-1.7b-random; shape="6144 2048"; batch=4; seq=2048; rounds=5; steps=8; warmup=2; sequences=32
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# A module the steps import, missing, would fail two of them only after minutes of device time.
$python - <<'EOF' || exit 2
import importlib.util, sys, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
missing = [m for m in ("pyarrow", "zstandard", "safetensors", "tqdm", "yaml", "click") if not present(m)]
if missing:
    sys.exit(f"bench/gpu_checks.sh: missing {', '.join(missing)}; put their wheels in .whl/ (see this script's "
             "header) and name .whl in the device call's carry")
EOF

# Limits add up to 9 min 40 s (a device call may run 10), and what a step leaves unused goes to
# the next; quant_compile's cold Triton compiles of four formats get the most slack (60 s was
# killed on a loaded CPU).
step quant_compile 100 $python bench/quant_compile.py --device $device --shape $shape \
  --presets nvfp4 mxfp4 fp8 w4a16_int
step quant_overhead 160 $python bench/quant_overhead.py --device $device --model $model \
  --presets nvfp4 nvfp4_a16 w4a16_int --group-size 128 --fake-quant both --rounds $rounds --batch $batch --seq $seq
step distill_vs_online 220 $python bench/distill_vs_online.py --device $device --model $model \
  --batch $batch --seq $seq --steps $steps --warmup $warmup --workdir "$work/distill_vs_online"
step capture_hf 100 $python bench/capture_throughput.py --backend hf --device $device --model $model \
  --sequences $sequences --length $seq --batch-size $((batch * 2)) --repeats 3
[ -z "$failed" ] || { echo "failed steps:$failed"; exit 1; }
