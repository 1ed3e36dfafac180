#!/usr/bin/env bash
# A better autoencoder and DiT for the shipped `faces` model on one GPU, in about 8 minutes, exported into
# $OUT/faces-gpu/ with every file under 16 MiB (a lent device machine returns no larger file).
#
#     bash scripts/gpu_train.sh --pack DATA      # here, once: .gpu/ (git-ignored) with the wheels the GPU
#                                                # machine lacks and DATA's train faces (facegen data align's
#                                                # folder) as one WebP tar, 6,000 faces by default (FACES=)
#     bash scripts/gpu_train.sh                  # there (device run, carry [".gpu"]): trains, exports, measures
#     SMOKE=1 bash scripts/gpu_train.sh          # the same steps, tiny and on the CPU: checks the script
#
# Steps (VAE=deepen, the default): the whole autoencoder of facegen_cli/faces/vae, deepened to two resnets a
# block (vae.deepen_vae: it starts as exactly the shipped one, 14.0M parameters instead of 10.9M) and trained
# at 128 px, batch 64, with the adversarial and feature-matching losses, encoder included: per-face latent
# optimisation showed that the shipped decoder cannot draw the person from any latent and that the encoder
# loses some of it too (docs/faces-vae/identity-floor.md). The packed faces are encoded with the new encoder
# and the DiT is fine-tuned from the shipped one on them (`--other-vae`: its weights carry over into the new
# latent space). VAE=decoder instead fine-tunes the decoder alone, keeping the latents, and the DiT on the
# shipped latents. Both parts are exported in float16 (the shipped label prior and classifier are put back
# here), and the autoencoder's PSNR is measured before and after on 256 held-out (valid) faces.
# Back here: `cat FILES/faces-gpu/vae/*.part-* > vae/diffusion_pytorch_model.safetensors` (the VAE, 28 MB,
# comes back in two parts), copy facegen_cli/faces/classifier and labels.json in, then measure it with
# `facegen vae eval --identity`, `facegen eval --data ... --identity` and `facegen eval edits` before shipping.
# The folder comes back without a student: the shipped one samples in 4 steps with the student distilled from
# its DiT, so distil the new DiT here before shipping it (`facegen distill`, README; the shipped student's 6,000
# steps took about 70 minutes on 2 cores).
#
# The device tool carries at most 64 MiB of the working tree; this repository is about 100 MB (docs/ 41 MB,
# facegen_cli/demo 20 MB). Move those two folders out of the checkout for the run and back afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
FACES=${FACES:-6000}
VAE=${VAE:-deepen}

if [ "${1:-}" = "--pack" ]; then
    data=${2:?give the aligned data folder (facegen data align)}
    mkdir -p .gpu/wheels
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .gpu/wheels diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2
    python3 - "$data" "$FACES" <<'EOF'
import io, sys, tarfile
from facegen_cli.data import read_dataset
from PIL import Image

data, count = sys.argv[1], int(sys.argv[2])


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


with tarfile.open(".gpu/faces.tar", "w") as tar:
    for folder, split, n in (("faces", "train", count), ("valid", "valid", 256)):  # CSV layout: no splits
        faces, rows = read_dataset(data, split), []
        for path, labels in list(zip(faces.paths, faces.labels.tolist()))[:n]:
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").save(buffer, "WEBP", quality=80)
            add(tar, f"{folder}/{path.stem}.webp", buffer.getvalue())
            rows.append(",".join([f"{path.stem}.webp", *map(str, labels)]))
        add(tar, f"{folder}/attributes.csv",
            "\n".join([",".join(["filename", *faces.attributes]), *rows]).encode() + b"\n")
EOF
    du -sh .gpu
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
if ! python3 -c "import diffusers" 2> /dev/null; then  # the GPU machine's image has torch but no diffusers
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2> /dev/null || export PYTHONPATH=${PYTHONPATH:-}:$PWD
tar -xf .gpu/faces.tar -C "$WORK"
export PYTHONUNBUFFERED=1

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu; VAE_STEPS=4; VAE_BATCH=4; DIT_STEPS=4; DIT_BATCH=8; PRECISION=fp32
else  # the encoder's backward pass and the deeper blocks cost about a third more a step than the decoder alone
    DEVICE=cuda; VAE_STEPS=${VAE_STEPS:-5000}; VAE_BATCH=64; DIT_STEPS=${DIT_STEPS:-8000}; DIT_BATCH=256
    PRECISION=bf16
fi
log() { echo "[$(date -u +%T)] $*" >&2; }

if [ "$VAE" = deepen ]; then
    vae_flags="--layers-per-block 2"; dit_flags="--other-vae"; latents_vae="$WORK/vae-$VAE/vae"
elif [ "$VAE" = decoder ]; then
    vae_flags="--decoder-only"; dit_flags=""; latents_vae=facegen_cli/faces/vae
else
    echo "VAE must be deepen or decoder, not $VAE" >&2; exit 2
fi
log "autoencoder ($VAE): $VAE_STEPS steps of $VAE_BATCH faces"
python3 -m facegen_cli.cli vae train "$WORK/faces" --out "$WORK/vae-$VAE" --init facegen_cli/faces/vae $vae_flags \
    --crop-size 128 --batch-size $VAE_BATCH --learning-rate 1e-4 --disc-start 0 --disc-warmup $((VAE_STEPS / 15)) \
    --disc-weight 0.3 --feature-weight 1.0 --steps $VAE_STEPS --precision $PRECISION \
    --checkpoint-every $VAE_STEPS > /dev/null
log "latents of $latents_vae"
python3 -m facegen_cli.cli encode "$WORK/faces" --vae "$latents_vae" --out "$WORK/latents" --device $DEVICE \
    --batch-size 256 > /dev/null
log "DiT: $DIT_STEPS steps of $DIT_BATCH"
python3 -m facegen_cli.cli train --data "$WORK/latents" --preset faces-finetune --init-from facegen_cli/faces \
    $dit_flags --steps $DIT_STEPS --batch-size $DIT_BATCH --precision $PRECISION --out "$WORK/dit" > /dev/null
# No classifier and no label prior come back (at most 8 files do): the shipped ones go with it here.
python3 -m facegen_cli.cli export "$WORK/dit/model" --vae "$WORK/vae-$VAE/vae" \
    --out "$WORK/faces-gpu" --half > /dev/null
rm "$WORK/faces-gpu/labels.json"

{
    echo "# scripts/gpu_train.sh, $(date -u +%F), $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')"
    for vae in facegen_cli/faces/vae "$WORK/faces-gpu/vae"; do
        echo "$vae: PSNR $(python3 -m facegen_cli.cli vae eval "$WORK/valid" --vae "$vae" --split all 2> /dev/null) dB on 256 held-out faces"
    done
} | tee "$OUT/gpu-train.md"
mkdir -p "$OUT/faces-gpu"
(cd "$WORK/faces-gpu" && tar -cf - --exclude='vae/diffusion_pytorch_model.safetensors' .) | tar -xf - -C "$OUT/faces-gpu"
split -b 15M "$WORK/faces-gpu/vae/diffusion_pytorch_model.safetensors" "$OUT/faces-gpu/vae/diffusion_pytorch_model.safetensors.part-"
log "done: $OUT/faces-gpu"
