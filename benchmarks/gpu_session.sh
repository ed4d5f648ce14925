#!/usr/bin/env bash
# One command for a GPU session (the device machine has torch, triton, transformers, peft; no network):
#   1. the `gpu`-marked tests (kernels against their references on CUDA, CUDA-graph replay, engine exactness),
#   2. the kernel benchmarks: paged attention vs SDPA (flash) at three context tiles, the fused
#      elementwise ops (rms_norm, rotary, silu_mul) vs the eager torch they replace, the seeded draw
#      (race_sample, one launch) vs the per-row generator loop it replaced; and, as a stage of its own
#      (180 cases, about 5 minutes), composed_lora: ours vs vLLM's LoRA kernels (when .peer/ was carried)
#      vs torch vs the floor,
#   3. the offline engine benchmark: Tessera (no modules, 8, k=2, 64 modules) vs transformers generate vs
#      PEFT's mixed-adapter batch on a random Llama-3-8B-shaped model (JSON rewritten after every run, so a
#      run cut short by its time limit still leaves the systems it finished),
#   4. online: the same model behind Tessera's HTTP app, `tessera bench`'s load generator at 0.8x capacity,
#      p99 TPOT with 8 mixed modules vs none (needs the web stack carried as wheels, below).
# Prepare here:  ../shared/tools/vllm_lora_peer/prepare.sh .peer   (pytest is on the GPU machine already)
#                python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels fastapi uvicorn pydantic
#                (3.5 MB: the web stack the GPU machine lacks, for the online stage)
# Run there:     bash benchmarks/gpu_session.sh [STAGE ...]   (with carry [".peer", ".wheels"]); results land in
#                $OUT. Stages: tests, kernels, lora, engine, overhead, online (default: tests kernels). One device
#                call may run 10 minutes, so each stage has its own time limit and a session runs them in four
#                calls: `... tests kernels` (about 9 min), `... lora` (9), `... engine overhead` (9.5), `... online`
#                (about 4). The JSON files are rewritten after every row, so a stage cut short keeps what it
#                finished.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if [ -d .wheels ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl; fi
if [ -d .peer ]; then
  tar -xzf .peer/vllm_py.tgz -C .peer
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .peer/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/.peer:${PYTHONPATH:-}"
else
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
STAGES="${*:-tests kernels}"
for stage in $STAGES; do
  case "$stage" in
    tests)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/server 2>&1 | tail -25 \
        | tee "$OUT/gpu_tests.txt" ;;
    kernels)
      timeout 170 python3 benchmarks/kernels/bench_paged_attention.py --out "$OUT/paged_attention.json" 2>&1 | tail -40
      timeout 90 python3 benchmarks/kernels/bench_fused.py --out "$OUT/fused.json" 2>&1 | tail -30
      timeout 60 python3 benchmarks/kernels/bench_sampling.py --out "$OUT/sampling.json" 2>&1 | tail -10 ;;
    lora)
      timeout 560 python3 benchmarks/kernels/bench_composed_lora.py --out "$OUT/composed_lora.json" 2>&1 | tail -100 ;;
    engine)
      timeout 420 python3 benchmarks/serving/bench_engine.py --out "$OUT/bench_engine.json" 2>&1 | tail -60 ;;
    overhead)
      timeout 150 python3 benchmarks/serving/step_overhead.py --device cuda --dtype bfloat16 \
        --async-scheduling on --out "$OUT/step_overhead.json" 2>&1 | tail -10 ;;
    online)
      timeout 540 python3 benchmarks/serving/bench_online.py --out "$OUT/online.json" 2>&1 | tail -12 ;;
    *)
      echo "unknown stage '$stage' (tests, kernels, lora, engine, overhead, online)" >&2; exit 2 ;;
  esac
done
