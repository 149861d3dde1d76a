#!/usr/bin/env bash
# One-call GPU check (see ../shared/gpu.md): CUDA tests, then the benchmark at real
# model shapes, each under its own time cap; logs, JSON, report (and plots when
# matplotlib is present) under $OUT; a short table printed last. About 7 minutes
# at most. Run from the repository root:
#
#     bash bench/gpu_check.sh                      # run(... timeout_s=480)
#     OPSD_BENCH_COMMIT=<sha> bash bench/gpu_check.sh   # name the commit measured
#
# Optional: carried wheels in .whl/ (liger-kernel, hypothesis, ...) are installed
# into /tmp/site first. Caps (seconds) can be overridden: TEST_CAP, BENCH_CAP,
# EXTRA_CAP.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/opsd-gpu-out}"
mkdir -p "$OUT/report"
PY=python3
TEST_CAP="${TEST_CAP:-120}"
BENCH_CAP="${BENCH_CAP:-170}"
EXTRA_CAP="${EXTRA_CAP:-80}"
T0=$(date +%s)
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        > "$OUT/pip.log" 2>&1 && export PYTHONPATH="/tmp/site:$PWD"
    echo "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi
if [ -z "${OPSD_BENCH_COMMIT:-}" ] && git rev-parse HEAD > /dev/null 2>&1; then
    export OPSD_BENCH_COMMIT="$(git rev-parse HEAD)"
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "liger_kernel", "matplotlib", "hypothesis", "pytest_benchmark"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", type(e).__name__)
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF

echo "== CUDA tests (cap ${TEST_CAP}s; kernel tests first)"
# kernel tests first (the CUDA-only cases included), the rest after, within the cap
timeout -s INT -k 15 "$TEST_CAP" $PY -m pytest tests/test_fused.py tests/test_divergence.py \
    tests/test_fused_linear.py tests/test_errors.py tests/test_memory.py tests -q \
    -m "not slow" -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests exit code: $? (124 = time cap)"
tail -n 15 "$OUT/tests.log"

# Pass 1: every impl and the anchors that need no compilation, Qwen3-4B, bf16,
# forward KL, T=1.1, clip 0.05, frozen and trainable lm_head, 2048 and 8192 tokens.
echo "== bench pass 1 (cap ${BENCH_CAP}s)"
timeout -s INT -k 20 "$BENCH_CAP" $PY -m pytest bench/bench_fused_linear.py \
    bench/bench_divergence.py -q -p no:cacheprovider \
    --preset qwen3-4b --tokens 8192,2048 --bench-dtype bfloat16 \
    --kind forward_kl --temperature 1.1 --clip 0.05 --rounds 10 \
    --impls torch,triton,fused,naive,liger-fljsd,liger-kldiv,liger-jsd \
    --report-dir "$OUT/pass1" > "$OUT/bench-pass1.log" 2>&1
echo "bench pass 1 exit code: $? (124/130 = time cap)"

# Pass 2: the anchors that compile (torch.compile chunked loss, Liger's chunked
# JSD loss), fused_linear fwd+bwd at 8192 tokens only: compilation is slow.
LEFT=$(( 370 - ($(date +%s) - T0) ))
CAP2=$(( LEFT < EXTRA_CAP ? LEFT : EXTRA_CAP ))
if [ "$CAP2" -gt 30 ]; then
    echo "== bench pass 2 (cap ${CAP2}s)"
    timeout -s INT -k 15 "$CAP2" $PY -m pytest bench/bench_fused_linear.py -q \
        -p no:cacheprovider -k "fwdbwd" \
        --preset qwen3-4b --tokens 8192 --bench-dtype bfloat16 \
        --kind forward_kl --temperature 1.1 --clip 0.05 --rounds 5 \
        --impls compiled,liger-fljsd-loss \
        --report-dir "$OUT/pass2" > "$OUT/bench-pass2.log" 2>&1
    echo "bench pass 2 exit code: $?"
else
    echo "== bench pass 2 skipped (${LEFT}s left)"
fi

# Pass 3: impl="fused" tile skipping on LM-like distributions (fraction, error, time).
LEFT=$(( 400 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 40 ]; then
    echo "== bench pass 3: tile skipping (cap ${LEFT}s)"
    timeout -s INT -k 15 "$LEFT" $PY -m pytest bench/bench_skipping.py -q -s \
        -p no:cacheprovider --temperature 1.1 --clip 0.05 \
        --report-dir "$OUT/pass3" > "$OUT/bench-pass3.log" 2>&1
    echo "bench pass 3 exit code: $?"
    grep -B2 -A6 "skip_threshold" "$OUT/bench-pass3.log" | head -30
else
    echo "== bench pass 3 skipped (${LEFT}s left)"
fi

echo "== report"
JSONS=$(ls "$OUT"/pass1/*.json "$OUT"/pass2/*.json 2>/dev/null)
if [ -n "$JSONS" ]; then
    # shellcheck disable=SC2086
    $PY bench/report.py $JSONS --out "$OUT/report" > "$OUT/report.log" 2>&1
    echo "report exit code: $?; files:"
    ls "$OUT/report"
    grep -A12 "^## GPU targets" "$OUT"/report/*.md 2>/dev/null
    echo "elapsed $(( $(date +%s) - T0 ))s"
    echo "== short table"
    $PY bench/report.py "$OUT"/report/*.json --short
else
    echo "no benchmark results (see $OUT/bench-pass1.log)"
    tail -n 30 "$OUT/bench-pass1.log"
    echo "elapsed $(( $(date +%s) - T0 ))s"
fi
