#!/usr/bin/env bash
# One device call: the GPU tests, then the extract benchmarks (SDXL, Llama-3-8B, Flux, SD3) until the
# deadline; everything is logged under $OUT. Run from a folder holding loratool/, bench/, tests/,
# fixtures/ and keyshapes/ (the *_full.json tables), with wheels (if any) in .whl/; KEYSHAPES=DIR and
# WHEELS=DIR point elsewhere (e.g. a carried .dev/ folder); METHODS and LAYOUTS (space-separated) narrow
# the run (LLM layouts drop kohya's estimate themselves). TESTS: the GPU tests to run first (default
# tests/gpu; "none" skips them; test_train_cuda.py needs diffusers, carried as wheels: diffusers,
# importlib_metadata, lazy-importer). EXTRA: more bench/extract.py arguments, e.g. other revisions side by
# side: EXTRA="--repeat 3 --tree main=.dev/m --tree-methods loratool" (worktrees without fixtures/, bench/,
# docs/ and tests/ keep the carried tree small).
#   [KEYSHAPES=DIR] [WHEELS=DIR] [METHODS=floor,whole,loratool,command,kohya] [LAYOUTS="sdxl flux"] \
#     [TESTS=none] [EXTRA="..."] bash bench/device/extract_run.sh SECONDS
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
limit=${1:-450}
keyshapes=${KEYSHAPES:-keyshapes} wheels=${WHEELS:-.whl}
methods=${METHODS:-floor,loratool,command,kohya} layouts=" ${LAYOUTS:-sdxl llama3-8b flux sd3} "
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
if ls $wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" | tee -a $OUT/gpu.txt
if [[ ${TESTS:-tests/gpu} != none ]]; then
  timeout $(( $(left) < 180 ? $(left) : 180 )) python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/gpu} 2>&1 \
    | tail -25 | tee $OUT/gpu_tests.log
fi
work=/root/extract-bench; mkdir -p $work
run() {  # layout rank targets stride min_seconds_left (the pair is written inside it: Flux 44 GiB took 52 s)
  [[ $layouts == *" $1 "* ]] || return
  if (( $(left) < $5 )); then echo "skipped $1: $(left) s left" | tee -a $OUT/skipped.txt; return; fi
  timeout $(( $(left) - 5 )) python3 bench/extract.py --layout $1 --rank $2 --targets $3 --stride $4 --device cuda \
    --methods $methods --workdir $work --keyshapes $keyshapes --json-out $OUT/$1.json ${EXTRA:-} \
    2>&1 | grep -v '^[a-z0-9@]*: {' | tail -30 | tee $OUT/$1.log
  rm -rf $work/*
}
run sdxl 64 attn+conv 8 150
run llama3-8b 32 attn 16 180
run flux 32 transformer 8 200
run sd3 32 transformer 8 150
df -h /root | tail -1
echo "total $(( $(date +%s) - start )) s"
