#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer into
# build-sanitize/ and runs the test suite against that build.  Python itself is not
# instrumented, so the sanitizer runtimes are preloaded; leak detection is off (CPython
# and torch keep memory until exit by design).
#   bash scripts/sanitize.sh [pytest args]          build, then test
#   bash scripts/sanitize.sh --build                build only
#   bash scripts/sanitize.sh --test [pytest args]   test the build made before
set -euo pipefail
cd "$(dirname "$0")/.."
step=all
case "${1:-}" in
  --build) step=build; shift ;;
  --test) step=test; shift ;;
esac
[ -x .venv/bin/python ] || bash scripts/setup.sh
out=build-sanitize
root=$PWD

if [ "$step" != test ]; then
  # The kernel builds of each vector width this CPU runs: on an AVX-512 CPU, AVX512 (16
  # floats) and DEFAULT (at::vec without intrinsics, 8 floats); on an AVX2 one, AVX2 alone
  # (8 floats: DEFAULT would walk memory as it does).  A build the CPU cannot run would be
  # compiled for nothing; AVX512_BF16 adds one instruction.  Each kernel build costs about
  # three minutes of a core here.
  # ATEN_CPU_CAPABILITY=avx2 or =default (running the lesser builds on any CPU) gets that
  # build alone, as the CPU would use it.
  kernels=avx2
  grep -q avx512bw /proc/cpuinfo 2>/dev/null && kernels=default,avx512
  case "${ATEN_CPU_CAPABILITY:-}" in
    avx2|AVX2) kernels=avx2 ;;
    default|DEFAULT) kernels=default ;;
  esac
  echo "[sanitize] compiling batchnorm_ext with AddressSanitizer + UndefinedBehaviorSanitizer into $out/ (kernel builds: $kernels)"
  start=$SECONDS
  rm -rf "$out/lib"
  BATCHNORM_EXT_SANITIZE=1 BATCHNORM_EXT_KERNELS=$kernels MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)} \
    .venv/bin/python setup.py -q build_ext --build-temp "$out/tmp" --build-lib "$out/lib" >/dev/null
  cp batchnorm_ext/*.py "$out/lib/batchnorm_ext/"
  echo "[sanitize] compiled in $((SECONDS - start)) s"
fi
[ "$step" = build ] && exit 0

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# From inside the sanitized build, so that `import batchnorm_ext` finds it first.
cd "$out/lib"
"$root/.venv/bin/python" -c "import batchnorm_ext, sys; f = batchnorm_ext._C.__file__; print('testing', f); sys.exit('build-sanitize' not in f)"
# Left to the normal run:
# - the resident-memory soak (ASan's quarantine holds freed memory on purpose, so resident
#   memory grows under it whatever the code does);
# - fuse() on whole zoo models (30 s here, mostly Python: the fused kernels and the
#   shapes they meet run in tests/test_fused.py) and page 10's table (Python arithmetic);
# - the zoo's training comparisons (two SGD steps of deep nets, whose float32 rounding the
#   nets amplify chaotically: judged against native's own error, they depend on the exact
#   rounding of the build, and this one is compiled at -O1; every kernel path they take is
#   exercised here by the other tests);
# - the 2**31-value statistics with the DEFAULT kernels (4 GiB read by at::vec's plain C++
#   at -O1 under ASan: a minute per layout; the vector build runs them here, in seconds,
#   through the same indexing code);
# - what is mostly Inductor or Dynamo compiling whole models or comparing its code (the backend's
#   freezing, caches, options and layout tests, the entry point in a new process, the
#   tutorial's page 11) or a compiler building another extension (page 3): minutes of
#   g++ under the preloaded sanitizer runtimes, for no code of ours that the tests kept do
#   not run (the rewrite's graphs, dynamic shapes, AOTInductor, tests/test_inductor.py).
"$root/.venv/bin/python" -m pytest "$root/tests" -q -p no:cacheprovider \
  --deselect tests/test_backend.py::test_models_compiled_with_the_backend_train_like_native \
  --deselect tests/test_autograd.py::test_compiled_autograd_of_a_torchvision_model \
  --deselect tests/test_backend.py::test_layout_optimization_off_where_batch_norms_become_ours \
  --deselect tests/test_backend.py::test_eval_with_freezing_folds_as_native \
  --deselect tests/test_backend.py::test_a_model_without_batch_norms_compiles_as_with_inductor \
  --deselect tests/test_backend.py::test_options_and_mode_reach_inductor \
  --deselect tests/test_backend.py::test_cache_salt \
  --deselect tests/test_backend.py::test_the_backend_by_name_without_importing_the_package \
  --deselect tests/test_backend.py::test_enable_compile_integration_alone_is_cached_and_salted \
  --deselect "tests/test_tutorial.py::test_python_blocks_run_in_order[03-a-first-kernel.md]" \
  --deselect "tests/test_tutorial.py::test_python_blocks_run_in_order[11-into-torch-compile.md]" \
  --deselect tests/test_reliability.py::test_no_memory_growth_over_thousands_of_calls \
  --deselect tests/test_fused.py::test_fuse_zoo_models \
  --deselect tests/test_tutorial.py::test_page_10_table_is_what_measure_fused_makes_of_its_numbers \
  --deselect tests/test_zoo.py::test_trains_like_native \
  --deselect "tests/test_reliability.py::test_more_than_2_to_the_31_values_statistics[DEFAULT-channels first]" \
  --deselect "tests/test_reliability.py::test_more_than_2_to_the_31_values_statistics[DEFAULT-rows]" "$@"
