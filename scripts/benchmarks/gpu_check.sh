#!/usr/bin/env bash
# The GPU checks, as one prepared script: prints every GPU figure README quotes (training throughput against
# the eager and whole-step-graph bare loops, by precision and steps per execution; evaluation at K=5,000 on
# the full test set; the default experiment with and without the fast path; several runs sharing one GPU).
#
#   bash scripts/benchmarks/gpu_check.sh [SECTION ...]     sections: tests train steps eval default sweep stacked
#                                                          ladder
#                                                          (default: all, in that order), and converged
#                                                          (experiment=converged, hours: call it again with
#                                                          the same sweep dir until it reports, resume=auto)
#
# Runtime on an H200: tests 2 min, train 2 min, steps 1 min, eval 1 min, default 4 min, sweep 1 min.
#
# Run from the repository root on a machine with a CUDA GPU and vaelab's dependencies. Where they are missing
# (a bare GPU machine), put cp312 wheels of the missing packages in .whl/ and Fashion-MNIST's four .gz files
# in .fmnist/ beside the repo: they are installed into /tmp/site and decompressed into $VAELAB_DATA_DIR first.
# Figures go to stdout; the benchmarks' JSON and every run's log to $OUT/gpu_check.tgz (OUT: default outputs).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs}
LOGS=/tmp/gpu_check
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true HYDRA_FULL_ERROR=1 VAELAB_BENCH_DIR=$LOGS
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import hydra, wandb" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
fi
export VAELAB_DATA_DIR=${VAELAB_DATA_DIR:-$PWD/data}
if [ -d .fmnist ] && [ ! -f "$VAELAB_DATA_DIR/FashionMNIST/raw/t10k-labels-idx1-ubyte" ]; then
  mkdir -p "$VAELAB_DATA_DIR/FashionMNIST/raw"
  for f in .fmnist/*.gz; do gunzip -c "$f" > "$VAELAB_DATA_DIR/FashionMNIST/raw/$(basename "$f" .gz)"; done
fi
sections=${*:-tests train steps eval default sweep stacked ladder}
has() { [[ " $sections " == *" $1 "* ]]; }
say() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

say environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, lightning, torchmetrics, hydra, wandb; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'hydra', hydra.__version__, 'wandb', wandb.__version__)"

if has tests; then
  say "GPU tests (tests/test_gpu.py): graph = eager to float rounding, fresh draws, fallbacks"
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
fi

TT="scripts/benchmarks/train_throughput.py --no-floor"
if has train; then
  # fp32, TF32 and bf16 autocast, each with the fast path (trainer=gpu: data on the GPU, CUDA graphs)
  for prec in "fp32:trainer.precision=32-true matmul_precision=highest" \
              "tf32:trainer.precision=32-true matmul_precision=high" \
              "bf16:trainer.precision=bf16-mixed matmul_precision=highest"; do
    say "training throughput, ${prec%%:*}"
    timeout 240 $PY $TT --models vanilla vamp deep --tag "${prec%%:*}" trainer=gpu ${prec#*:} \
      > "$LOGS/train_${prec%%:*}.log" 2>&1
    grep -A3 '^model ' "$LOGS/train_${prec%%:*}.log" || tail -5 "$LOGS/train_${prec%%:*}.log"
  done
fi

if has steps; then
  for run in graph_n1:"trainer.steps_per_execution=1" graph_n10:"trainer.steps_per_execution=10" \
             graph_n20:"trainer.steps_per_execution=20" eager_n1:"cuda_graphs=false trainer.steps_per_execution=1" \
             eager_n10:"cuda_graphs=false trainer.steps_per_execution=10"; do
    say "steps per execution: ${run%%:*} (vanilla, fp32)"
    timeout 120 $PY $TT --models vanilla --tag "${run%%:*}" trainer=gpu trainer.precision=32-true ${run#*:} \
      > "$LOGS/steps_${run%%:*}.log" 2>&1
    grep -A1 '^model ' "$LOGS/steps_${run%%:*}.log" || tail -5 "$LOGS/steps_${run%%:*}.log"
  done
fi

if has eval; then
  for mp in highest high; do
    say "evaluation, K=5000, full test set (10,000 images), matmul precision $mp"
    timeout 240 $PY scripts/benchmarks/eval_throughput.py --k 5000 --images 10000 --naive-images 500 \
      --matmul-precision $mp > "$LOGS/eval_$mp.log" 2>&1
    grep -A4 '^model ' "$LOGS/eval_$mp.log" || tail -5 "$LOGS/eval_$mp.log"
  done
fi

if has default; then
  say "default experiment: fast path (trainer=gpu), the same with TF32, then eager (cuda_graphs=false), one card"
  for mode in fast fast_tf32 eager; do
    case $mode in fast) extra="";; fast_tf32) extra="matmul_precision=high";; eager) extra="cuda_graphs=false";; esac
    start=$(date +%s)
    timeout 300 $PY -m vaelab.cli.train trainer=gpu logger=csv hydra.run.dir=/tmp/default_$mode $extra \
      > "$LOGS/default_$mode.log" 2>&1
    echo "$mode: exit $? in $(( $(date +%s) - start )) s"
    $PY -c "import json; r = json.load(open('/tmp/default_$mode/results.json')); m = r['metrics']; print('  ', {k: round(m[k], 4) for k in ('test/nll', 'test/nll_mc_se', 'test/elbo', 'test/kl', 'val/loss', 'perf/train_images_per_s') if k in m}, 'train_time_s', r['train_time_s'], 'test_time_s', r['test_time_s'])" \
      || tail -5 "$LOGS/default_$mode.log"
    grep -h "cuda graphs" "$LOGS/default_$mode.log" | head -3
  done
fi

if has sweep; then
  say "several runs on one GPU: hydra/launcher=joblib, 1 job alone, then 4 at once"
  common="trainer=gpu logger=csv test=false trainer.max_epochs=10 callbacks.image_grids.every_n_epochs=100"
  for jobs in 1 4; do
    seeds=$(seq -s, 1 $jobs)
    start=$(date +%s.%N)
    timeout 300 $PY -m vaelab.cli.train -m hydra/launcher=joblib hydra.launcher.n_jobs=$jobs seed=$seeds $common \
      hydra.sweep.dir=/tmp/sweep_$jobs > "$LOGS/sweep_$jobs.log" 2>&1
    end=$(date +%s.%N)
    $PY - "$jobs" "$start" "$end" <<'EOF'
import json, pathlib, sys
jobs, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
runs = [json.loads(p.read_text()) for p in pathlib.Path(f"/tmp/sweep_{jobs}").glob("*/results.json")]
rates = [r["metrics"].get("perf/train_images_per_s", 0) for r in runs]
images = sum(50_000 * r.get("epochs", 0) for r in runs)
print(f"{jobs} job(s): {len(runs)} finished; per-job images/s {[round(x) for x in rates]}; sum {sum(rates):,.0f}; "
      f"sweep wall {end - start:.1f} s, {images / (end - start):,.0f} images/s over the whole sweep incl. start-up")
EOF
  done
fi
if has stacked; then
  say "stacked sweeps: aggregate images/s of N stacked members vs one after another (bare loops), N up to 64"
  timeout 300 $PY scripts/benchmarks/sweep_throughput.py --no-app --ns 1,8,32,64 --steps 200 > "$LOGS/stacked_bare.log" 2>&1
  tail -6 "$LOGS/stacked_bare.log"
  say "stacked sweeps through the app: one after another and stacked (one process), N = 8"
  timeout 400 $PY scripts/benchmarks/sweep_throughput.py --ns 8 --steps 200 --subset 50000 > "$LOGS/stacked_app.log" 2>&1
  tail -3 "$LOGS/stacked_app.log"
  say "stacked members against their solo runs on the GPU: test NLL within 0.2 nats"
  common="trainer=gpu logger=csv trainer.max_epochs=3 callbacks.image_grids.every_n_epochs=100 seed=1,2"
  timeout 200 $PY -m vaelab.cli.train -m $common hydra.sweep.dir=/tmp/solo_gpu > "$LOGS/solo_gpu.log" 2>&1
  timeout 200 $PY -m vaelab.cli.train -m hydra/launcher=stacked $common hydra.sweep.dir=/tmp/stacked_gpu \
    > "$LOGS/stacked_gpu.log" 2>&1
  $PY - <<'EOF'
import json, pathlib
def nll(d):
    runs = [json.loads(p.read_text()) for p in pathlib.Path(d).glob("*/results.json")]
    return {r["seed"]: r["metrics"].get("test/nll") for r in runs}
solo, stacked = nll("/tmp/solo_gpu"), nll("/tmp/stacked_gpu")
for seed in sorted(solo):
    gap = abs(solo[seed] - stacked.get(seed, float("nan")))
    print(f"seed {seed}: solo {solo[seed]:.3f}  stacked {stacked.get(seed)}  gap {gap:.3f} nats  "
          f"{'ok' if gap <= 0.2 else 'OVER 0.2'}")
EOF
fi

if has converged; then
  say "experiment=converged (4 configurations x 3 seeds, stacked; resume=auto continues it at every call)"
  start=$(date +%s)
  timeout 540 $PY -m vaelab.cli.train -m experiment=converged trainer=gpu logger=csv resume=auto \
    hydra.sweep.dir=${CONVERGED_DIR:-/tmp/converged} >> "$LOGS/converged.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s"
  $PY -m vaelab.cli.report ${CONVERGED_DIR:-/tmp/converged} 2>&1 | tail -12
fi
if has ladder; then
  say "model=ladder and model=ladder_gpu: training images/s against the bare loops, the whole step as one graph"
  timeout 300 $PY $TT --models ladder ladder_gpu --blocks 4 --block 20 --tag ladder trainer=gpu 2>&1 | tail -6
fi
tar czf "$OUT/gpu_check.tgz" -C "$LOGS" . 2>/dev/null
say done
