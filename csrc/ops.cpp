// The operator schemas.  Kernels are registered elsewhere: CPU in batch_norm_cpu.cpp;
// CompositeImplicitAutograd (and its decomposition under vmap) and batch_norm_backward's
// Autograd in autograd.cpp; in Python, batch_norm_forward's Autograd
// (batchnorm_ext/_autograd.py), the vmap rules (batchnorm_ext/_vmap.py) and the fake (meta)
// kernels (batchnorm_ext/_ops.py).
#include <torch/library.h>

// The kernels take any strides (what is neither NCHW nor channels-last dense is copied
// first) and choose their outputs' memory format by native's rules, which the fake
// kernels tell too: flexible_layout lets Inductor pass tensors
// in the layout it chose (channels-last after its layout optimization) instead of copying
// them into the strides the traced graph had.
static const std::vector<at::Tag> kAnyLayout = {at::Tag::flexible_layout};

TORCH_LIBRARY(batchnorm_ext, m) {
  // Normalizes `input` (N, C, *) per channel.  Functional: returns the batch mean and the
  // biased batch variance in float64 (training) or two empty tensors (eval), and leaves
  // the running statistics alone; update_running_stats_ updates them.
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)",
      kAnyLayout);

  // Gradients of batch_norm_forward with respect to input, weight and bias; output_mask
  // says which ones are wanted (the others come back undefined).  param_dtype: the dtype
  // of the parameters in the forward, for when no tensor here tells it (only a bias was
  // given, which the backward does not need).
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor save_mean, Tensor save_var, "
      "bool training, float eps, bool[3] output_mask, ScalarType? param_dtype=None) -> "
      "(Tensor, Tensor, Tensor)",
      kAnyLayout);

  // running = (1 - f) * running + f * batch, with the unbiased variance (count / (count - 1)).
  // f = momentum, or 1 / num_batches_tracked (a cumulative average) when momentum is None.
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor batch_mean, Tensor batch_var, SymInt count, float? momentum, "
      "Tensor? num_batches_tracked) -> ()");

  // SyncBatchNorm's steps (batchnorm_ext/sync.py), each one phase of the kernels:
  // the batch statistics of this process (float64 mean and biased variance); normalizing
  // with the statistics of the whole batch; the backward sums (2, C) of this process; and
  // grad_input from the sums of the whole batch, `count` values per channel.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)",
      kAnyLayout);
  m.def(
      "batch_norm_apply(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "float eps) -> Tensor",
      kAnyLayout);
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor var, "
      "float eps) -> Tensor",
      kAnyLayout);
  m.def(
      "batch_norm_backward_apply(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor var, Tensor sums, SymInt count, float eps) -> Tensor",
      kAnyLayout);

  // Fused batch norm: output = activation(batch_norm(input) + residual), activation one of
  // 'identity', 'relu', 'silu', residual (shaped as input) optional; otherwise as
  // batch_norm_forward.  The backward returns the gradients with respect to input, weight,
  // bias and residual (output_mask says which); it takes the forward's output (read by
  // relu's backward), its residual (read by silu's, which recomputes the value before the
  // activation) and bias (silu's too), and whether there was a residual.
  m.def(
      "batch_norm_act_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, Tensor? residual, str activation) -> "
      "(Tensor, Tensor, Tensor)",
      kAnyLayout);
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor? output, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor save_mean, "
      "Tensor save_var, bool training, float eps, Tensor? residual, bool has_residual, "
      "str activation, bool[4] output_mask, ScalarType? param_dtype=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)",
      kAnyLayout);

  // What torch.nn.functional.batch_norm does, in one call: checks, forward, and in
  // training the update of the running statistics.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float? momentum, float eps, "
      "Tensor? num_batches_tracked=None) -> Tensor");

  // batch_norm followed by activation(... + residual) ('identity', 'relu' or 'silu'), in
  // one pass over memory: batch_norm_act_forward, and the update of batch_norm.
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float? momentum, float eps, "
      "Tensor? num_batches_tracked=None, Tensor? residual=None, str activation='relu') -> Tensor");
}
