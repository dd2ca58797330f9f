// Argument checks of the CPU operators (batch_norm_cpu.cpp), shared with autograd.cpp.
// Types and messages follow native batch norm.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace batchnorm_ext {

// An optional tensor that is there.
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Parameters (weight, bias, running_mean, running_var): on the input's device, with C
// elements; running statistics given in eval (both or neither in training); all of one
// dtype, the input's or float32 for bfloat16/half input; input floating point, at least
// 2-D.  Returns the parameter dtype.
c10::ScalarType check_inputs(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training);

}  // namespace batchnorm_ext
