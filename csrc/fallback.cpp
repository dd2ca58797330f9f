// The operators on every device but the CPU (CUDA, XPU, ...): torch's own batch norm,
// at::native_batch_norm and its backward, with the float64 batch statistics our operators
// return computed beside it.  Registered as CompositeExplicitAutograd, which the CPU
// kernels (batch_norm_cpu.cpp) override on the CPU, and the fake kernels on the meta
// device; autograd stays autograd.cpp's.  So a converted model moved to a GPU gives
// native's results there, through the same operators (torch.compile and torch.export
// included).  Devices without float64 (MPS) cannot hold the statistics and are not served.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace batchnorm_ext {

using at::Tensor;
using std::optional;

namespace {

using Result3 = std::tuple<Tensor, Tensor, Tensor>;

// The dimensions a channel's statistics reduce over: all but 1.
std::vector<int64_t> reduce_dims(const Tensor& input) {
  std::vector<int64_t> dims = {0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

// (1, C, 1, ...): a per-channel tensor that broadcasts against the input.
Tensor per_channel(const Tensor& t, const Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = -1;
  return t.reshape(shape);
}

// The memory format of the outputs of batch_norm_apply and batch_norm_backward_apply, by
// the rule of the CPU operators and the fake kernels (native's, batch_norm_cpu.cpp): a
// dense input keeps its format when the `others` given (parameters, grad_output) are
// contiguous, or dense in the same format; else suggest_memory_format().
at::MemoryFormat output_format(const Tensor& input, std::initializer_list<Tensor> others) {
  const auto dense = [](const Tensor& t) {
    return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
           t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  };
  bool keep = dense(input);
  for (const Tensor& t : others) {
    if (!t.defined()) continue;
    const bool same_format = dense(t) && t.suggest_memory_format() == input.suggest_memory_format();
    keep = keep && (t.dim() == 1 ? t.is_contiguous() : same_format);
  }
  if (!keep) return input.suggest_memory_format();
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  return input.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? at::MemoryFormat::ChannelsLast3d
                                                               : at::MemoryFormat::ChannelsLast;
}

// float64 mean and biased variance per channel (zeros for an empty input, as the CPU kernel).
std::tuple<Tensor, Tensor> batch_statistics(const Tensor& input) {
  if (input.numel() == 0) {
    Tensor zeros = at::zeros({input.size(1)}, input.options().dtype(at::kDouble));
    return {zeros, zeros.clone()};
  }
  auto [var, mean] = at::var_mean(input.to(at::kDouble), reduce_dims(input), /*correction=*/0);
  return {mean, var};
}

Result3 forward(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                bool training, double eps) {
  check_inputs(input, weight, bias, running_mean, running_var, training);
  if (!training) {
    Tensor output = std::get<0>(
        at::native_batch_norm(input, weight, bias, running_mean, running_var, false, 0.0, eps));
    Tensor empty = at::empty({0}, input.options().dtype(at::kDouble));
    return {output, empty, empty.clone()};
  }
  // Normalized by native's own batch statistics; ours, in float64, are for the backward
  // and the running statistics.
  Tensor output = std::get<0>(
      at::native_batch_norm(input, weight, bias, std::nullopt, std::nullopt, true, 0.0, eps));
  auto [mean, var] = batch_statistics(input);
  return {output, mean, var};
}

Result3 backward(const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
                 const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                 const Tensor& save_mean, const Tensor& save_var, bool training, double eps,
                 std::array<bool, 3> mask, optional<c10::ScalarType> param_dtype) {
  check_inputs(input, weight, std::nullopt, running_mean, running_var, training);
  // Native's backward takes the saved mean and 1 / sqrt(var + eps) in the opmath type.
  const auto opmath = at::toOpMathType(input.scalar_type());
  optional<Tensor> mean, invstd;
  if (training) {
    mean = save_mean.to(opmath);
    invstd = (save_var + eps).rsqrt().to(opmath);
  }
  auto [grad_input, grad_weight, grad_bias] = at::native_batch_norm_backward(
      grad_output, input, weight, running_mean, running_var, mean, invstd, training, eps, mask);
  const auto type = given(weight) ? weight->scalar_type() : param_dtype.value_or(input.scalar_type());
  if (grad_weight.defined()) grad_weight = grad_weight.to(type);
  if (grad_bias.defined()) grad_bias = grad_bias.to(type);
  return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(),
          mask[2] ? grad_bias : Tensor()};
}

// running = f * batch + (1 - f) * running with the unbiased variance; f = momentum, or
// 1 / num_batches_tracked (read on the device: no host round trip).
void update_running_stats(Tensor& running_mean, Tensor& running_var, const Tensor& batch_mean,
                          const Tensor& batch_var, int64_t count, optional<double> momentum,
                          const optional<Tensor>& num_batches_tracked) {
  TORCH_CHECK(momentum.has_value() || given(num_batches_tracked),
              "update_running_stats_: momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(batch_mean.scalar_type() == at::kDouble && batch_var.scalar_type() == at::kDouble,
              "update_running_stats_: the batch statistics must be float64");
  const Tensor factor = momentum.has_value()
                            ? at::scalar_tensor(*momentum, batch_mean.options())
                            : num_batches_tracked->to(at::kDouble).reciprocal();
  const Tensor unbiased = batch_var * (double(count) / double(count - 1));
  running_mean.copy_(at::lerp(running_mean.to(at::kDouble), batch_mean, factor));
  running_var.copy_(at::lerp(running_var.to(at::kDouble), unbiased, factor));
}

// SyncBatchNorm's steps (csrc/ops.cpp), as ATen operations in the opmath type.

void check_batch_statistics(const Tensor& input, const Tensor& mean, const Tensor& var) {
  TORCH_CHECK(mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble &&
                  mean.numel() == input.size(1) && var.numel() == input.size(1),
              "batch statistics must be float64 tensors of ", input.size(1), " elements");
}

std::tuple<Tensor, Tensor> stats(const Tensor& input) {
  check_inputs(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  return batch_statistics(input);
}

// (input - mean) / sqrt(var + eps) * weight + bias, in the opmath type; float64 statistics.
Tensor normalized(const Tensor& input, const optional<Tensor>& weight,
                  const optional<Tensor>& bias, const Tensor& mean, const Tensor& var,
                  double eps) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  const Tensor invstd = (var + eps).rsqrt();
  Tensor scale = given(weight) ? invstd * weight->to(at::kDouble) : invstd;
  Tensor shift = -mean * scale;
  if (given(bias)) shift = shift + bias->to(at::kDouble);
  return input.to(opmath) * per_channel(scale.to(opmath), input) +
         per_channel(shift.to(opmath), input);
}

Tensor apply(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
             const Tensor& mean, const Tensor& var, double eps) {
  check_inputs(input, weight, bias, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  return normalized(input, weight, bias, mean, var, eps)
      .to(input.scalar_type())
      .contiguous(output_format(input, {weight.value_or(Tensor()), bias.value_or(Tensor())}));
}

Tensor backward_reduce(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                       const Tensor& var, double eps) {
  check_inputs(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  const auto dims = reduce_dims(input);
  const Tensor dy = grad_output.to(at::kDouble);
  const Tensor centred = input.to(at::kDouble) - per_channel(mean, input);
  return at::stack({dy.sum(dims), (dy * centred).sum(dims)});
}

Tensor backward_apply(const Tensor& grad_output, const Tensor& input,
                      const optional<Tensor>& weight, const Tensor& mean, const Tensor& var,
                      const Tensor& sums, int64_t count, double eps) {
  check_inputs(input, weight, std::nullopt, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  // grad_input = (dy - sum(dy) / n - (x - mean) * invstd^2 * sum(dy * (x - mean)) / n)
  //              * invstd * weight
  const auto opmath = at::toOpMathType(input.scalar_type());
  const Tensor invstd = (var + eps).rsqrt();
  const Tensor w = given(weight) ? weight->to(at::kDouble) : at::ones_like(invstd);
  const Tensor dy_mean = sums[0] / double(count);
  const Tensor projection = invstd * invstd * sums[1] / double(count);
  const Tensor centred = input.to(opmath) - per_channel(mean.to(opmath), input);
  Tensor grad_input = (grad_output.to(opmath) - per_channel(dy_mean.to(opmath), input) -
                       centred * per_channel(projection.to(opmath), input)) *
                      per_channel((invstd * w).to(opmath), input);
  return grad_input.to(input.scalar_type()).contiguous(output_format(input, {grad_output}));
}

// The fused operators (batch_norm_act): activation(batch_norm(input) + residual).

void check_activation(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "identity" || activation == "relu" || activation == "silu",
                    "batch_norm: activation must be 'identity', 'relu' or 'silu', got '",
                    std::string(activation), "'");
}

void check_like_input(const Tensor& input, const Tensor& t, const char* what) {
  TORCH_CHECK(t.sizes() == input.sizes(), "batch_norm: ", what, " of size ", t.sizes(),
              " does not match input of size ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type() && t.device() == input.device(),
              "batch_norm: ", what, " must have the input's dtype and device");
}

Result3 act_forward(const Tensor& input, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                    const optional<Tensor>& running_var, bool training, double eps,
                    const optional<Tensor>& residual, c10::string_view activation) {
  check_activation(activation);
  if (given(residual)) check_like_input(input, *residual, "residual");
  auto [output, mean, var] = forward(input, weight, bias, running_mean, running_var, training, eps);
  if (given(residual)) output = output + *residual;
  if (activation == "relu") output = at::relu(output);
  if (activation == "silu") output = at::silu(output);
  return {output, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> act_backward(
    const Tensor& grad_output, const optional<Tensor>& output, const Tensor& input,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const Tensor& save_mean, const Tensor& save_var, bool training, double eps,
    const optional<Tensor>& residual, bool has_residual, c10::string_view activation,
    std::array<bool, 4> mask, optional<c10::ScalarType> param_dtype) {
  check_activation(activation);
  // dz: the gradient at the activation's input z = batch_norm(input) + residual.
  Tensor dz = grad_output;
  if (activation == "relu") {
    TORCH_CHECK(given(output), "batch_norm_act_backward: the relu backward needs the forward's output");
    dz = at::threshold_backward(grad_output, *output, 0);
  } else if (activation == "silu") {
    TORCH_CHECK(!has_residual || given(residual),
                "batch_norm_act_backward: the silu backward needs the forward's residual");
    const Tensor mean = training ? save_mean : running_mean->to(at::kDouble);
    const Tensor var = training ? save_var : running_var->to(at::kDouble);
    Tensor z = normalized(input, weight, bias, mean, var, eps);
    if (has_residual) z = z + *residual;
    dz = at::silu_backward(grad_output, z.to(input.scalar_type()));
  }
  auto [grad_input, grad_weight, grad_bias] =
      backward(dz, input, weight, running_mean, running_var, save_mean, save_var, training, eps,
               {mask[0], mask[1], mask[2]}, param_dtype);
  Tensor grad_residual;
  if (has_residual && mask[3]) grad_residual = dz.is_same(grad_output) ? dz.clone() : dz;
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(batchnorm_ext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_forward", &forward);
  m.impl("batch_norm_backward", &backward);
  m.impl("update_running_stats_", &update_running_stats);
  m.impl("batch_norm_stats", &stats);
  m.impl("batch_norm_apply", &apply);
  m.impl("batch_norm_backward_reduce", &backward_reduce);
  m.impl("batch_norm_backward_apply", &backward_apply);
  m.impl("batch_norm_act_forward", &act_forward);
  m.impl("batch_norm_act_backward", &act_backward);
}

}  // namespace batchnorm_ext
