// The boundary between the operators (which see Tensors) and the kernels (which see
// pointers and sizes).  The kernels are compiled once per instruction set; everything in
// this header is the same for all of them.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace batchnorm_ext::cpu {

// How the values of one channel are laid out.  A tensor of shape (N, C, *) is seen as
// (batch, channels, inner) with inner = the product of the spatial sizes.
//   ChannelsFirst (contiguous NCHW): value (n, c, i) is at (n * C + c) * inner + i,
//     so each channel is `batch` contiguous planes of `inner` values.
//   ChannelsLast (NHWC, and any input with inner == 1): value (n, c, i) is at
//     (n * inner + i) * C + c, so the data is rows of C values, one per channel.
enum class Layout { ChannelsFirst, ChannelsLast };

struct Geometry {
  Layout layout;
  int64_t batch;
  int64_t channels;
  int64_t inner;
  int64_t count() const { return batch * inner; }  // values per channel
};

// What a fused batch norm applies after normalizing: y = activation(z + residual), z
// being the batch norm's output (see epilogues.h).
enum class Activation : int8_t { Identity, ReLU, SiLU };

// Types: `input` and `output` are input_type; weight, bias and the running statistics are
// param_type (the input type, or float for bfloat16/half input: "mixed" precision); the
// saved batch statistics (mean and biased variance) are double.
struct ForwardArgs {
  Geometry geometry;
  c10::ScalarType input_type;
  c10::ScalarType param_type;
  const void* input;
  void* output;
  const void* weight;  // may be null (no affine transform)
  const void* bias;    // may be null
  double eps;
  bool training;
  // training: batch statistics are computed and written to save_mean / save_var (biased).
  void* save_mean;
  void* save_var;
  // eval: the running statistics to normalize with.
  const void* running_mean;
  const void* running_var;
  // SyncBatchNorm: in training, the statistics of the whole batch (mean and biased
  // variance per channel) to normalize with instead of computing them; and output may be
  // null, for the statistics alone.
  const double* batch_mean = nullptr;
  const double* batch_var = nullptr;
  // A fused epilogue: output = activation(normalized + residual).  residual (input_type,
  // laid out as input) may be null.
  Activation activation = Activation::Identity;
  const void* residual = nullptr;
};

struct BackwardArgs {
  Geometry geometry;
  c10::ScalarType input_type;
  c10::ScalarType param_type;
  const void* grad_output;
  const void* input;
  const void* weight;  // may be null
  double eps;
  bool training;
  const void* save_mean;  // training: the batch statistics from the forward (float64)
  const void* save_var;
  const void* running_mean;  // eval: the running statistics (param_type)
  const void* running_var;
  void* grad_input;   // each output may be null: not wanted
  void* grad_weight;  // param_type
  void* grad_bias;    // param_type
  // SyncBatchNorm: grad_sums (if not null) receives sum(dy) per channel, then
  // sum(dy * (x - mean)) per channel (2 C doubles); given_sums (if not null) are those sums
  // over the whole batch, `count` values per channel, and replace the ones of this input.
  double* grad_sums = nullptr;
  const double* given_sums = nullptr;
  int64_t count = 0;
  // The backward of a fused epilogue (ForwardArgs): grad_output is the gradient at the
  // epilogue's output.  It reads the forward's output (ReLU), or recomputes the normalized
  // value from input, bias and residual (SiLU).  grad_residual (input_type) receives the
  // gradient at the normalized value, which is the residual's gradient: given exactly when
  // the forward had a residual (and then, for SiLU, so is residual).
  Activation activation = Activation::Identity;
  const void* output = nullptr;
  const void* bias = nullptr;  // param_type
  const void* residual = nullptr;
  void* grad_residual = nullptr;
};

// One set of kernels per instruction set.
struct KernelTable {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
};

// Each built where setup.py defines BATCHNORM_EXT_KERNEL_<ISA> (x86; AVX512_BF16 only where
// the compiler has -mavx512bf16); DEFAULT always.
extern const KernelTable kernels_DEFAULT;
extern const KernelTable kernels_AVX2;
extern const KernelTable kernels_AVX512;
extern const KernelTable kernels_AVX512_BF16;

// The kernels for this CPU (chosen on first use, see dispatch.cpp).
const KernelTable& active_kernels();
// "DEFAULT", "AVX2", "AVX512" or "AVX512_BF16": the set in use, and a way to force one
// (tests, benchmarks); and the sets built, best first.
std::string cpu_capability();
void set_cpu_capability(const std::string& name);
std::string built_capabilities();  // comma-separated

}  // namespace batchnorm_ext::cpu
