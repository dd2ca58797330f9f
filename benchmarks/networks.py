"""Real models' training steps (torchvision, through tests/zoo.py), in the variants of
benchmarks/variants.py: forward, cross-entropy loss, backward, SGD step; and their eval
forward (no_grad; every compiled variant with Inductor's freezing, which folds native batch
norms into the convolutions).

Dropout is set to p=0 (mobilenet_v3's classifier) so that every variant computes the same
step.  Before timing, one step's loss and gradient of each variant (from the same weights)
are compared with a float64 computation of that step, beside native eager's: ours must be
about as close to it as native (see NetworkCase.check).
"""
import copy
import time

import torch

import batchnorm_ext
from harness import (check_variant, fuse_missing, interleaved, note, parse_shape, progress,
                     relative_error)
from layers import torchvision
from variants import COMPILED, VARIANTS, prepare

NETWORKS = ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"]
MODES = ["train", "eval"]
DEFAULT_INPUT = "16x3x112x112"
NUM_CLASSES = 100


def build(name, tv, layout, mode):
    """The model, with dropout and stochastic depth off in training (every variant then
    computes the same step)."""
    model = getattr(tv.models, name)(num_classes=NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, tv.ops.StochasticDepth):
            m.p = 0.0
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return model.to(memory_format=fmt).train(mode == "train")


class NetworkCase:
    def __init__(self, name, shape, layout, dtype, lr, tv, mode="train"):
        self.name, self.shape, self.layout, self.dtype, self.mode = name, shape, layout, dtype, mode
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        self.autocast = dtype == "bfloat16-mixed"
        native = build(name, tv, layout, mode)
        self.x = torch.randn(shape).contiguous(memory_format=fmt)
        self.target = torch.randint(0, NUM_CLASSES, (shape[0],))
        self.names = [n for n, _ in native.named_parameters()]
        self.notes = {}
        self.modules = {"native": native}
        self.callables = {"native": native}
        for variant in VARIANTS[1:]:
            if variant in ("ours_fused", "fused_compiled") and fuse_missing(batchnorm_ext):
                self.notes[variant] = fuse_missing(batchnorm_ext)
                continue
            self.modules[variant], self.callables[variant] = prepare(
                variant, copy.deepcopy(native), freezing=mode == "eval")
        self.optimizers = {v: torch.optim.SGD(m.parameters(), lr=lr)
                           for v, m in self.modules.items()}

    def loss_and_grads(self, variant, model=None, x=None, autocast=None):
        """One forward + backward from the current weights, no optimizer step."""
        module = model if model is not None else self.modules[variant]
        call = model if model is not None else self.callables[variant]
        x = self.x if x is None else x
        autocast = self.autocast if autocast is None else autocast
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = call(x)
        loss = torch.nn.functional.cross_entropy(logits.to(x.dtype), self.target)
        loss.backward()
        params = dict(module.named_parameters())
        grads = torch.cat([params[n].grad.detach().flatten().double() for n in self.names])
        module.zero_grad(set_to_none=True)
        return loss.item(), grads

    def eval_output(self, variant, model=None, x=None):
        call = model if model is not None else self.callables[variant]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=self.autocast and model is None):
            return call(self.x if x is None else x).double()

    def oracle(self):
        """Loss and gradient of the same step (in eval: the output) in float64 (no
        autocast), computed once."""
        if not hasattr(self, "_oracle"):
            model = copy.deepcopy(self.modules["native"]).double()
            if self.mode == "eval":
                self._oracle = self.eval_output(None, model, self.x.double())
            else:
                self._oracle = self.loss_and_grads(None, model, self.x.double(), autocast=False)
            del model
        return self._oracle

    def error(self, variant):
        """In training, the worse of the loss's and the whole gradient's (every parameter's,
        as one vector) relative error against float64; in eval, the output's."""
        if self.mode == "eval":
            return relative_error(self.oracle(), self.eval_output(variant))
        ref_loss, ref_grads = self.oracle()
        states = {v: copy.deepcopy(m.state_dict()) for v, m in self.modules.items()}
        loss, grads = self.loss_and_grads(variant)
        for v, m in self.modules.items():  # running statistics as they were
            m.load_state_dict(states[v])
        return max(abs(loss - ref_loss) / abs(ref_loss), relative_error(ref_grads, grads))

    def check(self, variant, errors):
        """One step's loss and gradient (in eval, the output) against float64, from the
        same weights, beside native's (harness.check_variant).  Not against native's bits:
        a float32 training step of a deep network lands 1e-3 to 1e-2 (relative) from
        float64, whichever implementation computes it (resnet18 at 16x3x112x112, seeds 0,
        1, 2: native eager 1.3e-3, 7.4e-3, 2.2e-3; native compiled 7.4e-4, 4.8e-3, 8.4e-3)."""
        if "native" not in errors:
            errors["native"] = self.error("native")
        errors[variant] = self.error(variant)
        check_variant(errors, variant, 1e-1 if self.autocast else 1e-2,
                      f"{self.name} {self.describe()}")

    def step(self, variant):
        if variant not in self.callables:
            return None
        model, optimizer = self.callables[variant], self.optimizers[variant]
        x, target, autocast = self.x, self.target, self.autocast

        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
            torch.nn.functional.cross_entropy(logits.float(), target).backward()
            optimizer.step()

        def infer():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x)
        return infer if self.mode == "eval" else run

    def describe(self):
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype} {self.mode}"


def run_networks(args, alloc):
    torch.set_num_threads(args.threads)
    tv = torchvision()
    shapes = args.shapes or [DEFAULT_INPUT]
    modes = [m for m in (args.modes or MODES) if m in MODES]
    cases = [(name, shape, layout, dtype, mode) for name in args.networks for shape in shapes
             for mode in modes for layout in args.layouts for dtype in args.dtypes]
    rows = []
    bar = progress(cases, f"networks, allocator={alloc}", "model")
    for name, shape, layout, dtype, mode in bar:
        torch._dynamo.reset()
        torch.manual_seed(0)
        case = NetworkCase(name, parse_shape(shape), layout, dtype, args.lr, tv, mode)
        compile_s, errors = {}, {}
        for variant in VARIANTS[1:]:
            if variant not in case.callables:
                continue
            compiling = variant in COMPILED
            note(bar, f"{name} {mode}: checking {variant}" + (" (compiling)" if compiling else ""))
            start = time.perf_counter()
            case.check(variant, errors)
            if compiling:
                compile_s[variant] = time.perf_counter() - start
        note(bar, f"{name} {mode}: timing")
        times = interleaved([case.step(v) for v in VARIANTS], args.rounds, args.min_run_time)
        row = {"kind": "networks", "case": name, "shape": shape, "layout": layout,
               "dtype": dtype, "mode": "training step (SGD)" if mode == "train" else
               "eval forward (no_grad; compiled with freezing)", "allocator": alloc}
        for variant, t in zip(VARIANTS, times):
            row[f"{variant}_ms"] = None if t is None else t * 1e3
        row["speedup"] = row["native_ms"] / row["ours_ms"]
        row["notes"] = case.notes
        row["compile_s"] = compile_s
        row["check_rel_error"] = errors
        rows.append(row)
        del case
    torch._dynamo.reset()
    return rows
