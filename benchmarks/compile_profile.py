"""Where torch.compile's time goes on the CPU: batch norm -> ReLU, forward + backward.

A diagnostic that goes with benchmarks/COMPILE.md (it printed the figures there).  Native
torch.nn modules only; every case is forward + backward of one training step, timed with
torch.utils.benchmark (medians, eager and compiled interleaved).  Experiments:

  kernels   time per kernel, eager against compiled (torch.profiler; Inductor's kernels are
            recorded with torch._inductor.config.cpp.enable_kernel_profile)
  signs     compiled ReLU with inputs of random sign, all positive, all negative: the cost
            of the bool mask store depends on the data (a branch per byte, see COMPILE.md)
  patch     the same graphs compiled again with Inductor's bool mask store replaced by two
            AVX-512 instructions (compare: everything else in the generated code is the same)
  var_mean  torch.var_mean over (N, H, W) alone: eager, compiled (Inductor's Welford
            reduction), and x.sum() as the memory floor
  repeat    only the compiled case, forward + backward, for --min-run-time seconds (for
            perf record)
  model     a torchvision model's training step (SGD; resnet18 at 16x3x112x112 unless
            --model / --model-input say otherwise): eager, compiled, compiled + patch,
            compiled without Inductor's layout optimization; the profile of eager and
            compiled

    python benchmarks/compile_profile.py                          # kernels signs patch var_mean
    python benchmarks/compile_profile.py --experiments model      # ~3 minutes more
    TORCH_LOGS=output_code python benchmarks/compile_profile.py --experiments kernels --cases relu

Caches are off (torch.compiler.config.force_disable_caches) so that every graph is
compiled here, with or without the patch.
"""
import argparse
import copy
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import interleaved, parse_shape, relative_error  # noqa: E402

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
EXPERIMENTS = ["kernels", "signs", "patch", "var_mean", "model", "repeat"]
CASES = ["relu", "bn", "bn_relu", "bn_add_relu"]


# ---------------------------------------------------------------------------------------
# The patch.  Inductor keeps ReLU's mask (out <= 0) for the backward as a bool tensor.  It
# stores a vector of 16 float comparisons as 16 bools through VecMask<float,1>::store(bool*)
# and loads them back through VecMask<float,1>::from(bool*, count); neither has an
# AVX-512 (or AVX2) specialization in ATen's vector headers (torch 2.13), so both run
# generic scalar loops (the store through a 64-lane Vectorized<bool>, with a branch per
# lane).  The patched code generator emits instead, in an AVX-512 build:
#   store: vpmovd2m (sign bits to a k-mask), then a masked byte store of 0/1;
#   load:  a masked 16-byte load, vptestmb, vpmovm2d.
# Everything else in the generated code stays the same.

_FAST_STORE = """[](auto m, bool* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<decltype(m), at::vec::VecMask<float,1>>) {
        __mmask16 k = _mm512_movepi32_mask(_mm512_castps_si512(m[0]));
        _mm_mask_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), _mm_maskz_set1_epi8(k, 1));
        return;
    }
#endif
    m.store(p, n);
}(VALUE, POINTER, COUNT);"""

_FAST_LOAD = """[](const bool* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    __m128i b = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p);
    return at::vec::VecMask<float,1>(at::vec::Vectorized<float>(
        _mm512_castsi512_ps(_mm512_movm_epi32(_mm_test_epi8_mask(b, b)))));
#else
    return at::vec::VecMask<float,1>::from(p, n);
#endif
}(POINTER, COUNT)"""


class mask_store_patch:
    """Context manager: Inductor code generated inside it stores and loads bool masks of
    16 floats with the instructions above (where the kernel is built for AVX-512)."""

    def __enter__(self):
        from torch._inductor.codegen.common import IndentedBuffer
        from torch._inductor.codegen.cpp import CppVecKernel
        from torch._inductor.codegen.cpp_utils import cexpr_index
        self.originals = (CppVecKernel._get_store_line, CppVecKernel._get_vec_load_line)
        original_store, original_load = self.originals

        def store_line(kernel, value, var, index, dtype, accu_store=False):
            tiling_var = kernel.itervars[kernel.tiling_idx]
            if (dtype != torch.bool or accu_store
                    or kernel._try_get_const_stride(index, tiling_var) != 1):
                return original_store(kernel, value, var, index, dtype, accu_store)
            code = IndentedBuffer()
            text = (_FAST_STORE.replace("VALUE", str(value))
                    .replace("POINTER", f"{var} + {cexpr_index(index)}")
                    .replace("COUNT", cexpr_index(kernel.num_elems)))
            for line in text.splitlines():
                code.writeline(line)
            return code

        def load_line(kernel, var, index, dtype, load_mask=None):
            if dtype != torch.bool or kernel._get_mask_type() != "at::vec::VecMask<float,1>":
                return original_load(kernel, var, index, dtype, load_mask)
            pointer = f"{var} + {cexpr_index(index)}" if index != 0 else var
            return (_FAST_LOAD.replace("POINTER", pointer)
                    .replace("COUNT", cexpr_index(kernel.num_elems)))

        CppVecKernel._get_store_line = store_line
        CppVecKernel._get_vec_load_line = load_line

    def __exit__(self, *exc):
        from torch._inductor.codegen.cpp import CppVecKernel
        CppVecKernel._get_store_line, CppVecKernel._get_vec_load_line = self.originals


def compile_with(module, context):
    """torch.compile, Inductor's compilation run inside `context()` (the patch, or a config
    change).  A backend of its own: Dynamo guards on the backend, so this and the stock
    compilation of one module are separate cache entries.  Call the result the first time
    inside `with context():` too (the backward is compiled then)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with context():
            return compile_fx(gm, example_inputs)
    return torch.compile(module, backend=backend)


def compile_patched(module):
    return compile_with(module, mask_store_patch)


def no_layout_optimization():
    """Inductor without its layout optimization (which turns a CNN channels-last inside the
    graph, converting the weights and the input at every call)."""
    return torch._inductor.config.patch(layout_optimization=False)


# ---------------------------------------------------------------------------------------
# Cases: native modules, forward + backward.


class BNAddReLU(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x, identity):
        return torch.relu(self.bn(x) + identity)


def build(case, shape, seed=0):
    """(module, inputs needing grad, extra inputs, upstream grad)."""
    torch.manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    grad = torch.randn(shape)
    if case == "relu":
        return torch.nn.ReLU(), [x], [], grad
    if case == "bn":
        return torch.nn.BatchNorm2d(channels), [x], [], grad
    if case == "bn_relu":
        return torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU()), [x], [], grad
    if case == "bn_add_relu":
        return BNAddReLU(channels), [x], [torch.randn(shape)], grad
    raise ValueError(case)


def step_fn(module, xs, extra, grad):
    wrt = xs + [p for p in module.parameters()]

    def step():
        return torch.autograd.grad(module(*xs, *extra), wrt, grad)
    return step


def compiled(module):
    torch._dynamo.reset()
    return torch.compile(module)


def check_close(a_fn, b_fn, what, tol=1e-3):
    """Norms, not element-wise: a ReLU's mask may flip where its input is within rounding
    of 0 (see harness.check_variant)."""
    for i, (u, v) in enumerate(zip(a_fn(), b_fn())):
        error = relative_error(u, v)
        if not error <= tol:
            raise AssertionError(f"{what}: result {i} differs, relative error {error:.3g}")


def ms(t):
    return f"{t * 1e3:.2f}"


# ---------------------------------------------------------------------------------------
# Experiments.


def profile_table(fn, reps, title, top):
    """Self CPU time per op/kernel, per call, with its share of the total."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"\n{title}: {total / reps / 1e3:.2f} ms per step (profiled), self CPU time per step\n")
    print("| op or kernel | ms | share |")
    print("|---|---|---|")
    shown = 0.0
    for e in events[:top]:
        shown += e.self_cpu_time_total
        print(f"| {e.key} | {e.self_cpu_time_total / reps / 1e3:.2f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% |")
    if len(events) > top:
        print(f"| ({len(events) - top} more) | {(total - shown) / reps / 1e3:.2f} | "
              f"{100 * (total - shown) / total:.1f}% |")


def exp_kernels(args, shape):
    torch._inductor.config.cpp.enable_kernel_profile = True
    try:
        for case in args.cases:
            module, xs, extra, grad = build(case, shape)
            eager = step_fn(module, xs, extra, grad)
            comp = step_fn(compiled(module), xs, extra, grad)
            check_close(eager, comp, f"{case} compiled against eager")
            t_eager, t_comp = interleaved([eager, comp], args.rounds, args.min_run_time)
            print(f"\n### {case} {'x'.join(map(str, shape))}, forward + backward: eager "
                  f"{ms(t_eager)} ms, compiled {ms(t_comp)} ms ({t_comp / t_eager:.2f}x eager)")
            profile_table(eager, args.reps, f"{case} eager", args.top)
            profile_table(comp, args.reps, f"{case} compiled", args.top)
    finally:
        torch._inductor.config.cpp.enable_kernel_profile = False


def exp_signs(args, shape):
    print(f"\n### compiled ReLU forward + backward, {'x'.join(map(str, shape))}, by the sign "
          f"of the input (eager alongside)\n")
    print("| input | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    relu = torch.nn.ReLU()
    comp = compiled(relu)
    grad = torch.randn(shape)
    base = torch.randn(shape)
    for name, x in (("random sign (N(0, 1))", base), ("all positive (|N(0, 1)|)", base.abs()),
                    ("all negative (-|N(0, 1)|)", -base.abs())):
        x = x.clone().requires_grad_()
        fns = [lambda m=m, x=x: torch.autograd.grad(m(x), [x], grad) for m in (relu, comp)]
        t_eager, t_comp = interleaved(fns, args.rounds, args.min_run_time)
        print(f"| {name} | {ms(t_eager)} | {ms(t_comp)} | {t_comp / t_eager:.2f}x |")


def exp_patch(args, shape):
    print(f"\n### the same graphs, compiled with Inductor's bool mask store (stock) and with "
          f"the two-instruction store (patched), forward + backward, "
          f"{'x'.join(map(str, shape))}\n")
    print("| case | eager ms | compiled, stock ms | compiled, patched ms | stock / eager | "
          "patched / eager |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        module, xs, extra, grad = build(case, shape)
        eager = step_fn(module, xs, extra, grad)
        stock = step_fn(compiled(module), xs, extra, grad)
        stock()  # compiles now, unpatched
        patched = step_fn(compile_patched(module), xs, extra, grad)
        with mask_store_patch():
            patched()
        check_close(eager, patched, f"{case} patched against eager")
        t = interleaved([eager, stock, patched], args.rounds, args.min_run_time)
        print(f"| {case} | {ms(t[0])} | {ms(t[1])} | {ms(t[2])} | {t[1] / t[0]:.2f}x | "
              f"{t[2] / t[0]:.2f}x |")


def exp_var_mean(args, shape):
    x = torch.randn(shape) * 2 + 0.5
    dims = [0] + list(range(2, x.dim()))
    eager = lambda: torch.var_mean(x, dim=dims, correction=0)  # noqa: E731
    fn = compiled(lambda t: torch.var_mean(t, dim=dims, correction=0))
    comp = lambda: fn(x)  # noqa: E731
    check_close(eager, comp, "var_mean compiled against eager")
    floor = lambda: x.sum()  # noqa: E731
    t = interleaved([eager, comp, floor], args.rounds, args.min_run_time)
    print(f"\n### torch.var_mean over (N, H, W) of {'x'.join(map(str, shape))} "
          f"(the statistics pass of a training forward)\n")
    print("| eager ms | compiled (Welford) ms | x.sum() ms | compiled / x.sum() |")
    print("|---|---|---|---|")
    print(f"| {ms(t[0])} | {ms(t[1])} | {ms(t[2])} | {t[1] / t[2]:.2f}x |")


def exp_model(args, _shape):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import zoo
    tv = zoo.torchvision()
    torch.manual_seed(0)
    native = getattr(tv.models, args.model)(num_classes=100)
    x = torch.randn(parse_shape(args.model_input))
    target = torch.randint(0, 100, (x.shape[0],))

    def step_of(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            return loss
        return step
    models = [copy.deepcopy(native) for _ in range(4)]
    # Kernels compiled with profiling records, so that the profile names them.
    torch._inductor.config.cpp.enable_kernel_profile = True
    stock_step = step_of(compiled(models[1]))
    print(f"\ncompiling {args.model} (stock) ...", file=sys.stderr, flush=True)
    stock_step()
    patched_step = step_of(compile_patched(models[2]))
    print(f"compiling {args.model} (patched) ...", file=sys.stderr, flush=True)
    with mask_store_patch():
        patched_step()
    plain_step = step_of(compile_with(models[3], no_layout_optimization))
    print(f"compiling {args.model} (layout_optimization=False) ...", file=sys.stderr, flush=True)
    with no_layout_optimization():
        plain_step()
    torch._inductor.config.cpp.enable_kernel_profile = False
    eager_step = step_of(models[0])
    eager_step()
    t = interleaved([eager_step, stock_step, patched_step, plain_step], args.rounds,
                    max(args.min_run_time, 2.0))
    print(f"\n### torchvision {args.model} training step ({args.model_input}, SGD)\n")
    print("| eager ms | compiled, stock ms | compiled, patched ms | compiled, "
          "layout_optimization=False ms |")
    print("|---|---|---|---|")
    print(f"| {ms(t[0])} | {ms(t[1])} ({t[1] / t[0]:.2f}x eager) | {ms(t[2])} "
          f"({t[2] / t[0]:.2f}x) | {ms(t[3])} ({t[3] / t[0]:.2f}x) |")
    if args.reps:
        reps = max(1, args.reps // 2)
        profile_table(eager_step, reps, f"{args.model} step, eager", args.top)
        profile_table(stock_step, reps, f"{args.model} step, compiled (stock)", args.top)
        copy_breakdown(eager_step, "eager")
        copy_breakdown(stock_step, "compiled (stock)")


def copy_breakdown(fn, title):
    """aten::copy_ per step by the op that called it, and by the copied tensor's shape."""
    from collections import Counter
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    by_caller, by_shape = Counter(), Counter()
    for e in prof.events():
        if e.name != "aten::copy_":
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 3:
            chain.append(parent.name)
            parent = parent.cpu_parent
        by_caller[" <- ".join(chain) or "(top level)"] += e.self_cpu_time_total
        by_shape[str(e.input_shapes[0]) if e.input_shapes else "?"] += e.self_cpu_time_total
    total = sum(by_caller.values())
    print(f"\n{title}: aten::copy_ {total / 1e3:.2f} ms per step\n")
    print("| called from | ms |")
    print("|---|---|")
    for caller, t in by_caller.most_common(4):
        print(f"| {caller} | {t / 1e3:.2f} |")
    print("\n| copied tensor | ms |")
    print("|---|---|")
    for shape, t in by_shape.most_common(4):
        print(f"| {shape} | {t / 1e3:.2f} |")


def exp_repeat(args, shape):
    """The compiled case, forward + backward, over and over for --min-run-time seconds:
    something for `perf record` to sample (see COMPILE.md)."""
    import time
    for case in args.cases:
        module, xs, extra, grad = build(case, shape)
        step = step_fn(compiled(module), xs, extra, grad)
        step()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < args.min_run_time:
            step()
            calls += 1
        print(f"{case}: {calls} compiled forward + backward calls, "
              f"{(time.perf_counter() - start) / calls * 1e3:.1f} ms each")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS,
                        default=["kernels", "signs", "patch", "var_mean"],
                        help="which experiments (see above)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["relu", "bn", "bn_relu"],
                        help="cases of the kernels and patch experiments")
    parser.add_argument("--shape", default="16x64x112x112", help="N x C x H x W")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--min-run-time", type=float, default=0.5,
                        help="seconds per timing (blocked_autorange)")
    parser.add_argument("--reps", type=int, default=5, help="profiled steps per table")
    parser.add_argument("--top", type=int, default=8, help="rows per profile table")
    parser.add_argument("--model", default="resnet18", help="model experiment: a torchvision "
                        "model name")
    parser.add_argument("--model-input", default="16x3x112x112", help="model experiment: input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.compiler.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    shape = parse_shape(args.shape)
    allocator = "warm" if all(os.environ.get(k) == v for k, v in WARM_ENV.items()) else "default"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {allocator} "
          f"allocator, Inductor vector ISA: {torch._inductor.cpu_vec_isa.pick_vec_isa()}")
    for name in args.experiments:
        globals()[f"exp_{name}"](args, shape)


if __name__ == "__main__":
    main()
