"""Which kernel builds the tests run (the `capability` fixture of conftest.py): those this
CPU can run, which must be all it has the instructions for.  A CPU without AVX-512 tests
fewer builds; the pytest report header names the ones tested and the ones left out."""
import os
import platform

import pytest

import batchnorm_ext
from helpers import ALL_BUILDS, BEST_BUILD, BUILT, available_capabilities

# What each build needs (setup.py's flags; ATen's own check for AVX512 and AVX2, as in
# aten/src/ATen/native/DispatchStub.cpp, compute_cpu_capability).
NEEDS = {
    "AVX512_BF16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "AVX2": {"avx2", "fma"},
    "DEFAULT": set(),
}


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


def expected_builds():
    """The builds this CPU can run, from its flags, and the extension has, best first; ATEN_CPU_CAPABILITY
    (avx512, avx2 or default) caps them, and then AVX512_BF16 is not taken (dispatch.cpp:
    it is then ATen's choice exactly)."""
    flags = cpu_flags()
    runnable = [b for b in ALL_BUILDS if NEEDS[b] <= flags and b in BUILT]
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        cap = forced.upper()
        runnable = [b for b in runnable if b != "AVX512_BF16" and ALL_BUILDS.index(b) >= ALL_BUILDS.index(cap)]
    return runnable


linux_x86 = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")),
    reason="reads the x86 CPU flags in /proc/cpuinfo")


@linux_x86
def test_builds_tested_are_all_this_cpu_can_run():
    assert available_capabilities() == expected_builds(), cpu_flags() & set().union(*NEEDS.values())
    assert BEST_BUILD == expected_builds()[0]


@linux_x86
def test_builds_left_out_are_refused():
    """The builds not tested are those the CPU cannot run: choosing one is refused."""
    previous = batchnorm_ext.cpu_capability()
    try:
        for build in ALL_BUILDS:
            if build in available_capabilities():
                batchnorm_ext.set_cpu_capability(build)
                assert batchnorm_ext.cpu_capability() == build
            elif build not in BUILT:
                with pytest.raises(ValueError, match=f"no kernels built for CPU capability '{build}'"):
                    batchnorm_ext.set_cpu_capability(build)
            else:
                with pytest.raises(ValueError, match=f"this CPU does not support {build}"):
                    batchnorm_ext.set_cpu_capability(build)
    finally:
        batchnorm_ext.set_cpu_capability(previous)


def test_report_header_names_the_builds(pytestconfig):
    headers = [line for lines in pytestconfig.hook.pytest_report_header(
        config=pytestconfig, start_path=pytestconfig.rootpath) for line in lines]
    tested = available_capabilities()
    untested = [b for b in ALL_BUILDS if b not in tested] or ["none"]
    assert f"batchnorm_ext kernel builds tested: {', '.join(tested)}" in headers, headers
    left_out = [line for line in headers if line.startswith("batchnorm_ext kernel builds NOT tested")]
    assert len(left_out) == 1 and left_out[0].endswith("): " + ", ".join(untested)), headers
