"""Builds batchnorm_ext._C: the custom operators and their CPU kernels.

The kernels (csrc/cpu/batch_norm_kernel.h and the headers it includes) are compiled once per instruction set
(csrc/cpu/kernel_default.cpp, kernel_avx2.cpp, kernel_avx512.cpp, kernel_avx512bf16.cpp),
each with its own -m flags; csrc/cpu/dispatch.cpp picks one at run time.  So the default build
runs on any x86-64 CPU and still uses AVX-512 where there is one.
"""
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Extra flags for the sources whose name ends in _<isa>.cpp.  CPU_CAPABILITY selects the
# at::vec implementation (and its namespace) exactly as ATen's own kernels do.
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": AVX512 + ["-DCPU_CAPABILITY=AVX512"],
    # AVX-512 plus the bfloat16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4):
    # at::vec's AVX-512 code, with one instruction where it rounds floats to bfloat16; built
    # for bfloat16 input only (the AVX512 kernels serve the other dtypes).
    "avx512bf16": AVX512 + ["-mavx512bf16", "-DCPU_CAPABILITY=AVX512_BF16"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def compiler_accepts(flags, code):
    """Whether the C++ compiler builds `code` with `flags` (GCC before 10 has no
    -mavx512bf16, for one)."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write(code)
        result = subprocess.run([compiler, *flags, "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                capture_output=True)
    return result.returncode == 0


AVX512_BF16 = X86 and compiler_accepts(ISA_FLAGS["avx512bf16"], """
#include <immintrin.h>
__m256i narrow(__m512 v) { return __m256i(_mm512_cvtneps_pbh(v)); }
""")
if X86 and not AVX512_BF16:
    print("batchnorm_ext: the compiler does not take -mavx512bf16; building without the "
          "AVX512_BF16 kernels (AVX512 serves those CPUs)")


def isa_of(source):
    stem = os.path.splitext(os.path.basename(source))[0]
    return stem.rsplit("_", 1)[-1]


class BuildWithIsaFlags(BuildExtension):
    """BuildExtension compiles every source with the same flags; this adds ISA_FLAGS per file.

    Sources are grouped by flag set, and the groups are compiled at the same time, each
    with its own ninja file in its own folder (one ninja run per group: a ninja file has
    one set of flags), so the build is parallel across groups as well as within them.
    """

    def build_extension(self, ext):
        compile_sources = self.compiler.compile

        def compile_by_isa(sources, output_dir=None, *args, extra_postargs=None, **kwargs):
            groups = {}  # flag set -> its sources, in source order
            for source in sources:
                groups.setdefault(isa_of(source) if isa_of(source) in ISA_FLAGS else "", []).append(source)

            def compile_group(isa):
                flags = list(extra_postargs or []) + ISA_FLAGS.get(isa, [])
                folder = os.path.join(output_dir or ".", isa or "common")
                return compile_sources(groups[isa], folder, *args, extra_postargs=flags, **kwargs)

            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(groups)))) as pool:
                objects = dict(zip(groups, pool.map(compile_group, groups)))
            # The objects in source order (see "Baseline objects come first" below).
            by_source = {s: o for isa in groups for s, o in zip(groups[isa], objects[isa])}
            return [by_source[s] for s in sources]

        self.compiler.compile = compile_by_isa
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


# Baseline objects come first on the link line: where an inline function was emitted by
# several objects, the linker keeps the first copy, which then is the one built without -m flags.
sources = [
    "csrc/module.cpp",
    "csrc/ops.cpp",
    "csrc/batch_norm_cpu.cpp",
    "csrc/autograd.cpp",
    "csrc/fallback.cpp",
    "csrc/cpu/dispatch.cpp",
]
# BATCHNORM_EXT_KERNELS=default,avx512 (for one): only these kernel builds.  Only the
# sanitized build (scripts/sanitize.sh) asks for fewer than all: the best vector build the
# CPU runs, and DEFAULT where that one is AVX-512 (DEFAULT's 8 lanes are then a second
# vector width; beside AVX2 they would be the same width again).  Where the CPU has none of
# the builds asked for, the extension refuses to run (dispatch.cpp).
KERNELS = {"default", "avx2", "avx512", "avx512bf16"}
if os.environ.get("BATCHNORM_EXT_KERNELS"):
    KERNELS &= set(os.environ["BATCHNORM_EXT_KERNELS"].lower().split(","))
if "default" in KERNELS or not X86:
    sources.append("csrc/cpu/kernel_default.cpp")
KERNELS.discard("default")
if not X86:
    KERNELS = set()
elif not AVX512_BF16:
    KERNELS.discard("avx512bf16")
if "avx512bf16" in KERNELS:
    KERNELS.add("avx512")  # its other dtypes are the AVX512 kernels (kernel_avx512bf16.cpp)
sources += [f"csrc/cpu/kernel_{isa}.cpp" for isa in ("avx2", "avx512", "avx512bf16") if isa in KERNELS]

# BATCHNORM_EXT_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer build (see
# scripts/sanitize.sh, which also preloads their runtimes into Python).
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-O1", "-g1"]
sanitize = os.environ.get("BATCHNORM_EXT_SANITIZE") == "1"

setup(
    name="batchnorm_ext",
    version="0.1.0",
    description="One-pass Welford batch normalization for PyTorch on the CPU",
    packages=["batchnorm_ext"],
    ext_modules=[
        CppExtension(
            "batchnorm_ext._C",
            sources,
            # -g0: no debug information (Python's flags ask for it), which halves the build.
            extra_compile_args=["-O3", "-g0", "-fopenmp", "-DNDEBUG"]
            + (["-DBATCHNORM_EXT_X86"] if X86 else [])
            + (["-DBATCHNORM_EXT_KERNEL_DEFAULT"] if "csrc/cpu/kernel_default.cpp" in sources else [])
            + [f"-DBATCHNORM_EXT_KERNEL_{isa.upper()}" for isa in sorted(KERNELS)]
            + (SANITIZE if sanitize else []),
            extra_link_args=["-fopenmp"] + (SANITIZE if sanitize else []),
        )
    ],
    cmdclass={"build_ext": BuildWithIsaFlags},
    # torch.compile(model, backend="batchnorm_ext") without importing batchnorm_ext first.
    entry_points={"torch_dynamo_backends": ["batchnorm_ext = batchnorm_ext._backend:backend"]},
    python_requires=">=3.9",
    install_requires=["torch"],
)
