// Batch normalization kernels, part 5: epilogues, what is applied after normalizing (see
// vec_io.h for how the kernel headers fit together).
//
// A fused batch norm computes y = activation(z + residual), where z is the batch norm's
// output, in the pass that writes z: the activation and the residual add (the end of a
// ResNet block) cost no pass over memory of their own.  An epilogue is a small policy:
//   forward(z)        y from z (the residual is added before, when there is one);
//   backward(dy, ...) dz, the gradient at z, from dy, the gradient at y, and what the
//                     backward keeps: the output y (ReLU: its mask is y > 0), or z itself,
//                     recomputed from the input (SiLU: nothing of the input's size is
//                     stored that the unfused layers would not store).
// Each works on a vector and on a single value alike (V is Vectorized<float/double> or
// float/double), as the other kernel lambdas do.
#pragma once

#include "vec_io.h"

#include <cmath>
#include <type_traits>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

template <typename V>
constexpr bool is_vector_v = !std::is_arithmetic_v<V>;

template <Activation A>
struct Act;

// No activation: y = z (a batch norm followed by a residual add, as in MobileNet and
// EfficientNet blocks).
template <>
struct Act<Activation::Identity> {
  static constexpr bool kBackwardReadsOutput = false;
  static constexpr bool kBackwardNeedsZ = false;

  template <typename V>
  static V forward(V z) {
    return z;
  }
  template <typename V>
  static V backward(V dy, V /*y*/, V /*z*/) {
    return dy;
  }
};

// ReLU, as torch.relu: max(z, 0), NaN kept; its gradient is stopped where the output is
// <= 0 and passes elsewhere, NaN outputs included (threshold_backward(dy, y, 0)), so the
// backward reads y, not z.
template <>
struct Act<Activation::ReLU> {
  static constexpr bool kBackwardReadsOutput = true;
  static constexpr bool kBackwardNeedsZ = false;

  template <typename V>
  static V forward(V z) {
    // NaN < 0 is false, so NaN stays (and -0 stays -0, as in torch.relu).
    if constexpr (is_vector_v<V>) {
      return V::blendv(z, V(0), z < V(0));
    } else {
      return z < V(0) ? V(0) : z;
    }
  }
  template <typename V>
  static V backward(V dy, V y, V /*z*/) {
    if constexpr (is_vector_v<V>) {
      return V::blendv(dy, V(0), y <= V(0));
    } else {
      return y <= V(0) ? V(0) : dy;
    }
  }
};

// SiLU (swish), as torch.nn.functional.silu: z / (1 + exp(-z)).  Its gradient needs z,
// which the backward recomputes from the input (as cheap as reading a saved z, and
// nothing more is stored).
template <>
struct Act<Activation::SiLU> {
  static constexpr bool kBackwardReadsOutput = false;
  static constexpr bool kBackwardNeedsZ = true;

  template <typename V>
  static V forward(V z) {
    if constexpr (is_vector_v<V>) {
      return z / (V(1) + z.neg().exp());
    } else {
      return z / (V(1) + std::exp(-z));
    }
  }
  template <typename V>
  static V backward(V dy, V /*y*/, V z) {
    V sigmoid;
    if constexpr (is_vector_v<V>) {
      sigmoid = V(1) / (V(1) + z.neg().exp());
    } else {
      sigmoid = V(1) / (V(1) + std::exp(-z));
    }
    return dy * sigmoid * (V(1) + z * (V(1) - sigmoid));
  }
};

// An activation and whether a residual is added before it: the compile-time form of
// ForwardArgs/BackwardArgs' activation and residual.
template <Activation A, bool kHasResidual>
struct Epilogue {
  using act = Act<A>;
  static constexpr Activation kActivation = A;
  static constexpr bool kResidual = kHasResidual;
};

// Returns f(Epilogue<...>{}) for the epilogue chosen at run time.  The kernels call it
// around their innermost loops (a run of values, a block), so that only those are compiled
// once per epilogue, not the whole kernel.
template <typename F>
auto with_epilogue(Activation activation, bool residual, F f) {
  auto with_residual = [&](auto act) {
    constexpr Activation A = decltype(act)::value;
    return residual ? f(Epilogue<A, true>{}) : f(Epilogue<A, false>{});
  };
  switch (activation) {
    case Activation::ReLU:
      return with_residual(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::SiLU:
      return with_residual(std::integral_constant<Activation, Activation::SiLU>{});
    default:
      return with_residual(std::integral_constant<Activation, Activation::Identity>{});
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
