#!/usr/bin/env bash
# One-call GPU check (see ../shared/gpu.md): a curated CUDA test subset, then the
# benchmark passes, each step under its own fixed time budget (`timeout`), so the
# whole script ends within 9 minutes on one H100/H200 from a cold Triton cache
# (each kernel variant compiles in about 1.5 s). Run from anywhere:
#
#     bash bench/gpu_check.sh                         # run(... timeout_s=600)
#     OPSD_BENCH_COMMIT=<sha> bash bench/gpu_check.sh  # name the commit measured
#
# Steps, in priority order (a step that reaches its budget is interrupted; its
# pytest session still writes what it finished, and the steps after it run):
#   setup      nvidia-smi, carried wheels (.whl/*.whl -> /tmp/site), versions
#   tests      bench/gpu_tests.txt through bench/gpu_tests.py (about 50 compilations,
#              the soft-capped cases of issue 23 included;
#              the ahead-of-time compile tests are not in it)
#   qwen3-4b   bench_fused_linear + bench_divergence at the Qwen3-4B shape, bf16,
#              forward KL, T=1.1, clip 0.05, ours + naive + Liger + TRL's kernel
#              (trl-chunked: TRL's ChunkedDivergenceFunction, unclipped; 6 timed cases,
#              2 compilations: its stats and forward-KL backward kernels), 8192 and 2048 tokens
#              (ours: torch, triton, fused, and fused-onepass = impl="fused",
#              deterministic=False, in its fwd+bwd rows only: its forward is fused's.
#              It adds 4 timed cases and 2 compilations, its backward kernel frozen
#              and trainable, offset by the 2 forward ones of a 2-token probe that
#              bench_fused_linear.py no longer runs; counted on CPU by dry launches)
#   precision  bench_precision.py: 16-bit loss/gradient error against float64
#   skipping   bench_skipping.py: impl="fused" tile skipping on LM-like inputs
#   compiled   the anchors that compile (torch.compile chunked loss, Liger chunked loss)
#   report     every pass's JSON merged into one report
# After each bench pass the merged report is rewritten, so what finished is on disk
# (bench/results/ and $OUT/report) even when a later pass, or the whole call, is cut.
#
# Wheels: the GPU image has neither liger-kernel nor TRL. Put pure-Python wheels in .whl/
# (ignored by git; carried to the GPU machine with the run's carry=[".whl"]), e.g.
#     pip download --no-deps -d .whl trl==1.16.0 liger-kernel==0.8.5
# Without accelerate/datasets there, bench/baselines.trl_kernel imports TRL's kernel with
# a stand-in for trl.trainer.utils (its rows say so); without TRL the rows are skipped.
#
# Budgets (seconds) can be lowered through the environment; raising them past the
# 9-minute total is refused. GPU_CHECK_DRY_RUN=1 prints the steps instead of running
# them (tests/test_gpu_check.py uses it, with a fake nvidia-smi).
set -u
cd "$(dirname "$0")/.."

# ---- budgets: seconds per step; KILL_GRACE is added to each (SIGKILL after SIGINT).
# They add up to at most BUDGET_LIMIT; the untimed shell lines (nvidia-smi, cp, ls)
# take well under the remaining UNTIMED_RESERVE, so the script ends within 9 minutes.
WHEELS_CAP=${WHEELS_CAP:-15}
VERSIONS_CAP=${VERSIONS_CAP:-15}
TEST_CAP=${TEST_CAP:-120}
QWEN_CAP=${QWEN_CAP:-130}
PRECISION_CAP=${PRECISION_CAP:-55}
SKIPPING_CAP=${SKIPPING_CAP:-40}
COMPILED_CAP=${COMPILED_CAP:-30}
REPORT_CAP=${REPORT_CAP:-15}
KILL_GRACE=5
MERGES=4  # report merges: one after each of the four bench passes
BUDGET_LIMIT=520
UNTIMED_RESERVE=20
STEPS=(WHEELS_CAP VERSIONS_CAP TEST_CAP QWEN_CAP PRECISION_CAP SKIPPING_CAP COMPILED_CAP)
TOTAL=0
for s in "${STEPS[@]}"; do TOTAL=$(( TOTAL + ${!s} + KILL_GRACE )); done
TOTAL=$(( TOTAL + MERGES * (REPORT_CAP + KILL_GRACE) ))
if [ "$TOTAL" -gt "$BUDGET_LIMIT" ]; then
    echo "budgets add up to ${TOTAL}s > ${BUDGET_LIMIT}s: lower them" >&2
    exit 2
fi

OUT="${OUT:-/tmp/opsd-gpu-out}"
RESULTS_DIR="${RESULTS_DIR:-bench/results}"
mkdir -p "$OUT/report" "$RESULTS_DIR"
PY=${PY:-python3}
DRY=${GPU_CHECK_DRY_RUN:-}
T0=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "budgets (s): wheels $WHEELS_CAP, versions $VERSIONS_CAP, tests $TEST_CAP, qwen3-4b" \
     "$QWEN_CAP, precision $PRECISION_CAP, skipping $SKIPPING_CAP, compiled $COMPILED_CAP," \
     "report ${MERGES}x$REPORT_CAP, +${KILL_GRACE}s grace each: at most ${TOTAL}s" \
     "(limit ${BUDGET_LIMIT}s + ${UNTIMED_RESERVE}s untimed < 9 min)"

# step NAME CAP LOG CMD...: CMD under its budget, output to LOG; prints the exit code
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    echo "== $name (budget ${cap}s)"
    if [ -n "$DRY" ]; then
        echo "DRY-RUN: timeout -s INT -k $KILL_GRACE $cap $* > $log"
        return 0
    fi
    local t=$(date +%s) rc
    timeout -s INT -k "$KILL_GRACE" "$cap" "$@" > "$log" 2>&1
    rc=$?
    echo "$name: exit code $rc$([ $rc -eq 124 ] && echo ' (budget reached)')" \
         "after $(( $(date +%s) - t ))s; elapsed $(( $(date +%s) - T0 ))s"
    return $rc
}

# merge every pass's JSON into one report (plus its short table, report.log), in
# $OUT/report and $RESULTS_DIR
merge_report() {
    local jsons
    jsons=$(ls "$OUT"/pass-*/*.json 2>/dev/null)
    [ -n "$jsons" ] || [ -n "$DRY" ] || { echo "(no pass has results yet)"; return 0; }
    # shellcheck disable=SC2086
    step "report" "$REPORT_CAP" "$OUT/report.log" $PY bench/report.py $jsons \
        --out "$OUT/report" --with-short
    [ -n "$DRY" ] || cp "$OUT"/report/*.md "$OUT"/report/*.json "$RESULTS_DIR"/ 2>/dev/null
    [ -n "$DRY" ] || cp "$OUT"/report/*.png "$RESULTS_DIR"/ 2>/dev/null
    return 0
}

BENCH=(-q -p no:cacheprovider)

# ---- setup
echo "== device"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
    step "wheels" "$WHEELS_CAP" "$OUT/pip.log" $PY -m pip install -q --no-index --no-deps \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -z "${OPSD_BENCH_COMMIT:-}" ] && git rev-parse HEAD > /dev/null 2>&1; then
    export OPSD_BENCH_COMMIT="$(git rev-parse HEAD)"
fi
step "versions" "$VERSIONS_CAP" "$OUT/versions.txt" $PY -c '
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "liger-kernel", "trl", "matplotlib", "hypothesis", "pytest-benchmark"):
    try:
        print(m, md.version(m))
    except md.PackageNotFoundError:
        print(m, "missing")
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
'
[ -n "$DRY" ] || cat "$OUT/versions.txt"

# ---- CUDA tests: the curated subset only
step "tests" "$TEST_CAP" "$OUT/tests.log" $PY bench/gpu_tests.py -q -rfEs
[ -n "$DRY" ] || tail -n 25 "$OUT/tests.log"

# ---- bench pass: Qwen3-4B shape, every impl and the anchors that need no compilation
step "bench qwen3-4b" "$QWEN_CAP" "$OUT/bench-qwen3-4b.log" $PY -m pytest \
    bench/bench_fused_linear.py bench/bench_divergence.py "${BENCH[@]}" \
    --preset qwen3-4b --tokens 8192,2048 --bench-dtype bfloat16 \
    --kind forward_kl --temperature 1.1 --clip 0.05 --rounds 10 \
    --impls torch,triton,fused,fused-onepass,naive,liger-fljsd,trl-chunked,liger-kldiv,liger-jsd \
    --report-dir "$OUT/pass-qwen3-4b"
merge_report

# ---- bench pass: precision (16-bit against float64, N=512, H=512, V=32768)
step "bench precision" "$PRECISION_CAP" "$OUT/bench-precision.log" $PY -m pytest \
    bench/bench_precision.py "${BENCH[@]}" --report-dir "$OUT/pass-precision"
merge_report

# ---- bench pass: impl="fused" tile skipping (fraction, error, time)
step "bench skipping" "$SKIPPING_CAP" "$OUT/bench-skipping.log" $PY -m pytest \
    bench/bench_skipping.py "${BENCH[@]}" -s --temperature 1.1 --clip 0.05 \
    --report-dir "$OUT/pass-skipping"
[ -n "$DRY" ] || grep -B2 -A6 "skip_threshold" "$OUT/bench-skipping.log" | head -30
merge_report

# ---- bench pass: the anchors that compile (slow to compile: last)
step "bench compiled" "$COMPILED_CAP" "$OUT/bench-compiled.log" $PY -m pytest \
    bench/bench_fused_linear.py "${BENCH[@]}" -k "fwdbwd" \
    --preset qwen3-4b --tokens 8192 --bench-dtype bfloat16 \
    --kind forward_kl --temperature 1.1 --clip 0.05 --rounds 5 \
    --impls compiled,liger-fljsd-loss --report-dir "$OUT/pass-compiled"
merge_report

echo "== files: $OUT/report and $RESULTS_DIR"
[ -n "$DRY" ] || ls "$OUT/report"
echo "elapsed $(( $(date +%s) - T0 ))s"
echo "== short table"
if [ -z "$DRY" ] && [ -s "$OUT/report.log" ]; then
    cat "$OUT/report.log"
else
    echo "(no results)"
fi
