#!/usr/bin/env bash
# make sanitize: build fasthash._C with AddressSanitizer + UndefinedBehaviorSanitizer into a
# separate folder (build/sanitize; the in-place .so is untouched), then run tests/test_search.py,
# tests/test_index.py, tests/test_mih.py (multi-index hashing) and the packed-code properties
# tests/test_properties.py (ci profile: odd layouts, misaligned and strided arrays straight into
# _C) against it at every SIMD level the
# CPU has (FASTHASH_SIMD=...). SANITIZE_TESTS overrides the list of test files.
#
# The tests run from a copy of the package (build/sanitize/tree: fasthash/ with the sanitized
# _C, the test files, conftest.py, property_support.py, pyproject.toml), so `import fasthash` picks the copy; the
# script checks that before testing. libasan is preloaded (Python itself is not instrumented),
# leaks are not reported (Python keeps objects alive by design), UBSan halts on the first error.
# Sanitizer reports go to build/sanitize/reports/ (also those of the tests' subprocesses).
#
# Prints one line per level and a final "sanitize: clean|UNCLEAN ..." line; exit status 0 only
# when no sanitizer reported anything and every test run passed.
#
# Environment: PY (python, default .venv/bin/python), SANITIZE_DIR (default build/sanitize),
# SANITIZE_TIMEOUT (seconds per level, default 1800), SANITIZE_PYTEST_ARGS (extra pytest args).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
case $PY in /*|"") ;; */*) PY=$ROOT/$PY ;; esac  # relative to the repository (the tests cd away)
OUT=${SANITIZE_DIR:-$ROOT/build/sanitize}
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1"
T0=$(date +%s)

cd "$ROOT" || exit 2
if ! TREE=$("$PY" fuzz/build_ext.py "$OUT" --cxx "${CXX:-g++}" --flags "$FLAGS" --quiet); then
  echo "sanitize: UNCLEAN (the sanitized build failed)"; exit 2
fi
T_BUILD=$(( $(date +%s) - T0 ))
TESTS=${SANITIZE_TESTS:-tests/test_search.py tests/test_index.py tests/test_mih.py tests/test_properties.py}
rm -rf "$TREE/tests"; mkdir -p "$TREE/tests"
cp tests/conftest.py tests/property_support.py $TESTS "$TREE/tests/"
cp pyproject.toml "$TREE/"
REPORTS=$OUT/reports
rm -rf "$REPORTS"; mkdir -p "$REPORTS"

# libstdc++ is preloaded too: python is not linked against it, and ASan's __cxa_throw
# interceptor must find the real one at start-up ("CHECK failed: real___cxa_throw != 0" on the
# first C++ exception otherwise)
LIBASAN="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export PYTHONDONTWRITEBYTECODE=1

cd "$TREE" || exit 2
if ! LEVELS=$(LD_PRELOAD="$LIBASAN" "$PY" -c "
import fasthash, fasthash._C as C
assert fasthash.__file__.startswith('$TREE/'), fasthash.__file__
assert C.__file__.startswith('$TREE/'), C.__file__
print(' '.join(C.available_simd_levels()))"); then
  echo "sanitize: UNCLEAN (the sanitized fasthash._C does not import from $TREE)"; exit 2
fi

status=0
for level in $LEVELS; do
  t=$(date +%s)
  FASTHASH_SIMD=$level LD_PRELOAD="$LIBASAN" timeout "${SANITIZE_TIMEOUT:-1800}" \
    env HYPOTHESIS_PROFILE=ci "$PY" -m pytest -q -p no:cacheprovider ${SANITIZE_PYTEST_ARGS:-} \
    $TESTS > "$OUT/pytest-$level.log" 2>&1
  rc=$?
  reports=$(ls "$REPORTS" 2>/dev/null | wc -l)
  summary=$(grep -E "(passed|failed|error)" "$OUT/pytest-$level.log" | tail -1)
  verdict=clean
  if [ "$reports" -gt 0 ] || [ "$rc" -ne 0 ]; then verdict=UNCLEAN; status=1; fi
  echo "sanitize[$level]: $verdict (pytest exit $rc: ${summary:-no summary}; sanitizer reports: $reports; $(( $(date +%s) - t ))s)"
  [ "$rc" -ne 0 ] && tail -n 30 "$OUT/pytest-$level.log"
done

for f in "$REPORTS"/*; do
  [ -e "$f" ] || continue
  echo "---- $f"; head -n 40 "$f"
done
n=$(ls "$REPORTS" | wc -l)
total=$(( $(date +%s) - T0 ))
if [ "$status" -eq 0 ]; then
  echo "sanitize: clean (ASan+UBSan, levels: $LEVELS; build ${T_BUILD}s, total ${total}s)"
else
  echo "sanitize: UNCLEAN ($n sanitizer reports in $REPORTS; logs in $OUT; build ${T_BUILD}s, total ${total}s)"
fi
exit $status
