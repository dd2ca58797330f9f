#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer into
# build-sanitize/ and runs the test suite against that build.  Python itself is not
# instrumented, so the sanitizer runtimes are preloaded; leak detection is off (CPython
# and torch keep memory until exit by design).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
out=build-sanitize
echo "[sanitize] compiling batchnorm_ext with AddressSanitizer + UndefinedBehaviorSanitizer into $out/"
rm -rf "$out/lib"
# The kernels of two vector widths (AVX-512: 16 floats; DEFAULT: 8, as AVX2) cover the
# kernel code; AVX2 and AVX512_BF16 add only their instructions, and half the build time.
BATCHNORM_EXT_SANITIZE=1 BATCHNORM_EXT_KERNELS=default,avx512 MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)} .venv/bin/python setup.py -q build_ext \
  --build-temp "$out/tmp" --build-lib "$out/lib" >/dev/null
cp batchnorm_ext/*.py "$out/lib/batchnorm_ext/"
root=$PWD
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# From inside the sanitized build, so that `import batchnorm_ext` finds it first.
cd "$out/lib"
"$root/.venv/bin/python" -c "import batchnorm_ext, sys; f = batchnorm_ext._C.__file__; print('testing', f); sys.exit('build-sanitize' not in f)"
# Left to the normal run: the resident-memory soak (ASan's quarantine holds freed memory
# on purpose, so resident memory grows under it whatever the code does), and the zoo's
# training comparisons (two SGD steps of deep nets, whose float32 rounding the nets amplify
# chaotically: judged against native's own error, they depend on the exact rounding of
# the build, and this one is compiled at -O1; every kernel path they take is exercised
# here by the other tests).
"$root/.venv/bin/python" -m pytest "$root/tests" -q -p no:cacheprovider \
  --deselect tests/test_reliability.py::test_no_memory_growth_over_thousands_of_calls \
  --deselect tests/test_zoo.py::test_trains_like_native "$@"
