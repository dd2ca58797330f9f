"""ONNX export, with both of torch.onnx.export's exporters; the graph is what the exporter
makes of a native batch norm: one BatchNormalization.

dynamo=True (torch.export, then a translation per operator): while torch.onnx.export
captures the model, our modules and batch_norm emit the BatchNormalization themselves,
with torch.onnx.ops.symbolic, in place of our operators.  (The exporter builds its table
of translations before the capture, from its own registries, so a translation of ours
registered then would come too late for a plain call; torch.onnx.ops.symbolic under
torch.onnx.is_in_onnx_export() is torch's way for a model's code.)  An ExportedProgram made
beforehand holds our operators: pass custom_translation_table=onnx_translation_table().

dynamo=False (TorchScript tracing, then a symbolic function per operator): the composite
batchnorm_ext::batch_norm has a symbolic function, torch's own for aten::batch_norm,
registered when batchnorm_ext is imported.
"""
import torch


def exporting():
    """Whether torch.onnx.export(dynamo=True) is capturing the model."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def batch_norm(input, weight, bias, running_mean, running_var, training, eps):
    """The BatchNormalization torch's exporter makes of torch.nn.functional.batch_norm
    with these arguments (onnxscript's torchlib, aten_native_batch_norm): in inference
    mode, with the running statistics if there are (in training too: torchlib forces
    training=False, "a temporary fix", and the running statistics are not updated), else
    with the batch statistics computed before it."""
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    given = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    param_dtype = given[0].dtype if given else input.dtype
    channels = input.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=param_dtype, device=input.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=param_dtype, device=input.device)
    if running_mean is None:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        running_var = (input - mean).square().mean(dims).to(param_dtype)
        running_mean = mean.flatten().to(param_dtype)
    # momentum (ONNX's is 1 - torch's) weighs only an update that inference mode does not make.
    return torch.onnx.ops.symbolic(
        "BatchNormalization", (input, weight, bias, running_mean, running_var),
        {"epsilon": float(eps), "momentum": 0.9}, dtype=input.dtype, shape=input.shape)


def onnx_translation_table():
    """Our operators' ONNX translations, for torch.onnx.export(exported_program,
    dynamo=True, custom_translation_table=batchnorm_ext.onnx_translation_table()) of a
    program that torch.export made beforehand (a model needs none).  Needs onnxscript."""
    from . import _onnx_translations
    return dict(_onnx_translations.TABLE)


def register_torchscript_symbolic():
    """The TorchScript-based exporter's symbolic function for batchnorm_ext::batch_norm:
    torch's for aten::batch_norm (opset 9, and 14 with training_mode), whose arguments this
    operator has, but for momentum=None and num_batches_tracked."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9, symbolic_opset14

    def symbolic_for(native):
        @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "v", "f", "v")
        def symbolic(g, input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked):
            # momentum=None (a cumulative average) only weighs the running statistics'
            # update, which the exported graph does not return (as for torch's modules).
            factor = (0.0 if symbolic_helper._is_none(momentum)
                      else symbolic_helper._parse_arg(momentum, "f"))
            return native(g, input, weight, bias, running_mean, running_var, training, factor,
                          eps, False)
        return symbolic

    def fused_symbolic_for(native):
        # batch_norm_act: the batch norm as above, then the residual add and the activation.
        @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "v", "f", "v", "v", "s")
        def symbolic(g, input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked, residual, activation):
            factor = (0.0 if symbolic_helper._is_none(momentum)
                      else symbolic_helper._parse_arg(momentum, "f"))
            out = native(g, input, weight, bias, running_mean, running_var, training, factor,
                         eps, False)
            if not symbolic_helper._is_none(residual):
                out = g.op("Add", out, residual)
            if activation == "relu":
                out = g.op("Relu", out)
            elif activation == "silu":
                out = g.op("Mul", out, g.op("Sigmoid", out))
            return out
        return symbolic

    for opset, native in [(9, symbolic_opset9.batch_norm), (14, symbolic_opset14.batch_norm)]:
        register_custom_op_symbolic("batchnorm_ext::batch_norm", symbolic_for(native), opset)
        register_custom_op_symbolic("batchnorm_ext::batch_norm_act", fused_symbolic_for(native),
                                    opset)
