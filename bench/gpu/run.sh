#!/usr/bin/env bash
# Every GPU number sgex needs, in one run on one H100/H200 (at most 8 minutes of wall time).
#
#   bash bench/gpu/run.sh OUTDIR               on the GPU machine (python3 with torch+CUDA, triton)
#   bash bench/gpu/run.sh --cpu-smoke OUTDIR   every step at tiny sizes on CPU, Triton interpreted
#
# Steps (each timed; a failed or timed-out step is recorded and the next one runs):
#   a  pytest -m "gpu and not slow": the Triton kernel on CUDA against the reference at every
#      shape/dilation the generator runs, FP16 and FP32; the torch FP16 path against FP32
#   b  kernel microbenchmark at the generator's layer shapes (outputs 1024, 2048; batch 1, 4):
#      fused Triton op vs official grouped conv vs best unfused cuDNN formulation
#   c  sgex-bench, superres and edit, outputs 1024 and 2048, batch 1 and 4, image and video:
#      torch-official (FP32 baseline) vs torch (FP16, fused op) vs torch-cudagraph, and
#      torch-compile on the goal configuration (superres, output 1024, batch 1, video)
#   d  torch-profiler breakdown by layer group of the torch path (superres, output 1024, batch 1)
#   e  OUTDIR/README.md with the tables and the exact commands (bench/gpu/report.py)
# A wall-clock budget (8 min, SGEX_GPU_BUDGET_S; smoke: none) gives each step at most what is
# left, keeping time for e; steps that no longer fit are recorded as skipped. Run order: b, the
# goal case of c (superres video batch 1), d, a, the rest of c, torch-compile, e -- the goal
# numbers first; compiled kernels and autotuning choices are cached on disk between the steps, so
# the tests of a find most kernels already built.
#
# The device tool returns at most 8 files from $OUT: there, run
#   bash bench/gpu/run.sh /tmp/gpu && tar -C /tmp -czf $OUT/gpu.tgz gpu
# and unpack it into bench/results/<h100|h200>/ here. Wheels in .whl/ (e.g. tqdm, if missing
# there) are installed into /tmp/sgex-site first, as the device README says.
#
# sgex-bench runs with --no-end-to-end (the decode/encode timing of video files is CPU work and
# would not fit the 8 minutes); the model numbers are what this script is for.
#
# Sizes are written as OUTPUT sides, which is what sgex-bench's --res takes (the bucket is named by
# its output side; x1 = output / 4).
set -u
cd "$(dirname "$0")/../.."
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/gpu/run.sh [--cpu-smoke] OUTDIR" >&2
  exit 2
fi
OUTDIR=$1
if [ -e "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR" 2>/dev/null)" ]; then
  echo "bench/gpu/run.sh: $OUTDIR exists and is not empty (give a new directory)" >&2
  exit 2
fi
mkdir -p "$OUTDIR/logs" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out_to_res() { echo "$1"; }   # sgex-bench --res is the output side
RES_MEANS=output

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/sgex-site .whl/*.whl >"$OUTDIR/logs/wheels.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/sgex-site"
fi

if [ $SMOKE = 1 ]; then
  export TRITON_INTERPRET=1 SGEX_GPU_SMOKE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  DEVICE=cpu; OUTS="128"; BATCHES="1"; TINY=(--width-div 4); BUDGET=0
  BENCH_ITERS=(--iters 1 --warmup 0); VIDEO_ITERS=(); FRAMES=2
  TESTS=(-m gpu tests/bench/test_gpu_path.py)
  KERNEL=(--device cpu --width-div 4 --outputs 32 --batch 1 --iters 1 --warmup 0 --max-channels 16)
  PROFILE=(--device cpu --width-div 4 --output 128 --iters 1 --warmup 0)
  TORCH_BACKENDS=torch-official,torch
  COMPILE_CASE=""
  CASES="superres/video/1 edit/image/1"
  LIMIT_SCALE=4  # a shared 2-core CI machine: the limits only catch a hang
else
  unset TRITON_INTERPRET SGEX_GPU_SMOKE
  DEVICE=cuda; OUTS="1024 2048"; BATCHES="1 4"; TINY=(); BUDGET=${SGEX_GPU_BUDGET_S:-480}
  BENCH_ITERS=(--iters 10 --warmup 2); VIDEO_ITERS=(--iters 4); FRAMES=8  # video: 4 clips of 8 frames
  # only the files that hold GPU tests: a module of another extra (dlib, ray, av...) that fails to
  # import there must not stop the GPU tests from running
  mapfile -t GPU_FILES < <(grep -rlE "mark\.gpu" tests --include='test_*.py' | sort)
  TESTS=(-m "gpu and not slow" --continue-on-collection-errors "${GPU_FILES[@]}")
  KERNEL=(--outputs 1024 2048 --batch 1 4 --iters 50 --warmup 10)
  PROFILE=(--output 1024 --batch 1 --iters 5 --warmup 2)
  TORCH_BACKENDS=torch-official,torch,torch-cudagraph
  COMPILE_CASE="superres video 1 1024"
  CASES=""
  for task in superres edit; do for mode in video image; do for b in $BATCHES; do
    CASES="$CASES $task/$mode/$b"; done; done; done
  LIMIT_SCALE=1
  # Autotuning results and compiled kernels are shared by the steps' processes.
  export TRITON_CACHE_DIR=/tmp/sgex-triton-cache TRITON_CACHE_AUTOTUNING=1
fi
RES_LIST=""
for o in $OUTS; do RES_LIST="$RES_LIST $(out_to_res "$o")"; done

T0=$(date +%s)
STEPS="$OUTDIR/steps.tsv"
printf 'step\trc\tseconds\tlimit_s\tstatus\tcommand\n' >"$STEPS"

# step NAME LIMIT_S CMD...: run with a timeout of min(LIMIT_S, budget left - 20 s for the report).
step() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )); shift 2
  local cmd status rc t1 t2 left
  cmd=$(printf '%q ' "$@")
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( BUDGET - ($(date +%s) - T0) - 20 ))
    if [ "$left" -lt 15 ]; then
      printf '%s\t-\t0\t%s\tskipped (8-minute budget spent)\t%s\n' "$name" "$limit" "$cmd" >>"$STEPS"
      echo "[$name] skipped: budget spent"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "[$name] $cmd (limit ${limit}s)"
  t1=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/logs/$name.log" 2>&1
  rc=$?
  t2=$(( ($(date +%s%N) - t1) / 100000000 ))  # tenths of a second
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%d.%d\t%s\t%s\t%s\n' "$name" "$rc" $((t2 / 10)) $((t2 % 10)) "$limit" "$status" "$cmd" >>"$STEPS"
  echo "[$name] $status in $((t2 / 10)).$((t2 % 10)) s"
  tail -n 3 "$OUTDIR/logs/$name.log"
  return 0
}

"$PY" - >"$OUTDIR/environment.json" 2>"$OUTDIR/logs/environment.log" <<'EOF'
import importlib, json, os, platform, shutil, subprocess
env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
for m in ("torch", "triton", "numpy", "cv2", "tqdm", "onnx", "onnxruntime", "matplotlib", "pytest", "scipy"):
    try:
        env[m] = getattr(importlib.import_module(m), "__version__", "present")
    except Exception as e:
        env[m] = f"MISSING ({type(e).__name__}: {e})"
try:
    import torch
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
except Exception as e:
    env["cuda_available"] = f"error: {e}"
if shutil.which("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,"
                        "power.draw,utilization.gpu", "--format=csv"], capture_output=True, text=True)
    env["nvidia_smi"] = r.stdout.strip()
env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
print(json.dumps(env, indent=1))
EOF
echo "environment: $(tr -d '\n' <"$OUTDIR/environment.json" | cut -c1-400)"

bench_case() {  # bench_case NAME TASK MODE BATCH [extra sgex-bench args...]
  local name=$1 task=$2 mode=$3 b=$4; shift 4
  local extra=()
  [ "$mode" = video ] && extra=("${VIDEO_ITERS[@]}")
  step "c-$name" "${E2E_LIMIT:-90}" "$PY" -m bench.cli --task "$task" --res $RES_LIST --mode "$mode" \
    --batch "$b" --frames "$FRAMES" --backends "$TORCH_BACKENDS" --device "$DEVICE" --random-weights \
    "${TINY[@]}" "${BENCH_ITERS[@]}" "${extra[@]}" --no-end-to-end --json "$OUTDIR/$name.json" --plot "$OUTDIR/$name.png" "$@"
}

step b-kernel 90 "$PY" -m bench.gpu.kernel_bench "${KERNEL[@]}" --out "$OUTDIR/kernel.json"
bench_case e2e-superres-video-b1 superres video 1
step d-profile 60 "$PY" -m bench.gpu.profile --task superres "${PROFILE[@]}" --json "$OUTDIR/profile.json"
# the GPU tests write their measured errors and PSNRs to $SGEX_GPU_REPORT/gpu_tests.json
export SGEX_GPU_REPORT="$OUTDIR/logs"
step a-pytest 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  "${TESTS[@]}" --junitxml "$OUTDIR/logs/pytest.xml"
for case in $CASES; do
  [ "$case" = "superres/video/1" ] && continue
  IFS=/ read -r task mode b <<<"$case"
  bench_case "e2e-$task-$mode-b$b" "$task" "$mode" "$b"
done
if [ -n "$COMPILE_CASE" ]; then
  set -- $COMPILE_CASE
  RES_LIST_SAVED=$RES_LIST; RES_LIST=$(out_to_res "$4"); TORCH_BACKENDS_SAVED=$TORCH_BACKENDS
  TORCH_BACKENDS=torch-official,torch,torch-compile
  E2E_LIMIT=150 bench_case "compile-$1-$2-b$3" "$1" "$2" "$3" --compile-mode default
  RES_LIST=$RES_LIST_SAVED; TORCH_BACKENDS=$TORCH_BACKENDS_SAVED
fi
BUDGET=0 step e-report 60 "$PY" -m bench.gpu.report "$OUTDIR" --smoke "$SMOKE" --res-means "$RES_MEANS"
echo "total $(( $(date +%s) - T0 )) s; steps: $STEPS; report: $OUTDIR/README.md"
cat "$STEPS"
# exit 0 even when a step failed: the failures are recorded in steps.tsv and README.md
exit 0
