#!/usr/bin/env bash
# The speed figures of docs/benchmarks/extraction-cpu.md, on the real images of ../shared (run from the repository root):
#   bash benchmarks/speed.sh [OUT]      (OUT default runs/speed; about 30 minutes on a 2-core CPU)
# Random weights for ResNet50 / ViT-S/16 / ViT-B/16 (speed does not depend on the values), the two
# pretrained files of ../shared for EfficientNet-Lite0 and the DINOv2 ViT-S/14.
set -euo pipefail
OUT=${1:-runs/speed}
DEV=../shared/data/stanford-dogs-dev
ORIG=../shared/data/stanford-dogs-originals
W=../shared/weights
DOGBENCH=${DOGBENCH:-.venv/bin/dogbench}
CNN="cnn=tf_efficientnet_lite0@$W/tf_efficientnet_lite0.in1k.safetensors"
DINO="vit=vit_small_patch14_dinov2@$W/vit_small_patch14_dinov2.imgfocus.fp16.safetensors,img_size=224,crop_pct=0.875"

# 1. The acceptance figures: ResNet50 and ViT-S/16, 5 rounds of 192 images.
$DOGBENCH bench --data $DEV --backbone resnet50=resnet50@random --backbone vit_s16=vit_s16@random \
  --images 192 --repeats 5 --out "$OUT/main" --quiet
# 2. The other backbones, 3 rounds of 128 images.
$DOGBENCH bench --data $DEV --backbone vit_b16=vit_b16@random --backbone "$CNN" --backbone "$DINO" \
  --images 128 --repeats 3 --set bench.model_batches=2 --out "$OUT/others" --quiet
# 3. torch.compile against eager, model alone.
$DOGBENCH bench --data $DEV --backbone resnet50=resnet50@random --backbone vit_s16=vit_s16@random \
  --images 64 --repeats 3 --compile --no-recipe --out "$OUT/compile" --quiet
# 4. Full-size photos (median short side 375 px): decode cost for the whole-dataset projection, both decoders.
for decoder in auto pil; do
  $DOGBENCH bench --data $ORIG --backbone "$CNN" --images 80 --repeats 3 --set features.decoder=\"$decoder\" \
    --no-recipe --out "$OUT/originals-$decoder" --quiet
done
# 5. glibc heap reuse off (the default allocator), model alone and end to end.
$DOGBENCH bench --data $DEV --backbone resnet50=resnet50@random --backbone vit_s16=vit_s16@random \
  --images 64 --repeats 3 --no-recipe --set features.reuse_host_memory=false --out "$OUT/default-malloc" --quiet
