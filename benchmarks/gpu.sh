#!/usr/bin/env bash
# MaskDiffusion on every family at its native resolution, full-size denoisers with random weights, on one CUDA GPU.
#
# Per family (SD 1.5 at 512 px; SDXL, PixArt-Sigma, SD3.5-medium and FLUX.1-dev at 1024 px) it builds the denoiser from
# its published config directly on the GPU in bf16 (no hub, no weights to download), a VAE of the family's published
# architecture, and reuses the tiny built-in model's text encoders and tokenizers (small encoders: the denoisers'
# text-input widths follow them; text lengths are the real ones). It prints MaskDiffusion images/s (one image, four
# class names, the family's default layers) and peak GPU memory (torch.cuda.max_memory_allocated, weights included).
# FLUX.1-dev runs with all 19 + 38 blocks (about 24 GB of bf16 weights); on a GPU with less memory pass
# FLUX_BLOCKS=10,19 (set by itself below 40 GiB; the output then says that FLUX ran with fewer blocks).
# Budget: about 8 minutes on one H100 (model builds included). Without a CUDA device it says so and exits 0.
#
# Usage: benchmarks/gpu.sh            env: PYTHON (default .venv/bin/python), DTYPE (bf16|fp16), REPEATS (5),
#                                          FAMILIES (sd,sdxl,pixart,sd3,flux), FLUX_BLOCKS (D,S)
#        benchmarks/gpu.sh --dry-run  (CPU, tiny widths, 64 px: checks the python part without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if [ "${1:-}" = "--dry-run" ]; then
  exec env OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_backbones.py --dry-run --repeats 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu.sh: no CUDA device here (torch.cuda.is_available() is False): nothing run."
  exit 0
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}: {p.total_memory / 2**30:.0f} GiB')"
gib=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
if [ -z "${FLUX_BLOCKS:-}" ] && [ "$gib" -lt 40 ]; then   # FLUX.1-dev's bf16 weights alone are about 24 GB
  FLUX_BLOCKS=10,19
  echo "gpu.sh: $gib GiB of GPU memory: FLUX runs with 10 double + 19 single blocks (of 19 + 38)"
fi
args=(--dtype "${DTYPE:-bf16}" --repeats "${REPEATS:-5}" --families "${FAMILIES:-sd,sdxl,pixart,sd3,flux}")
if [ -n "${FLUX_BLOCKS:-}" ]; then args+=(--flux-blocks "$FLUX_BLOCKS"); fi
start=$SECONDS
timeout 600 "$PY" benchmarks/gpu_backbones.py "${args[@]}"
echo "gpu.sh: done in $((SECONDS - start)) s"
