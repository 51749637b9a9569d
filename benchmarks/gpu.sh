#!/bin/bash
# The GPU figures of docs/benchmarks/gpu.md (run from the repository root on a CUDA machine):
#   bash benchmarks/gpu.sh OUT [PARTS]      PARTS: any of env bf16 fp32 vits oom tune base w15 b128 b128w15 tunecpu
#                                                  ft ddp export serve (fine-tuning full and LoRA in bf16, torchrun on
#                                                  one GPU, export parity of the fine-tuned run, the demo under load)
# Data: the first PER_CLASS images (sorted names) of each class folder of SRC, each copied COPIES times into
# /tmp/dogs-xCOPIES (class folders; distinct files with the same bytes). On the H100 of part 7, SRC was a
# copy of that 20-per-class slice carried to the machine. Results: OUT/res.tgz, re-packed after every step.
# PY: the Python to use (dogbench is run from src/ through PYTHONPATH, so the machine's torch is kept).
OUT=${1:?out dir}; PARTS=${2:-"env bf16 ft ddp export serve fp32 vits oom tune"}; BUDGET=${BUDGET:-570}
SRC=${SRC:-../shared/data/stanford-dogs-dev/Images}; PER_CLASS=${PER_CLASS:-20}
PY=${PY:-python3}; IMAGES=${IMAGES:-8192}; REPEATS=${REPEATS:-3}; COPIES=${COPIES:-4}; BIG_IMAGES=${BIG_IMAGES:-4096}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
RES=$(mktemp -d /tmp/res.XXXX); mkdir -p "$OUT"
DATA=/tmp/dogs-x$COPIES
if [ ! -d $DATA ]; then
  for c in "$SRC"/*/; do c=$(basename "$c"); mkdir -p $DATA/$c
    for f in $(ls "$SRC/$c" | sort | head -$PER_CLASS); do
      for k in $(seq 1 $COPIES); do cp "$SRC/$c/$f" $DATA/$c/k${k}_$f; done
    done
  done
fi
echo "data: $(find $DATA -name '*.jpg' | wc -l) images in $DATA ($SECONDS s)"
BB="--backbone resnet50=resnet50@random --backbone vit_s16=vit_s16@random"
BENCH="$PY -m dogbench.cli bench --data $DATA --repeats $REPEATS --quiet"
cap() { local left=$((BUDGET - SECONDS)); [ $left -lt $1 ] && echo $left || echo $1; }
run() { # NAME CAP CMD...: run under a time cap with the log in RES, then re-pack RES into OUT
  local name=$1 c=$(cap $2); shift 2
  echo; echo "=== $name ($(date +%T), $SECONDS s elapsed, cap $c s)"
  if [ $c -lt 20 ]; then echo "skipped: budget spent"; return; fi
  timeout $c "$@" > >(tee $RES/$name.log) 2>&1; echo "exit $? after $SECONDS s"
  tar czf $OUT/res.tgz -C $RES .
}
for part in $PARTS; do case $part in
env) echo "=== env"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import sys,os,torch,torchvision,timm,PIL,numpy;print(sys.version.split()[0],'torch',torch.__version__,'tv',torchvision.__version__,'timm',timm.__version__,'PIL',PIL.__version__,'numpy',numpy.__version__,'cuda',torch.cuda.is_available(),'cores',len(os.sched_getaffinity(0)))" | tee $RES/env.log;;
bf16) run bf16 330 $BENCH $BB --images $IMAGES --out $RES/bf16 $EXTRA;;
fp32) run fp32 150 $BENCH $BB --images $IMAGES --no-recipe --set features.precision='"fp32"' --out $RES/fp32 $EXTRA;;
vits) run vits 150 $BENCH --backbone vit_b16=vit_b16@random --backbone vit_l16=vit_l16@random --images $BIG_IMAGES --no-recipe --out $RES/vits $EXTRA;;
oom) run oom 90 $PY benchmarks/gpu_oom_check.py ${OOM_MODEL:-vit_b16} ${OOM_CAP:-3};;
tune) run tune 200 $PY benchmarks/bench_tune.py --device cuda --out $RES/tune_cuda.json --searches default linear $TUNE_ARGS;;
tunecpu) run tunecpu 120 $PY benchmarks/bench_tune.py --device cpu --out $RES/tune_cpu.json --searches default linear $TUNE_ARGS;;
base) run base 120 $BENCH $BB --images $IMAGES --no-recipe --out $RES/base $EXTRA;;
w15) run w15 120 $BENCH $BB --images $IMAGES --no-recipe --set features.num_workers=15 --out $RES/w15 $EXTRA;;
b128) run b128 120 $BENCH $BB --images $IMAGES --no-recipe --batch-size 128 --out $RES/b128 $EXTRA;;
b128w15) run b128w15 120 $BENCH $BB --images $IMAGES --no-recipe --batch-size 128 --set features.num_workers=15 --out $RES/b128w15 $EXTRA;;
ft) run ft 200 $PY -m dogbench.cli finetune --data $DATA --out $RES/ft --cache-dir $RES/cache --backbone vit_s16=vit_s16@random \
  --methods full,lora --epochs 1 --trials 2 --set features.precision='"bf16"' --set finetune.precision='"bf16"' \
  --set report.enabled=false --quiet;;
ddp) run ddp 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m dogbench.cli extract --data $DATA \
  --out $RES/ddp --cache-dir $RES/cache-ddp $BB --quiet;;
export) run export 90 $PY -m dogbench.cli export $RES/ft --out $RES/export --format timm,onnx;;
serve) run serve 120 $PY benchmarks/serve_load.py --run $RES/ft --users 20 --rounds 3 --json $RES/serve.json;;
esac; done
echo "=== done after $SECONDS s"; ls -la $OUT
