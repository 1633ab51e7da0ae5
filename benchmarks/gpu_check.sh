#!/usr/bin/env bash
# The CUDA checks, in one script sized for < 8 minutes on one H200 (run: make gpu-check, or on the
# device machine after `make .venv/.cap-installed`). It prints:
#   1. kernels: the Triton CE tests on CUDA ("kernel tests: all passed", or the node id of every
#      failed test), and bench_loss (fused vs unfused, peak memory and time)
#   1b. QLoRA and a 4-bit control adapter trained by cap-train on CUDA with evals between steps,
#      against the reference trainer (tests/test_train_matrix.py::test_4bit_training_on_cuda...)
#   2. benchmarks/bench_gpu.py on a random-init Llama-3.1-8B-shaped model (bf16): cap-train and the
#      peer (transformers + PEFT, SDPA, AdamW) for LoRA, QLoRA (nf4) and control adapters, with and
#      without recompute, at seq 4096 and 16384: tokens/s, peak memory, MFU, --plan's peak, and one
#      profiled step per side by category; the table, and $OUT/bench_gpu.json when OUT is set.
#      Settings past BENCH_BUDGET_S (default 300 s) are listed as skipped.
# A failing part is reported in a line (or its last lines) and the next part still runs; the exit
# status is non-zero if any part failed. PARTS=kernels,equivalence,bench (the default) picks the
# parts. The model, data, logs and outputs (~16 GB) go to $WORK: a temporary folder, removed on exit,
# interrupt or termination, unless the caller gave WORK=...
set -uo pipefail  # no -e: every part runs, and a failing one is added to $failed
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
if [[ -z ${WORK:-} ]]; then
    WORK=$(mktemp -d)
    trap 'rm -rf -- "$WORK"' EXIT
fi
trap 'exit 130' INT
trap 'exit 143' TERM
failed=()
PARTS=${PARTS:-kernels,equivalence,bench}  # e.g. PARTS=bench for the benchmark alone
part() { [[ ",$PARTS," == *",$1,"* ]]; }
echo "== GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))' 2>&1 | tail -1)"

if part kernels; then
    echo "== 1. kernels on CUDA"
    # -rfE: a short summary line per failed or erroring test, "FAILED <node id> - <message>".
    $PY -m pytest -q -rfE -p no:cacheprovider tests/test_kernels.py tests/test_step_overhead.py >"$WORK/kernels.log" 2>&1
    rc=$?
    ids=$(awk '/short test summary info/ {s = 1; next} s && ($1 == "FAILED" || $1 == "ERROR") {print $2}' \
        "$WORK/kernels.log")
    totals=$(tail -1 "$WORK/kernels.log" | tr -d '=' | xargs)  # e.g. "12 passed, 2 skipped in 3.4s"
    if ((rc == 0)); then
        echo "kernel tests: all passed ($totals)"
    elif [[ -n $ids ]]; then
        failed+=("kernel tests")
        echo "kernel tests: $(wc -l <<<"$ids") failed: $(xargs <<<"$ids")  ($totals)"
    else  # no per-test summary: a collection, usage or internal error
        failed+=("kernel tests")
        echo "kernel tests: pytest exited $rc; last lines:"
        tail -5 "$WORK/kernels.log"
    fi
    if $PY benchmarks/bench_loss.py --seqs 2048,8192,32768 --vocabs 32000,128256 >"$WORK/bench_loss.log" 2>&1; then
        tail -20 "$WORK/bench_loss.log"
    else
        rc=$?
        failed+=("bench_loss")
        echo "bench_loss: FAILED (exit $rc): $(grep -v '^[[:space:]]*$' "$WORK/bench_loss.log" | tail -1)"
    fi
fi

if part equivalence; then
    echo "== 1b. 4-bit training on CUDA against the reference trainer (evals between steps)"
    # QLoRA on q_proj/v_proj and a 4-bit control adapter, with and without evals: both must train what
    # tests/reference_trainer.py trains (bf16 tolerance); an eval must change nothing.
    DS_ACCELERATOR=cuda $PY -m pytest -q -rfE -p no:cacheprovider tests/test_train_matrix.py \
        -k test_4bit_training_on_cuda >"$WORK/equivalence.log" 2>&1
    rc=$?
    if ((rc == 0)) && grep -q " passed" "$WORK/equivalence.log" && ! grep -q "skipped" "$WORK/equivalence.log"; then
        echo "4-bit equivalence on CUDA: passed ($(tail -1 "$WORK/equivalence.log" | tr -d '=' | xargs))"
    else
        failed+=("4-bit equivalence on CUDA")
        echo "4-bit equivalence on CUDA: FAILED (pytest exit $rc); last lines:"
        grep -E "^(FAILED|ERROR|E )" "$WORK/equivalence.log" | head -8
        tail -3 "$WORK/equivalence.log"
    fi
fi

if part bench; then
    echo "== 2. cap-train against transformers + PEFT on the 8B shape (benchmarks/bench_gpu.py)"
    # Every setting of issue 22's table, most important first, until BENCH_BUDGET_S: tokens/s, peak
    # memory, cap's MFU and --plan's peak, and one profiled step per side split by category. The table
    # goes to stdout, the whole of it as JSON to $OUT/bench_gpu.json (or $WORK's, removed with it).
    json_out=${OUT:-$WORK}/bench_gpu.json
    if $PY -m benchmarks.bench_gpu --shape 8b --work "$WORK/bench" --budget-s "${BENCH_BUDGET_S:-300}" \
        --json "$json_out" >"$WORK/bench_gpu.log" 2>&1; then
        grep -v "^\[" "$WORK/bench_gpu.log" | grep -v "Warning\|warn(" | tail -45
    else
        rc=$?
        failed+=("bench_gpu")
        echo "bench_gpu: FAILED (exit $rc); last lines:"
        tail -15 "$WORK/bench_gpu.log"
    fi
fi

if ((${#failed[@]})); then
    printf -v list '%s, ' "${failed[@]}"
    echo "== FAILED: ${list%, }"
    exit 1
fi
echo "== all checks passed"
