#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (the `device` tool runs it from the
# repository root with its image's python3, which has JAX with CUDA, Triton, Flax and Optax):
#
#   bash benchmarks/device_check.sh   # 6.6 min on an H100 before the profile and launch steps (stop 46)
#
# 1. benchmarks/profile_attention.py with the Triton kernels at 16K (bfloat16, B=1, H=32, D=128,
#    m=16, gamma=0.1, global selection): importance, selection, layout, gather, prefix walk, band
#    walk and the backwards timed apart, beside cuDNN's dense attention, with each walk's rate
#    (exact FLOPs / time) against cuDNN's: where the kernels' time goes (stop 46 measured them at
#    a quarter of cuDNN's rate over the whole call);
# 2. the Triton walk's tiles and launch side by side at 16K, forward and forward+backward: the
#    128x64 default (8 warps, 2 stages) against variants that compiled for an H100 without a
#    spill (`aot_compile.py --blocks`, benchmarks/RESULTS.md "Triton's launch"; 128x64s3 only
#    forward: its dK'/dV' overflow shared memory), into $out/launch;
# 3. the kernel tests and the DGA conformance suite's pallas_gpu cases, the Triton kernels
#    compiled (tests/conftest.py turns interpret mode off and float32 matmuls to IEEE precision on
#    a GPU; 193 s at stop 46); the "xla" cases run on every CPU CI;
# 4. benchmarks/attention.py at the Pallas issue's shapes (bfloat16, B=1, H=32, D=128, m=16,
#    gamma=0.1): DGA pallas_gpu vs cuDNN dense vs DGA xla, forward and forward+backward;
# 5. benchmarks/train_step.py: two of LLaMA2-7B's layers (and its embedding and head) at 16K in
#    bfloat16, DGA pallas_gpu vs DGA xla vs cuDNN dense: what decides the model's attention_impl
#    on GPUs;
# 6. benchmarks/decode.py with LLaMA2-7B-shaped random weights in bfloat16, at 16K and 32K;
# 7. benchmarks/importance.py: global importance by XLA's loops vs the Triton kernels, three
#    kernel tiles, L = 4K..32K, scores checked against XLA's.
# What no session has measured comes first, then the tests; steps 4-7 re-measure stop 46's
# tables and are the ones the deadline cuts when time runs short.
# Every step ends by a shared deadline (565 s; DEVICE_CHECK_SECONDS), interrupted if need be,
# so that what ran is packed before the device tool's 590 s limit.
# Tables, JSON, plots and each step's log go to benchmarks/results; under the device tool (OUT
# set) to a scratch folder packed into $OUT/device_check.tgz after every step (the tool brings
# back at most 8 files, and a run cut by its time limit still returns the steps done). A failing
# step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then out=$(mktemp -d); else out=benchmarks/results; fi
mkdir -p "$out"
export PYTHONPATH=$PWD
status=0

deadline=$((SECONDS + ${DEVICE_CHECK_SECONDS:-565}))  # the device tool stops a call at 590 s

pack() {  # the archive is replaced whole: a call stopped mid-pack keeps the previous one
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/device_check.partial" -C "$out" . && mv -f "$OUT/device_check.partial" \
        "$OUT/device_check.tgz"
}

run() {  # run NAME CMD...: tee the output to $out/NAME.log within the deadline, pack
    local name=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -lt 30 ]; then
        echo "== $name skipped: out of time" | tee "$out/$name.log"
        status=1
        return
    fi
    echo "== $name (at most $left s)"
    # SIGINT first: pytest then prints its summary, a benchmark what it measured so far.
    timeout -s INT -k 10 "$left" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc; 124: out of time)"; status=1; }
    pack
}

run device python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, \
optax.__version__, jax.devices())"
run profile python3 benchmarks/profile_attention.py --implementation pallas_gpu --dense cudnn \
    --dtype bfloat16 --heads 32 --kv-heads 32 --lengths 16384 --repeats 5 --out "$out"
run launch python3 benchmarks/attention.py --dtype bfloat16 --heads 32 --kv-heads 32 \
    --lengths 16384 --impls dga_pallas_gpu,dga_pallas_gpu@128x64s3,dga_pallas_gpu@128x32,\
dga_pallas_gpu@128x32s3,dga_pallas_gpu@64x64s3,dga_pallas_gpu@64x64s4 --out "$out/launch"
run tests python3 -m pytest -q -p no:cacheprovider tests/ops/test_dga_conformance.py \
    tests/ops/test_pallas.py -k "pallas_gpu or gpu_kernels"
run attention python3 benchmarks/attention.py --dtype bfloat16 --heads 32 --kv-heads 32 \
    --lengths 4096,8192,16384,32768 --impls dga_pallas_gpu,dense_cudnn,dga_xla --out "$out"
run train_step python3 benchmarks/train_step.py --preset llama2_7b --layers 2 --dtype bfloat16 \
    --lengths 16384 --variants dga_pallas_gpu,dga_xla,dense_cudnn --repeats 3 --out "$out"
run decode python3 benchmarks/decode.py --preset llama2_7b --dtype bfloat16 --steps 32 \
    --lengths 16384,32768 --out "$out"
run importance python3 benchmarks/importance.py --tiles 64x64,128x64,128x128 --out "$out"
exit $status
