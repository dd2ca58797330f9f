// The CPU operators: they check their arguments, bring the input into a layout the kernels
// read (contiguous or channels-last), allocate the outputs and call the kernels chosen for
// this CPU (cpu/dispatch.cpp).
#include "checks.h"
#include "cpu/kernel_api.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace batchnorm_ext {

using at::Tensor;
using std::optional;

namespace {

const char* name_of(c10::ScalarType t) { return c10::toString(t); }

void check_parameter(const Tensor& input, const optional<Tensor>& param, const char* what) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->device() == input.device(), "Tensor on device ", param->device(),
              " is not on the expected device ", input.device(), "!");
  const c10::SymInt channels = input.dim() > 1 ? input.sym_size(1) : c10::SymInt(0);
  TORCH_CHECK(param->sym_numel() == channels, what, " should contain ", channels,
              " elements not ", param->sym_numel());
}



}  // namespace

// In native's order, so that a call with several things wrong raises what native raises.
c10::ScalarType check_inputs(const Tensor& input, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                             const optional<Tensor>& running_var, bool training) {
  // 1. Devices and sizes.
  check_parameter(input, weight, "weight");
  check_parameter(input, bias, "bias");
  check_parameter(input, running_mean, "running_mean");
  check_parameter(input, running_var, "running_var");

  // 2. Running statistics: both needed in eval, both or neither in training.
  if (!training) {
    TORCH_CHECK(given(running_mean), "running_mean must be defined in evaluation mode");
    TORCH_CHECK(given(running_var), "running_var must be defined in evaluation mode");
  } else {
    TORCH_CHECK_VALUE(given(running_mean) == given(running_var),
                      "running_mean and running_var must either both be None or neither be None");
  }

  // 3. dtypes.  The parameter dtype is that of the first one given; "mixed" when it is not
  // the input's.
  const c10::ScalarType input_type = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      input_type == at::kFloat || input_type == at::kDouble || input_type == at::kBFloat16 ||
          input_type == at::kHalf,
      "\"batch_norm\" not implemented for '", name_of(input_type), "'");
  const optional<Tensor>* params[] = {&weight, &bias, &running_mean, &running_var};
  optional<c10::ScalarType> param_type;
  for (const optional<Tensor>* p : params) {
    if (given(*p) && !param_type) param_type = (*p)->scalar_type();
  }
  c10::ScalarType result = input_type;
  if (!param_type || *param_type == input_type) {
    for (const optional<Tensor>* p : params) {
      if (given(*p)) {
        TORCH_CHECK((*p)->scalar_type() == input_type, "expected scalar type ",
                    name_of(input_type), " but found ", name_of((*p)->scalar_type()));
      }
    }
  } else {
    for (const optional<Tensor>* p : params) {
      if (given(*p)) {
        TORCH_CHECK((*p)->scalar_type() == at::kFloat,
                    "mixed dtype (CPU): expect parameter to have scalar type of Float");
      }
    }
    TORCH_CHECK(input_type == at::kBFloat16 || input_type == at::kHalf,
                "mixed dtype (CPU): all inputs must share same datatype.");
    result = at::kFloat;
  }

  // 4. Shapes: running statistics one-dimensional (native reads them so), input (N, C, *).
  for (const auto& [stat, what] : {std::pair{&running_mean, "running_mean"},
                                   std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(!given(*stat) || (*stat)->dim() == 1, what,
                " must be one-dimensional, but got shape ", (*stat)->sym_sizes());
  }
  TORCH_CHECK_INDEX(input.dim() >= 2, "batch_norm: expected input of shape (N, C, *) with at ",
                    "least 2 dimensions, but got a ", input.dim(), "-D input of size ",
                    input.sym_sizes());
  return result;
}

namespace {

// The memory format of the output, by native's rule (batch_norm_cpu in ATen's
// Normalization.cpp): an input dense in some format, with contiguous parameters, keeps that
// format, and strides that are more than one format at once (size-1 dimensions) count as
// contiguous first, then channels-last-3d, then channels-last; anything else gets
// suggest_memory_format().  The kernels then read the input in that format.
bool dense(const Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

at::MemoryFormat format_of_dense(const Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? at::MemoryFormat::ChannelsLast3d
                                                           : at::MemoryFormat::ChannelsLast;
}

at::MemoryFormat output_format(const Tensor& input,
                               std::initializer_list<const optional<Tensor>*> params) {
  bool all_dense = dense(input);
  for (const optional<Tensor>* p : params) all_dense = all_dense && (!given(*p) || (*p)->is_contiguous());
  return all_dense ? format_of_dense(input) : input.suggest_memory_format();
}

// The same for grad_input (batch_norm_backward_cpu_template): the input's format when input
// and grad_output are both dense and suggest the same one.
at::MemoryFormat grad_format(const Tensor& input, const Tensor& grad_output) {
  const bool both_dense = dense(input) && dense(grad_output) &&
                          input.suggest_memory_format() == grad_output.suggest_memory_format();
  return both_dense ? format_of_dense(input) : input.suggest_memory_format();
}

// A parameter as a contiguous tensor for the kernels, or nullptr when absent.
Tensor contiguous_or_undefined(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The layout the kernels read, for a tensor already contiguous in `format`.
cpu::Geometry geometry_of(const Tensor& x, at::MemoryFormat format) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t inner = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  // Rows of C values: channels-last memory, and any tensor with nothing after C.
  const bool channels_last = format != at::MemoryFormat::Contiguous || inner == 1;
  return {channels_last ? cpu::Layout::ChannelsLast : cpu::Layout::ChannelsFirst, batch,
          channels, inner};
}

// The arguments every forward kernel call has: x contiguous in `format`, and (optional,
// already contiguous) weight and bias.  Callers add the rest.
cpu::ForwardArgs forward_args(const Tensor& x, at::MemoryFormat format, c10::ScalarType param_type,
                              Tensor* output, const Tensor& weight, const Tensor& bias,
                              double eps, bool training) {
  cpu::ForwardArgs args{};
  args.geometry = geometry_of(x, format);
  args.input_type = x.scalar_type();
  args.param_type = param_type;
  args.input = x.const_data_ptr();
  args.output = output ? output->mutable_data_ptr() : nullptr;
  args.weight = data_or_null(weight);
  args.bias = data_or_null(bias);
  args.eps = eps;
  args.training = training;
  return args;
}

// The same for the backward: dy and x contiguous in `format`; the statistics are the
// batch ones (training, float64) or the running ones (eval).
cpu::BackwardArgs backward_args(const Tensor& dy, const Tensor& x, at::MemoryFormat format,
                                c10::ScalarType param_type, const Tensor& weight,
                                const Tensor& mean, const Tensor& var, double eps, bool training) {
  cpu::BackwardArgs args{};
  args.geometry = geometry_of(x, format);
  args.input_type = x.scalar_type();
  args.param_type = param_type;
  args.grad_output = dy.const_data_ptr();
  args.input = x.const_data_ptr();
  args.weight = data_or_null(weight);
  args.eps = eps;
  args.training = training;
  (training ? args.save_mean : args.running_mean) = data_or_null(mean);
  (training ? args.save_var : args.running_var) = data_or_null(var);
  return args;
}

// The activation of a fused batch norm, by name (the schemas take a string).
cpu::Activation activation_named(c10::string_view name) {
  if (name == "identity") return cpu::Activation::Identity;
  if (name == "relu") return cpu::Activation::ReLU;
  if (name == "silu") return cpu::Activation::SiLU;
  TORCH_CHECK_VALUE(false, "batch_norm: activation must be 'identity', 'relu' or 'silu', got '",
                    std::string(name), "'");
}

// A residual (or a saved output) goes with the input: same sizes, dtype and device, read
// in the input's layout.
void check_like_input(const Tensor& input, const Tensor& t, const char* what) {
  TORCH_CHECK(t.sizes() == input.sizes(), "batch_norm: ", what, " of size ", t.sizes(),
              " does not match input of size ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "batch_norm: ", what, " has dtype ",
              t.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "batch_norm: ", what, " is on ", t.device(),
              " but input is on ", input.device());
}

// The training or eval forward, with an optional fused epilogue: output =
// activation(batch_norm(input) + residual).
std::tuple<Tensor, Tensor, Tensor> forward_with_epilogue(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
    double eps, const optional<Tensor>& residual, cpu::Activation activation) {
  const c10::ScalarType param_type =
      check_inputs(input, weight, bias, running_mean, running_var, training);
  if (given(residual)) check_like_input(input, *residual, "residual");

  const at::MemoryFormat format = output_format(input, {&weight, &bias, &running_mean, &running_var});
  const Tensor x = input.contiguous(format);
  const Tensor r = given(residual) ? residual->contiguous(format) : Tensor();
  Tensor output = at::empty_like(x, format);
  const auto stat_options = input.options().dtype(at::kDouble);
  const int64_t channels = input.size(1);
  Tensor save_mean = at::empty({training ? channels : 0}, stat_options);
  Tensor save_var = at::empty({training ? channels : 0}, stat_options);
  // An empty input goes to the kernels too: they write NaN statistics (of nothing) and
  // nothing else.
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const Tensor rm = training ? Tensor() : contiguous_or_undefined(running_mean);
  const Tensor rv = training ? Tensor() : contiguous_or_undefined(running_var);
  cpu::ForwardArgs args = forward_args(x, format, param_type, &output, w, b, eps, training);
  args.save_mean = training ? save_mean.mutable_data_ptr() : nullptr;
  args.save_var = training ? save_var.mutable_data_ptr() : nullptr;
  args.running_mean = data_or_null(rm);
  args.running_var = data_or_null(rv);
  args.residual = data_or_null(r);
  args.activation = activation;
  cpu::active_kernels().forward(args);
  return {output, save_mean, save_var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
    double eps) {
  return forward_with_epilogue(input, weight, bias, running_mean, running_var, training, eps,
                               std::nullopt, cpu::Activation::Identity);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_forward_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
    double eps, const optional<Tensor>& residual, c10::string_view activation) {
  const cpu::Activation act = activation_named(activation);
  return forward_with_epilogue(input, weight, bias, running_mean, running_var, training, eps,
                               residual, act);
}

// The parameter dtype of the forward, which the backward cannot always tell: when only a
// bias was given (not an argument of the backward), param_dtype says it.
c10::ScalarType backward_param_type(const Tensor& input, const optional<Tensor>& weight,
                                    const optional<Tensor>& running_mean,
                                    const optional<Tensor>& running_var, bool training,
                                    optional<c10::ScalarType> param_dtype) {
  c10::ScalarType param_type =
      check_inputs(input, weight, std::nullopt, running_mean, running_var, training);
  if (param_dtype.has_value() && *param_dtype != param_type) {
    // Only a bias (not an argument here) could have set another parameter dtype.
    const bool told = given(weight) || (!training && given(running_mean));
    const bool reduced = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
    TORCH_CHECK(!told && reduced && *param_dtype == at::kFloat,
                "batch_norm_backward: param_dtype ", *param_dtype, " does not match the parameters (",
                param_type, ")");
    param_type = *param_dtype;
  }
  return param_type;
}

// The backward, with an optional fused epilogue (see forward_with_epilogue): output is
// the forward's output (ReLU's mask), residual the forward's residual (SiLU recomputes
// its input from it), has_residual whether the forward had one (then grad_residual is
// computed, and returned when output_mask[3] asks for it).
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_with_epilogue(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const Tensor& save_mean, const Tensor& save_var,
    bool training, double eps, std::array<bool, 4> output_mask,
    optional<c10::ScalarType> param_dtype, cpu::Activation activation,
    const optional<Tensor>& output, const optional<Tensor>& residual, bool has_residual) {
  const c10::ScalarType param_type =
      backward_param_type(input, weight, running_mean, running_var, training, param_dtype);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "batch_norm_backward: grad_output of size ",
              grad_output.sizes(), " does not match input of size ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "batch_norm_backward: grad_output has dtype ", grad_output.scalar_type(),
              " but input has ", input.scalar_type());
  const int64_t channels = input.size(1);
  const auto stat_type = at::kDouble;
  if (training) {
    TORCH_CHECK(save_mean.numel() == channels && save_var.numel() == channels &&
                    save_mean.scalar_type() == stat_type && save_var.scalar_type() == stat_type,
                "batch_norm_backward: save_mean and save_var must be the batch statistics "
                "returned by batch_norm_forward in training");
  }
  const bool reads_output = activation == cpu::Activation::ReLU;
  const bool needs_z = activation == cpu::Activation::SiLU;
  TORCH_CHECK(!reads_output || given(output),
              "batch_norm_act_backward: the relu backward needs the forward's output");
  TORCH_CHECK(!(needs_z && has_residual) || given(residual),
              "batch_norm_act_backward: the silu backward needs the forward's residual");
  if (given(output)) check_like_input(input, *output, "output");
  if (given(residual)) check_like_input(input, *residual, "residual");
  if (needs_z) check_parameter(input, bias, "bias");

  const at::MemoryFormat format = grad_format(input, grad_output);
  const Tensor x = input.contiguous(format);
  const Tensor dy = grad_output.contiguous(format);
  const Tensor y = reads_output ? output->contiguous(format) : Tensor();
  const Tensor r = needs_z && has_residual ? residual->contiguous(format) : Tensor();
  const auto param_options = input.options().dtype(param_type);
  Tensor grad_input = output_mask[0] ? at::empty_like(x, format) : Tensor();
  Tensor grad_weight = output_mask[1] ? at::empty({channels}, param_options) : Tensor();
  Tensor grad_bias = output_mask[2] ? at::empty({channels}, param_options) : Tensor();
  // With a residual the kernels always write its gradient (dz, which grad_input is then
  // computed from), wanted or not.
  Tensor grad_residual = has_residual ? at::empty_like(x, format) : Tensor();
  // An empty input goes to the kernels too: every sum over nothing is 0.

  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = needs_z ? contiguous_or_undefined(bias) : Tensor();
  const Tensor mean = training ? save_mean.contiguous() : contiguous_or_undefined(running_mean);
  const Tensor var = training ? save_var.contiguous() : contiguous_or_undefined(running_var);
  cpu::BackwardArgs args = backward_args(dy, x, format, param_type, w, mean, var, eps, training);
  args.grad_input = grad_input.defined() ? grad_input.mutable_data_ptr() : nullptr;
  args.grad_weight = grad_weight.defined() ? grad_weight.mutable_data_ptr() : nullptr;
  args.grad_bias = grad_bias.defined() ? grad_bias.mutable_data_ptr() : nullptr;
  args.activation = activation;
  args.output = data_or_null(y);
  args.bias = data_or_null(b);
  args.residual = data_or_null(r);
  args.grad_residual = grad_residual.defined() ? grad_residual.mutable_data_ptr() : nullptr;
  cpu::active_kernels().backward(args);
  return {grad_input, grad_weight, grad_bias, output_mask[3] ? grad_residual : Tensor()};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const Tensor& save_mean, const Tensor& save_var, bool training, double eps,
    std::array<bool, 3> output_mask, optional<c10::ScalarType> param_dtype) {
  auto [grad_input, grad_weight, grad_bias, _] = backward_with_epilogue(
      grad_output, input, weight, std::nullopt, running_mean, running_var, save_mean, save_var,
      training, eps, {output_mask[0], output_mask[1], output_mask[2], false}, param_dtype,
      cpu::Activation::Identity, std::nullopt, std::nullopt, false);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cpu(
    const Tensor& grad_output, const optional<Tensor>& output, const Tensor& input,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const Tensor& save_mean, const Tensor& save_var, bool training, double eps,
    const optional<Tensor>& residual, bool has_residual, c10::string_view activation,
    std::array<bool, 4> output_mask, optional<c10::ScalarType> param_dtype) {
  const cpu::Activation act = activation_named(activation);
  return backward_with_epilogue(grad_output, input, weight, bias, running_mean, running_var,
                                save_mean, save_var, training, eps, output_mask, param_dtype, act,
                                output, residual, has_residual);
}

// running = f * batch + (1 - f) * running, with the unbiased variance, computed in the
// opmath type of the buffers (float for float, bfloat16 and half; as native) and rounded.
void update_running_stats_cpu(Tensor& running_mean, Tensor& running_var, const Tensor& batch_mean,
                              const Tensor& batch_var, int64_t count, optional<double> momentum,
                              const optional<Tensor>& num_batches_tracked) {
  TORCH_CHECK(running_mean.numel() == batch_mean.numel() && running_var.numel() == batch_var.numel() &&
                  running_mean.numel() == running_var.numel(),
              "update_running_stats_: running and batch statistics differ in size");
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "update_running_stats_: running_mean and running_var differ in dtype");
  double factor;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    TORCH_CHECK(num_batches_tracked.has_value() && num_batches_tracked->defined(),
                "update_running_stats_: momentum=None (cumulative average) needs num_batches_tracked");
    factor = 1.0 / num_batches_tracked->item<double>();
  }
  const double unbiased = double(count) / double(count - 1);
  // Updated in contiguous copies when the buffers are strided views, then copied back.
  Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
  const Tensor mean = batch_mean.contiguous(), var = batch_var.contiguous();
  TORCH_CHECK(mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble,
              "update_running_stats_: the batch statistics must be float64");
  const double* mean_data = mean.const_data_ptr<double>();
  const double* var_data = var.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rm.scalar_type(), "update_running_stats_", [&] {
    // As native: for float buffers exactly momentum * mean + (1 - momentum) * running, each
    // term rounded to float.
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t f = acc_t(factor), keep = acc_t(1.0 - factor);
    scalar_t* rm_data = rm.mutable_data_ptr<scalar_t>();
    scalar_t* rv_data = rv.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < rm.numel(); ++c) {
      rm_data[c] = f * acc_t(mean_data[c]) + keep * acc_t(rm_data[c]);
      rv_data[c] = f * acc_t(var_data[c] * unbiased) + keep * acc_t(rv_data[c]);
    }
  });
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
}

// ---------------------------------------------------------------------------------------
// SyncBatchNorm's steps: the same kernels, one phase at a time.

// Checks shared by the steps: the batch statistics (float64, one per channel).
void check_batch_statistics(const Tensor& input, const Tensor& mean, const Tensor& var) {
  TORCH_CHECK(mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble &&
                  mean.numel() == input.size(1) && var.numel() == input.size(1),
              "batch statistics must be float64 tensors of ", input.size(1), " elements");
}

// The mean and biased variance of every channel (float64); zeros for an empty input.
std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  check_inputs(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  const at::MemoryFormat format = output_format(input, {});
  const Tensor x = input.contiguous(format);
  const auto options = input.options().dtype(at::kDouble);
  Tensor mean = at::zeros({input.size(1)}, options), var = at::zeros({input.size(1)}, options);
  // An empty batch (a process with no values in SyncBatchNorm): zeros, which merge as
  // nothing (its count is 0), where the kernels would give NaN.
  if (x.numel() == 0) return {mean, var};
  cpu::ForwardArgs args = forward_args(x, format, input.scalar_type(), /*output=*/nullptr,
                                       Tensor(), Tensor(), 0.0, /*training=*/true);
  args.save_mean = mean.mutable_data_ptr();
  args.save_var = var.mutable_data_ptr();
  cpu::active_kernels().forward(args);
  return {mean, var};
}

// Normalizes with given batch statistics, as the training forward would with its own.
Tensor batch_norm_apply_cpu(const Tensor& input, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const Tensor& mean, const Tensor& var,
                            double eps) {
  const c10::ScalarType param_type =
      check_inputs(input, weight, bias, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  const at::MemoryFormat format = output_format(input, {&weight, &bias});
  const Tensor x = input.contiguous(format);
  Tensor output = at::empty_like(x, format);
  if (x.numel() == 0) return output;
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const Tensor m = mean.contiguous(), v = var.contiguous();
  cpu::ForwardArgs args = forward_args(x, format, param_type, &output, w, b, eps, true);
  args.batch_mean = m.const_data_ptr<double>();
  args.batch_var = v.const_data_ptr<double>();
  cpu::active_kernels().forward(args);
  return output;
}

// sum(dy) and sum(dy * (x - mean)) per channel, as a (2, C) float64 tensor.
Tensor batch_norm_backward_reduce_cpu(const Tensor& grad_output, const Tensor& input,
                                      const Tensor& mean, const Tensor& var, double eps) {
  check_inputs(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              "batch_norm_backward_reduce: grad_output must match input in size and dtype");
  Tensor sums = at::zeros({2, input.size(1)}, input.options().dtype(at::kDouble));
  if (input.numel() == 0) return sums;
  const at::MemoryFormat format = grad_format(input, grad_output);
  const Tensor x = input.contiguous(format), dy = grad_output.contiguous(format);
  const Tensor m = mean.contiguous(), v = var.contiguous();
  cpu::BackwardArgs args =
      backward_args(dy, x, format, input.scalar_type(), Tensor(), m, v, eps, true);
  args.grad_sums = sums.mutable_data_ptr<double>();
  cpu::active_kernels().backward(args);
  return sums;
}

// grad_input from sums over the whole batch (`count` values per channel).
Tensor batch_norm_backward_apply_cpu(const Tensor& grad_output, const Tensor& input,
                                     const optional<Tensor>& weight, const Tensor& mean,
                                     const Tensor& var, const Tensor& sums, int64_t count,
                                     double eps) {
  const c10::ScalarType param_type =
      check_inputs(input, weight, std::nullopt, std::nullopt, std::nullopt, true);
  check_batch_statistics(input, mean, var);
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              "batch_norm_backward_apply: grad_output must match input in size and dtype");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.numel() == 2 * input.size(1),
              "batch_norm_backward_apply: sums must be a (2, C) float64 tensor");
  TORCH_CHECK(count > 0 || input.numel() == 0,
              "batch_norm_backward_apply: count must be positive, got ", count);
  const at::MemoryFormat format = grad_format(input, grad_output);
  const Tensor x = input.contiguous(format), dy = grad_output.contiguous(format);
  Tensor grad_input = at::empty_like(x, format);
  if (x.numel() == 0) return grad_input;
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor m = mean.contiguous(), v = var.contiguous(), s = sums.contiguous();
  cpu::BackwardArgs args = backward_args(dy, x, format, param_type, w, m, v, eps, true);
  args.grad_input = grad_input.mutable_data_ptr();
  args.given_sums = s.const_data_ptr<double>();
  args.count = count;
  cpu::active_kernels().backward(args);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(batchnorm_ext, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_apply", &batch_norm_backward_apply_cpu);
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("update_running_stats_", &update_running_stats_cpu);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
}

}  // namespace batchnorm_ext
