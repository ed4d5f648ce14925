#!/usr/bin/env bash
# One command for a GPU session (the device machine has torch, triton, transformers, peft; no network):
#   1. the `gpu`-marked tests (kernels against their references on CUDA, CUDA-graph replay, engine exactness),
#   2. the kernel benchmarks: paged attention (decode, prefill, speculative drafts) vs SDPA (flash) at three
#      context tiles, the fused elementwise ops (rms_norm, rotary, silu_mul) vs the eager torch they replace,
#      the seeded draw (race_sample, one launch) vs the per-row generator loop it replaced, fused_moe (Qwen3-30B-A3B
#      and Mixtral-8x7B experts) vs transformers' expert loop and grouped_mm path; and, as a stage of its own
#      (180 cases, about 5 minutes), composed_lora: ours vs vLLM's LoRA kernels (when .peer/ was carried)
#      vs torch vs the floor,
#   3. the offline engine benchmark: Tessera (no modules, 8, k=2, 64 modules) vs transformers generate vs
#      PEFT's mixed-adapter batch on a random Llama-3-8B-shaped model (JSON rewritten after every run, so a
#      run cut short by its time limit still leaves the systems it finished),
#   4. online: the same model behind Tessera's HTTP app, `tessera bench`'s load generator at 0.8x capacity,
#      p99 TPOT with 8 mixed modules vs none (needs the web stack carried as wheels, below); `online-process` is
#      the same with the engine in a process of its own (--engine-process), to compare with `online`, and
#      `online-interval` the same again with chunks of 4 tokens (--stream-interval 4).
# Prepare here:  ../shared/tools/vllm_lora_peer/prepare.sh .peer   (pytest is on the GPU machine already)
#                python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels fastapi uvicorn uvloop httptools pydantic \
#                  xgrammar apache-tvm-ffi
#                (the web stack the GPU machine lacks, for the online stage, and xgrammar for the structured-output
#                tests of stage `tests`, which skip without it)
# Run there:     bash benchmarks/gpu_session.sh [STAGE ...]   (with carry [".peer", ".wheels"]); results land in
#                $OUT. Stages: first, tests, kernels, lora, engine, engine-moe, overhead, online, online-process,
#                online-interval, prefix, slots, spec, train
#                (default: first).
# Budget:        a task that is lent a GPU now gets 15 minutes of device time in all, the machine's start
#                (a minute or more) included, so a session has one full call and a short rerun. `first` is
#                that call (about 9 minutes, every step under its own limit): no Triton code of this
#                project has run on a GPU yet, so correctness comes first (the kernel tests on CUDA), then
#                each issue's headline number on a subset of its grid: composed_lora at rank 16, pools of
#                8 and 64, decode 64/256 and prefill 2048 tokens, k 1 and 2 (36 of the 180 cases, with the
#                vLLM peer when .peer/ was carried); paged attention decode, prefill and drafts at the default
#                tiles; the engine on B=32 / prompt 256 / 64 new tokens, Tessera (a), (b), (c) and
#                transformers generate. The other stages are the whole grids, for a session with more time.
#                Every JSON file is rewritten after each row, so a step cut short keeps what it finished.
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
STAGES="${*:-first}"
for stage in $STAGES; do
  case "$stage" in
    first)
      timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 | tail -25 \
        | tee "$OUT/gpu_tests.txt"
      timeout 130 python3 benchmarks/kernels/bench_composed_lora.py --ranks 16 --pools 8 64 --tokens 64 256 2048 \
        --k 1 2 --out "$OUT/composed_lora.json" 2>&1 | tail -45
      timeout 75 python3 benchmarks/kernels/bench_paged_attention.py --block-sizes 16 --tiles 32 64 \
        --out "$OUT/paged_attention.json" 2>&1 | tail -20
      timeout 130 python3 benchmarks/serving/bench_engine.py --workloads b32_p256_n64 \
        --systems tessera_a tessera_b tessera_c hf_generate --out "$OUT/bench_engine.json" 2>&1 | tail -25 ;;
    tests)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/server tests/training 2>&1 \
        | tail -25 \
        | tee "$OUT/gpu_tests.txt" ;;
    kernels)
      timeout 220 python3 benchmarks/kernels/bench_paged_attention.py --out "$OUT/paged_attention.json" 2>&1 | tail -40
      timeout 90 python3 benchmarks/kernels/bench_paged_attention.py --kv-cache-dtype fp8 --block-sizes 16 --tiles 32 64 \
        --out "$OUT/paged_attention_fp8.json" 2>&1 | tail -16
      timeout 90 python3 benchmarks/kernels/bench_fused.py --out "$OUT/fused.json" 2>&1 | tail -30
      timeout 60 python3 benchmarks/kernels/bench_sampling.py --out "$OUT/sampling.json" 2>&1 | tail -10
      timeout 120 python3 benchmarks/kernels/bench_fused_moe.py --out "$OUT/fused_moe.json" 2>&1 | tail -12 ;;
    lora)
      timeout 560 python3 benchmarks/kernels/bench_composed_lora.py --out "$OUT/composed_lora.json" 2>&1 | tail -100 ;;
    engine)
      timeout 420 python3 benchmarks/serving/bench_engine.py --out "$OUT/bench_engine.json" 2>&1 | tail -60 ;;
    engine-moe)
      # a Qwen3-30B-A3B-shaped backbone (12 of its 48 layers): Tessera (a)-(d) vs transformers generate vs PEFT
      timeout 420 python3 benchmarks/serving/bench_engine.py --config qwen3-30b-a3b-12l --workloads b32_p256_n64 \
        --out "$OUT/bench_engine_moe.json" 2>&1 | tail -30 ;;
    overhead)
      timeout 150 python3 benchmarks/serving/step_overhead.py --device cuda --dtype bfloat16 \
        --async-scheduling on --out "$OUT/step_overhead.json" 2>&1 | tail -10 ;;
    online)
      timeout 540 python3 benchmarks/serving/bench_online.py --out "$OUT/online.json" 2>&1 | tail -12 ;;
    online-process)
      timeout 540 python3 benchmarks/serving/bench_online.py --engine-process --out "$OUT/online_process.json" \
        2>&1 | tail -12 ;;
    online-interval)
      timeout 540 python3 benchmarks/serving/bench_online.py --engine-process --stream-interval 4 \
        --out "$OUT/online_interval.json" 2>&1 | tail -12 ;;
    prefix)
      timeout 240 python3 benchmarks/serving/bench_prefix.py --out "$OUT/bench_prefix.json" 2>&1 | tail -8 ;;
    slots)
      timeout 240 python3 benchmarks/serving/bench_module_slots.py --out "$OUT/bench_module_slots.json" 2>&1 | tail -6 ;;
    spec)
      timeout 300 python3 benchmarks/serving/bench_spec.py --batch-sizes 1 8 32 --out "$OUT/bench_spec.json" \
        2>&1 | tail -18
      # structured outputs: forced-token drafts (each step read back) vs plain (overlapped, sampling deferred)
      timeout 200 python3 benchmarks/serving/bench_spec.py --workload form --batch-sizes 1 8 32 \
        --out "$OUT/bench_spec_form.json" 2>&1 | tail -14 ;;
    train)
      # tessera train's memory options on a 1B-shaped random Llama, bf16: peak allocated memory and step time
      timeout 240 python3 benchmarks/training/step_memory.py --device cuda --hidden 2048 --layers 16 --tokens 512 \
        --batch 8 --out "$OUT/step_memory.json" 2>&1 | tail -7 ;;
    *)
      echo "unknown stage '$stage' (first, tests, kernels, lora, engine, engine-moe, overhead, online, online-process," \
        "online-interval, prefix, slots, spec, train)" >&2
      exit 2 ;;
  esac
done
