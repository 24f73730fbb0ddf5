#!/usr/bin/env bash
# The GPU run (issue 17) in one call of at most 8 minutes: install the project on the GPU
# machine, then run every GPU step (python -m surgery_edge.bench.gpu: gpu-marked tests, kernel,
# engine and training benchmarks), each within its share of the time, writing JSON and Markdown
# under $OUT as it goes (at most 8 files) and printing a summary at the end.
#
# Once, before the call, in the root of the checkout the device tool sends (the main checkout),
# fetch the wheels the GPU image lacks (pinned in benchmarks/gpu/wheels.txt; .whl/ is ignored
# by git through .gitignore; in a checkout whose .gitignore predates that, run
# `echo /.whl/ >> .git/info/exclude` first, so that they are never committed):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl -r benchmarks/gpu/wheels.txt
#
# Then the call (the device tool's run), with .whl carried:
#
#   command: bash benchmarks/gpu/run.sh      carry: [".whl"]      timeout_s: 540
#
# Serving (the optional step `serve`, issue 37) needs tritonserver, which PyTriton's wheel bundles:
# 53 MiB, too much beside .whl in one call's 64 MiB. So it takes two calls, the second within the
# 30 s the machine stays warm: the first carries .whl-serve (the wheels of
# benchmarks/gpu/wheels-serve.txt, downloaded as above with `--platform manylinux_2_35_x86_64`
# added, PyTriton's, and `-d .whl-serve -r benchmarks/gpu/wheels-serve.txt`: 60 MiB, which with
# the checkout's 3.3 MiB fits) and installs them into .site-serve in the checkout (ignored by git,
# so kept between calls on the warm machine); the second runs the step:
#
#   command: bash benchmarks/gpu/run.sh --install-serving    carry: [".whl-serve"]   timeout_s: 120
#   command: bash benchmarks/gpu/run.sh --only serve         carry: [".whl"]         timeout_s: 540
#
# Usage: benchmarks/gpu/run.sh [--dry-run [--install]] [--out DIR] [--budget-s S] [--only STEP ...]
#        benchmarks/gpu/run.sh --install-serving
#   --dry-run  every step at tiny size on the CPU under TRITON_INTERPRET=1, with $PYTHON (default
#              python3) and nothing installed: what `make test` runs (tests/bench/test_gpu_run.py).
#   --install  with --dry-run: install first, as the real run does (the wheels of .whl/ into
#              $SURGERY_EDGE_SITE, the project into $PYTHON's environment): what
#              `make gpu-dry-run-device` runs, under the GPU machine's versions (.venv-device).
#   --out      where the results go (default $OUT; a new temporary folder for a dry run).
#   --budget-s the seconds all steps share (default: 8 minutes less the installation and a margin).
#   --only     these steps only; the optional step `serve` runs only when named here.
#   --install-serving  install the wheels of .whl-serve/ into .site-serve/ and stop; every later
#              run puts .site-serve on the path when it is there.
# Exit status: 0 when every step succeeded, 1 when one failed or ran out of time, 2 when the
# installation failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

CALL_SECONDS=480   # the call's 8 minutes
MARGIN_SECONDS=20  # the final summary, and the device tool's own overhead
PY=${PYTHON:-python3}
SITE=${SURGERY_EDGE_SITE:-/tmp/site}
SERVE_SITE=.site-serve  # in the checkout: what the device tool keeps between calls
dry=0
install=0
serving=0
args=()  # what goes on to python -m surgery_edge.bench.gpu
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1; args+=("$arg") ;;
        --install) install=1 ;;
        --install-serving) serving=1 ;;
        *) args+=("$arg") ;;
    esac
done
if [ "$install" = 1 ] && [ "$dry" = 0 ]; then
    echo "benchmarks/gpu/run.sh: --install goes with --dry-run (the real run always installs)" >&2
    exit 2
fi
[ "$dry" = 0 ] && install=1

missing_wheels() {
    # each requirement pinned in $2 needs its wheel in $1 (wheel names use _ and lowercase)
    local dir=$1 list=$2 line name version found=0
    while read -r line; do
        line=${line%%#*}
        [ -z "${line// }" ] && continue
        name=$(echo "${line%%==*}" | tr 'A-Z.-' 'a-z__')  # wheel names: lowercase, _ for . and -
        version=${line##*==}
        if ! ls "$dir/" 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${name}-${version}-.*\.whl$"; then
            echo "$line"
            found=1
        fi
    done < "$list"
    return $found
}

if [ "$serving" = 1 ]; then
    if ! missing=$(missing_wheels .whl-serve benchmarks/gpu/wheels-serve.txt); then
        echo "benchmarks/gpu/run.sh: .whl-serve/ lacks the wheels of $(echo $missing). Download" \
             "them in the repository root with the pip download command in this script's" \
             "header, with -d .whl-serve -r benchmarks/gpu/wheels-serve.txt." >&2
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SERVE_SITE" .whl-serve/*.whl || exit 2
    PYTHONPATH="$SERVE_SITE" $PY -c "import pytriton, tritonclient.grpc" || exit 2
    echo "serving wheels installed in ${SECONDS} s into $SERVE_SITE; next: run.sh --only serve"
    exit 0
fi
if [ -d "$SERVE_SITE" ]; then  # installed by an earlier --install-serving on this machine
    export PYTHONPATH="$PWD/$SERVE_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$install" = 0 ]; then
    echo "dry run: nothing is installed; python: $($PY -c 'import sys; print(sys.executable)')"
    if missing=$(missing_wheels .whl benchmarks/gpu/wheels.txt); then
        echo "dry run: .whl/ holds every wheel of benchmarks/gpu/wheels.txt"
    else
        echo "dry run: .whl/ lacks (the real run will stop): $(echo $missing)"
    fi
else
    if ! missing=$(missing_wheels .whl benchmarks/gpu/wheels.txt); then
        echo "benchmarks/gpu/run.sh: .whl/ lacks the wheels of $(echo $missing). Download" \
             "them in the repository root with the pip download command in this script's" \
             "header (benchmarks/gpu/run.sh), then carry .whl in the device call." >&2
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 2
    $PY -c "import open_clip, pydantic, surgery_edge.bench.gpu" || exit 2
    echo "installed in ${SECONDS} s into $($PY -c 'import sys; print(sys.prefix)') and $SITE"
fi

if [ -z "${OUT:-}" ] && [[ " $* " != *" --out "* ]]; then
    args+=(--out "$(mktemp -d)")
fi
budget=$((CALL_SECONDS - SECONDS - MARGIN_SECONDS))
exec "$PY" -m surgery_edge.bench.gpu --budget-s "$budget" ${args[@]+"${args[@]}"}
