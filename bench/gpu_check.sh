#!/usr/bin/env bash
# The GPU path, checked once on a machine with a GPU, in under ten minutes:
#
#   1. cuda         CUDA and bf16 sanity: the device, bf16 autocast of a conv and a
#                   matmul against fp32 (relative error), TF32 state
#   2. train_step   bench/train_step.py --device cuda at 256 px, reference widths, with
#                   every switch (bf16, channels_last, fused, cudnn_benchmark, compile, all)
#   3. trial        one real search trial of spaces/lambda.yaml under `--profile gpu`
#                   (gpus_per_worker 1), cut to 3 epochs of 100 steps: epoch times as
#                   logged to MLflow (trial_figures), GPU utilisation sampled by nvidia-smi
#   4. data_loader  bench/data_loader.py on this machine: 256 px crops, workers 0/2/4,
#                   beside step 2's demand (skipped while the script does not exist)
#   5. translate    bench/translate.py: a generated 4096² slide through the gpu
#                   profile's U-Net (depth 8, ngf 64)
#
# Every step writes its JSON (and its log) into bench/results/gpu_check/; summary.json
# says which steps passed, failed or were skipped, and how long each took. A failing
# step does not stop the others; the exit status is 1 if any failed.
#
#   bash bench/gpu_check.sh                # on the GPU machine
#   bash bench/gpu_check.sh --cpu-smoke    # here: every step tiny on the CPU, the
#                                          # CUDA-only parts skipped with a message
#                                          # (results in $TMPDIR/stain-search-gpu-check-cpu-smoke/)
#   bash bench/gpu_check.sh --out DIR      # somewhere else
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python}
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ $SMOKE = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device is visible; on a CPU machine run --cpu-smoke" >&2
  exit 2
fi
if [ -z "$OUT" ]; then  # a smoke run's figures are no measurement: kept out of the repo
  OUT=$([ $SMOKE = 1 ] && echo "${TMPDIR:-/tmp}/stain-search-gpu-check-cpu-smoke" \
        || echo "$HERE/results/gpu_check")
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d -t stain-search-gpu-check-XXXXXX)
SAMPLER=""
DATA_PID=""
cleanup() {  # the samplers and the dataset generator this script started, then its scratch
  for pid in "$SAMPLER" "$DATA_PID"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
export SMOKE OUT WORK ROOT
cd "$ROOT" || exit 2

# step NAME TIMEOUT_S CMD...: run, log to OUT/NAME.log, record status and milliseconds.
step() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  echo "== $name (at most ${limit} s): $*"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="timed out after ${limit} s" ;;
              *) status="failed (exit $rc)" ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" $(( ($(date +%s%N) - t0) / 1000000 )) >> "$WORK/steps.tsv"
  echo "== $name: $status"
}
# limit GPU_S SMOKE_S: a step's time limit. On the GPU the limits add up to 600 s, so
# the whole check stays under ten minutes; the CPU smoke test gets room for a busy CI box.
limit() { [ $SMOKE = 1 ] && echo "$2" || echo "$1"; }
skip() {
  echo "== $1: skipped: $2"
  printf '%s\t%s\t0\n' "$1" "skipped: $2" >> "$WORK/steps.tsv"
}

# The gpu profile's dataset (512 px phantom fields, ~1 min of one CPU core the
# first time): generated in the background while the GPU runs steps 1-2.
if [ $SMOKE = 0 ]; then
  "$PY" -c "from stain_search.data.phantom import builtin_dataset as b; print(b('builtin:phantom-trichrome-512'))" \
    > "$WORK/data.log" 2>&1 &
  DATA_PID=$!
fi

# --- 1. CUDA and bf16 ---------------------------------------------------------------------
step cuda "$(limit 60 120)" "$PY" - <<'EOF'
import json, os, sys, time
import torch
out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
smoke = os.environ["SMOKE"] == "1"
device = torch.device("cuda" if out["cuda_available"] and not smoke else "cpu")
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               bf16_supported=torch.cuda.is_bf16_supported(),
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
               tf32_cudnn=torch.backends.cudnn.allow_tf32)
else:
    print("cuda: skipped the CUDA-only part (device, capability, TF32): --cpu-smoke, "
          "checking bf16 autocast on the CPU instead")
g = torch.Generator().manual_seed(0)
a, b = (torch.randn(512, 512, generator=g).to(device) for _ in range(2))
x = torch.randn(4, 64, 64, 64, generator=g).to(device)
conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
with torch.no_grad():
    ref_mm = a.double() @ b.double()
    ref_conv = torch.nn.functional.conv2d(x.double(), conv.weight.double(),
                                          conv.bias.double(), padding=1)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mm, y = a @ b, conv(x)
    rel = lambda got, ref: float((got.double() - ref).norm() / ref.norm())
    out.update(device_used=str(device), bf16_dtype=str(mm.dtype),
               bf16_matmul_rel_err=rel(mm, ref_mm), bf16_conv_rel_err=rel(y, ref_conv),
               fp32_matmul_rel_err=rel(a @ b, ref_mm))
# bf16 has an 8-bit mantissa: ~0.4 % relative error per product, far less summed.
ok = mm.dtype == torch.bfloat16 and out["bf16_matmul_rel_err"] < 2e-2 \
    and out["bf16_conv_rel_err"] < 2e-2 and all(map(torch.isfinite, (mm.sum(), y.sum())))
out["ok"] = bool(ok)
print(json.dumps(out, indent=2))
json.dump(out, open(os.path.join(os.environ["OUT"], "cuda.json"), "w"), indent=2)
sys.exit(0 if ok else 1)
EOF

# --- 2. the training step at 256 px with every switch -------------------------------------
if [ $SMOKE = 1 ]; then
  step train_step 400 "$PY" bench/train_step.py --smoke-test --device cpu \
    --json "$OUT/train_step.json"
else
  step train_step 180 "$PY" bench/train_step.py --device cuda --preset reference --sizes 256 \
    --batches 1,4 --attention none --r1 off --variants plain,fp32,bf16 \
    --switches channels_last,fused,cudnn_benchmark,compile,all --switch-attention none \
    --rounds 2 --json "$OUT/train_step.json"
fi

# --- 3. one real trial under the gpu profile ----------------------------------------------
[ -n "$DATA_PID" ] && { wait "$DATA_PID" || echo "(generating the 512 px phantom failed: $(tail -1 "$WORK/data.log"))"; DATA_PID=""; }
"$PY" - <<'EOF'
# A one-trial copy of lambda.yaml: the profile as bundled, cut to a few epochs.
import os, yaml
from stain_search.config import read_yaml
raw = read_yaml(os.path.join(os.environ["ROOT"], "search_spaces", "lambda.yaml"))
smoke = os.environ["SMOKE"] == "1"
profile = raw["profiles"]["demo" if smoke else "gpu"]
profile.setdefault("base", {}).update(
    {"data.crop": 32, "data.batch_size": 2, "data.eval_crops": 4, "model.depth": 3,
     "model.ngf": 8, "model.ndf": 8, "model.d_blocks": 2, "train.epochs": 2,
     "train.steps_per_epoch": 3} if smoke else
    {"train.epochs": 3, "train.decay_epochs": 1, "train.steps_per_epoch": 100})
profile["search"] = {"num_samples": 1, "max_concurrent": 1}
raw["name"] = "gpu-check"
raw["search"].pop("early_stopping", None)  # one trial: nothing to compare against
raw["search"]["enqueue"] = [{"loss.lambda_cycle": 10.0, "loss.lambda_identity": 0.5}]
with open(os.path.join(os.environ["WORK"], "space.yaml"), "w") as f:
    yaml.safe_dump(raw, f, sort_keys=False, allow_unicode=True)
EOF
if [ $SMOKE = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 500 > "$WORK/gpu.csv" 2>/dev/null &
  SAMPLER=$!
else
  skip gpu_utilisation "no nvidia-smi sampling (--cpu-smoke or no nvidia-smi)"
fi
step trial "$(limit 150 600)" "$PY" -m stain_search.cli run "$WORK/space.yaml" --profile "$([ $SMOKE = 1 ] && echo demo || echo gpu)" \
  --storage "$WORK/runs" --tracking-uri "sqlite:///$WORK/mlflow.db"
[ -n "$SAMPLER" ] && { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""; }
step trial_figures "$(limit 30 300)" "$PY" - <<'EOF'
# Epoch times as the trial logged them to MLflow (analysis.load: trials x epochs);
# GPU utilisation from the samples.
import csv, json, os, statistics, sys
import pandas as pd
from stain_search.analysis.load import load_search
work, out = os.environ["WORK"], os.environ["OUT"]
frame = load_search("gpu-check", storage=os.path.join(work, "runs"),
                    tracking_uri=f"sqlite:///{work}/mlflow.db").frame
keys = [k for k in ("time_train_s", "time_eval_s", "images_per_s", "fd_random", "fid")
        if k in frame.columns]
epochs = ([{"epoch": int(r["epoch"]), **{k: None if pd.isna(r[k]) else float(r[k]) for k in keys}}
           for _, r in frame.dropna(subset=["epoch", "time_train_s"]).iterrows()]
          if "time_train_s" in frame.columns else [])
record = {"space": "lambda.yaml, 1 trial, 3 epochs x 100 steps (2 x 3 tiny on --cpu-smoke)",
          "epochs": sorted(epochs, key=lambda e: e["epoch"] or 0)}
samples = []
if os.path.exists(os.path.join(work, "gpu.csv")):
    for row in csv.reader(open(os.path.join(work, "gpu.csv"))):
        try:
            samples.append((float(row[1]), float(row[2])))
        except (IndexError, ValueError):
            pass
if samples:
    util = [u for u, _ in samples]
    busy = [u for u in util if u > 0]  # Ray start and data generation leave the GPU idle
    record["gpu_utilisation"] = {
        "samples": len(util), "interval_s": 0.5, "mean_pct": statistics.fmean(util),
        "mean_while_busy_pct": statistics.fmean(busy) if busy else 0.0,
        "max_pct": max(util), "peak_memory_mib": max(m for _, m in samples)}
later = record["epochs"][1:] or record["epochs"]  # the first epoch includes warm-up
if later:
    record["epoch_train_s_median"] = statistics.median(e["time_train_s"] for e in later)
print(json.dumps(record, indent=2))
json.dump(record, open(os.path.join(out, "trial.json"), "w"), indent=2)
if not epochs:
    sys.exit("trial: the search logged no epoch to MLflow")
EOF

# --- 4. the loader bench -------------------------------------------------------------------
if [ -f bench/data_loader.py ]; then
  if [ $SMOKE = 1 ]; then
    step data_loader 300 "$PY" bench/data_loader.py --smoke-test \
      --json "$OUT/data_loader.json"
  else  # the demand beside it: this machine's step at 256 px, from step 2
    step data_loader 90 "$PY" bench/data_loader.py --crops 256 --workers 0 2 4 \
      --train-step-json "$OUT/train_step.json" --json "$OUT/data_loader.json"
  fi
else
  skip data_loader "bench/data_loader.py does not exist yet"
fi

# --- 5. translate throughput on a generated slide -----------------------------------------
if [ $SMOKE = 1 ]; then
  step translate 300 "$PY" bench/translate.py --smoke-test --device cpu --json "$OUT/translate.json"
else
  step translate 90 "$PY" bench/translate.py --size 4096 --depth 8 --ngf 64 --batch-size 16 \
    --device cuda --json "$OUT/translate.json"
fi

# --- summary -------------------------------------------------------------------------------
"$PY" - <<'EOF'
import datetime, json, os, platform, sys
rows = []
for line in open(os.path.join(os.environ["WORK"], "steps.tsv")):
    name, status, ms = line.rstrip("\n").split("\t")
    rows.append({"step": name, "status": status, "seconds": round(int(ms) / 1000, 1)})
record = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "host": platform.node(), "cpu_smoke": os.environ["SMOKE"] == "1", "steps": rows}
json.dump(record, open(os.path.join(os.environ["OUT"], "summary.json"), "w"), indent=2)
print("\n| step | status | s |\n|---|---|---:|")
for r in rows:
    print(f"| {r['step']} | {r['status']} | {r['seconds']} |")
sys.exit(any(r["status"].startswith(("failed", "timed out")) for r in rows))
EOF
STATUS=$?
echo "results in $OUT"
exit $STATUS
