#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the CUDA correctness checks, then the suite.
#
#   benchmarks/gpu_check.sh [OUTDIR] [STAGE...]
#
# STAGEs (default: all, in this order):
#   env       versions, the GPU
#   kernels   tests/test_triton.py's kernel checks on CUDA tensors
#   path      tests/test_triton_path.py's pass-level checks on CUDA
#   tests     tests/test_cuda.py (eager; compiled ones with the 'tests-compiled' stage)
#   tests-compiled  tests/test_cuda.py's torch.compile checks (inductor compiles: minutes)
#   tests-all tests/test_cuda.py, all of it
#   eager     the suite, eager mode: every layer case and ResNet-50
#   profile   benchmarks/profile_layer.py: CPU queueing time against GPU kernel time per step
#   probe     benchmarks/probe_overhead.py: the CPU time of the Triton path's pieces, with Triton's
#             dispatch and with direct launches, and a cProfile of its layer steps
#   compiled-model  the suite under torch.compile: ResNet-50 with plain BatchNorm and fxghost
#             (compiling it with the chunked reference takes minutes, so it is left out)
#   compiled-kernels  fxghost's ResNet-50 again with --backend triton: the Triton kernels as
#             custom ops under torch.compile (own JSON)
#   compiled-layer  the suite under torch.compile for the main layer cases (plain and fxghost)
#   compiled  compiled-model, compiled-kernels, then compiled-layer
# Logs go to OUTDIR/gpu_check.log, the suite's raw numbers to OUTDIR/*.json; a summary (test
# results, the suite's tables) is printed at the end. Runs from the source tree: no install needed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
shift || true
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env kernels path tests-all eager profile compiled)
mkdir -p "$out"
log=$out/gpu_check.log
summary=$out/summary.txt
: >"$summary"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# pytest-xdist, where installed, spreads Triton's and inductor's compiles over processes.
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 4)
pytest_args=(-q -p no:cacheprovider -o addopts= -o python_functions=check_*)

run() {  # run NAME LIMIT_S CMD...: output to the log; status and the tail to the summary
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee -a "$log" >&2
    timeout "$limit" "$@" >>"$log.$name" 2>&1
    rc=$?
    cat "$log.$name" >>"$log"
    {
        echo "== $name: rc=$rc in $((SECONDS - t0)) s"
        if [[ $name == bench-profile ]]; then
            tail -n 40 "$log.$name"
        elif [[ $name == probe ]]; then
            grep -E "^## |queue" "$log.$name"
        elif [[ $name == bench* ]]; then
            sed -n '/^## /,$p' "$log.$name"
        else
            grep -E "passed|failed|error|Error|^FAILED|^ERROR" "$log.$name" | tail -n 25
        fi
    } >>"$summary"
    rm -f "$log.$name"
    echo "   rc=$rc ($((SECONDS - t0)) s)" >&2
}

compiled_layer() {
    run bench-compiled-layer 600 "$py" benchmarks/run.py --device cuda --modes compiled \
        --sections layer --impls plain,fxghost \
        --cases "(256,256,56,56) bf16" "(16384,512)" --out "$out/compiled-layer.json"
}

for stage in "${stages[@]}"; do
    case $stage in
    env)
        run env 60 bash -c "nvidia-smi -L; $py -c 'import sys, torch, triton, torchvision, \
tabulate; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, \
torchvision.__version__, torch.cuda.get_device_name())'"
        ;;
    kernels)
        FXGHOST_TEST_DEVICE=cuda run kernels 300 "$py" -m pytest "${pytest_args[@]}" "${xdist[@]}" \
            tests/test_triton.py
        ;;
    path)
        FXGHOST_TEST_DEVICE=cuda run path 300 "$py" -m pytest "${pytest_args[@]}" "${xdist[@]}" \
            tests/test_triton_path.py
        ;;
    tests)
        run tests 300 "$py" -m pytest -q -p no:cacheprovider -o addopts= "${xdist[@]}" \
            tests/test_cuda.py -k "not compiled"
        ;;
    tests-compiled)
        run tests-compiled 600 "$py" -m pytest -q -p no:cacheprovider -o addopts= "${xdist[@]}" \
            tests/test_cuda.py -k compiled
        ;;
    eager)
        run bench-eager 600 "$py" benchmarks/run.py --device cuda --modes eager \
            --out "$out/eager.json"
        ;;
    profile)
        run bench-profile 300 "$py" benchmarks/profile_layer.py
        ;;
    probe)
        run probe 300 "$py" benchmarks/probe_overhead.py
        ;;
    tests-all)
        run tests-all 600 "$py" -m pytest -q -p no:cacheprovider -o addopts= "${xdist[@]}" \
            tests/test_cuda.py
        ;;
    compiled-model | compiled-kernels | compiled)
        if [ "$stage" != compiled-kernels ]; then
            run bench-compiled-model 600 "$py" benchmarks/run.py --device cuda --modes compiled \
                --sections model --impls plain,fxghost --out "$out/compiled-model.json"
        fi
        if [ "$stage" != compiled-model ]; then
            run bench-compiled-model-kernels 600 "$py" benchmarks/run.py --device cuda \
                --modes compiled --sections model --impls fxghost --backend triton \
                --out "$out/compiled-model-kernels.json"
        fi
        [ "$stage" = compiled ] && compiled_layer
        ;;
    compiled-layer)
        compiled_layer
        ;;
    *)
        echo "unknown stage: $stage" >&2
        exit 2
        ;;
    esac
done
cat "$summary"
