#!/usr/bin/env bash
# The C++ rollout buffer's tests (tests/rollout) against minirlhf._rollout built
# under AddressSanitizer + UndefinedBehaviorSanitizer, with leak detection.  The
# tests compare it with the torch definitions in minirlhf/stages/ppo.py, so the
# package (and kernels/, which ppo.py imports) is copied along; the slow test
# (two torch.distributed processes) is left to the normal run.
#
#   PY=/path/to/venv/bin/python .ci/sanitize.sh      (as .ci/run calls it)
#   .ci/sanitize.sh /path/to/venv/bin/python
#
# The python needs numpy, torch, pytest and hypothesis, plus gcc; the build
# requirements (pybind11, setuptools) are pip-installed into it when missing,
# since `pip install -e .` keeps them in its isolated build environment.
# The sanitized build goes to a temporary copy of the sources, so the normal
# in-place build is left alone.  Fails on any sanitizer report, including a
# leak from our code.  Python does not free everything at exit, so a short
# LeakSanitizer suppression list (below) skips what it and numpy/torch leave;
# a canary (a native leak called from Python, as ours would be) checks first
# that leaks are still reported.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PY:-python3}}"
CC="${CC:-gcc}"

work="$(mktemp -d "${TMPDIR:-/tmp}/minirlhf-sanitize.XXXXXX")"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
src="$work/src"

# -- a copy of what the build and the tests need ------------------------------------------
mkdir -p "$src/tests"
cp -r setup.py pyproject.toml csrc minirlhf kernels "$src/"
[ -f README.md ] && cp README.md "$src/"
cp -r tests/rollout "$src/tests/"
find "$src" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

"$PY" -c "import pybind11, setuptools" 2>/dev/null || "$PY" -m pip install -q "pybind11>=2.11" "setuptools>=68"
echo "sanitize: building minirlhf._rollout with MINIRLHF_SANITIZE=1 in $src"
(cd "$src" && MINIRLHF_SANITIZE=1 "$PY" setup.py -q build_ext --inplace --build-temp "$work/build" >"$work/build.log" 2>&1) \
  || { cat "$work/build.log"; exit 1; }

# -- the sanitizer runtime and its options ------------------------------------------------
libasan="$("$CC" -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "sanitize: libasan not found ($libasan)" >&2; exit 1; }

# What the interpreter and numpy/torch leave unreachable at exit: objects made
# while numpy registers its string ufuncs and promoters, two floats, a str.
# libpython has no frame pointers, so the (fast) stacks of these allocations
# stop at the object constructor (DWARF unwinding costs minutes); the list
# names those constructors.  It cannot hide a leak of our C++ (new/malloc
# under our frames; the canary below proves such leaks are reported), and a
# leaked Python object from our bindings is a refcount bug, which
# test_calls_do_not_leak in tests/rollout/test_rollout_errors.py checks (with
# tracemalloc, whose own tables are not freed at exit either).
cat >"$work/lsan.supp" <<'EOF'
leak:_tracemalloc.c
leak:_PyObject_New
leak:_PyObject_GC_NewVar
leak:PyFloat_FromDouble
leak:PyUnicode_New
EOF

# libstdc++ is preloaded too: python does not link it, and ASan must find its
# __cxa_throw at start-up to intercept C++ exceptions (our ValueErrors).
libstdcxx="$("$CC" -print-file-name=libstdc++.so)"
export LSAN_OPTIONS="suppressions=$work/lsan.supp:print_suppressions=0"
# Reports go to files, not stderr: pytest captures the stderr of a process that then dies.
run_sanitized() {  # run_sanitized NAME COMMAND...: reports in $work/NAME.<pid>
  local name="$1"; shift
  env LD_PRELOAD="$libasan $libstdcxx" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:log_path=$work/$name" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/$name" "$@"
}
reports() { cat "$work/$1".* 2>/dev/null || true; }

# -- the canary: a native leak called from Python must be reported -----------------------
cat >"$work/canary.c" <<'EOF'
#include <stdlib.h>
#include <string.h>
void leak(int n) {
    for (int i = 0; i < n; ++i) {
        char *volatile p = malloc(4096 + i);
        memset(p, 1, 4096 + i);
        p = 0;
    }
}
EOF
"$CC" -shared -fPIC -O0 -fno-omit-frame-pointer -o "$work/canary.so" "$work/canary.c"
if (cd "$work" && run_sanitized canary "$PY" -c "import ctypes; ctypes.CDLL('$work/canary.so').leak(8)"); then
  echo "sanitize: the canary leak was NOT reported: leak checking is broken" >&2; exit 1
fi
reports canary | grep -q "ERROR: LeakSanitizer: detected memory leaks" \
  || { reports canary; echo "sanitize: the canary failed without a leak report" >&2; exit 1; }
echo "sanitize: canary leak reported as it should be"

# -- the tests ----------------------------------------------------------------------------
export MINIRLHF_HYPOTHESIS_EXAMPLES="${MINIRLHF_HYPOTHESIS_EXAMPLES:-15}"  # ASan is ~10x slower
export MINIRLHF_EXPECT_ROLLOUT_IN="$src"  # a test checks this build is the one imported
set +e
(cd "$src" && run_sanitized tests "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/rollout)
rc=$?
set -e
if [ -n "$(reports tests)" ]; then
  reports tests
  echo "sanitize: sanitizer report above" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || { echo "sanitize: tests failed (exit $rc)" >&2; exit "$rc"; }
echo "sanitize: clean"
