// The composite batch_norm that modules call, with its eager fast path in C++, and the
// autograd of batch_norm_backward.
//
// batch_norm_forward's Autograd kernel is in Python (batchnorm_ext/_autograd.py): a Python
// autograd.Function, which functorch transforms (vmap, grad, jvp, jacrev, hessian) accept
// and which has a jvp; a C++ autograd node has neither.  It costs ~2 us more per forward
// call and ~10 us more with the backward, so plain eager calls (no transform, no
// forward-mode AD) skip it: the composite runs the forward below autograd and attaches a C++
// node below (BatchNormBackward, BatchNormActBackward) directly, without the dispatcher.
//
// batch_norm_forward's backward calls batch_norm_backward.  batch_norm_backward is itself
// differentiable: when a derivative of the gradient is wanted (create_graph=True, or a
// tangent under forward-mode AD), it is computed from ATen operations that autograd can
// differentiate again; otherwise it runs the kernel.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

namespace batchnorm_ext {

using at::Tensor;
using std::optional;
using torch::autograd::variable_list;

namespace {

Tensor or_undefined(const optional<Tensor>& t) { return given(t) ? *t : Tensor(); }
optional<Tensor> or_none(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

using ForwardResult = std::tuple<Tensor, Tensor, Tensor>;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("batchnorm_ext::batch_norm_forward", "")
                             .typed<ForwardResult(const Tensor&, const optional<Tensor>&,
                                                  const optional<Tensor>&, const optional<Tensor>&,
                                                  const optional<Tensor>&, bool, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm_ext::batch_norm_backward", "")
          .typed<ForwardResult(const Tensor&, const Tensor&, const optional<Tensor>&,
                               const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                               const Tensor&, bool, double, std::array<bool, 3>,
                               optional<c10::ScalarType>)>();
  return op;
}

const auto& update_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm_ext::update_running_stats_", "")
          .typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                      optional<double>, const optional<Tensor>&)>();
  return op;
}

using ActBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

const auto& act_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm_ext::batch_norm_act_forward", "")
          .typed<ForwardResult(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                               const optional<Tensor>&, const optional<Tensor>&, bool, double,
                               const optional<Tensor>&, c10::string_view)>();
  return op;
}

const auto& act_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("batchnorm_ext::batch_norm_act_backward", "")
          .typed<ActBackwardResult(const Tensor&, const optional<Tensor>&, const Tensor&,
                                   const optional<Tensor>&, const optional<Tensor>&,
                                   const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                                   const Tensor&, bool, double, const optional<Tensor>&, bool,
                                   c10::string_view, std::array<bool, 4>,
                                   optional<c10::ScalarType>)>();
  return op;
}

// Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, which
// torch.func.jvp opens too; there is at most one, level 0): no tangent exists otherwise.
bool dual_level_open() { return torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr; }

// Whether `t` carries a forward-mode AD tangent (level 0: the only one outside functorch,
// and the one each functorch jvp level uses for its own wrappers).
bool has_tangent(const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }

// Whether batch_norm_forward must go through the dispatcher to its Python Autograd kernel:
// a functorch transform is active (vmap and grad layers dispatch from this TLS key; the C++
// nodes cannot take part in them), or the input, weight or bias has a forward-mode tangent
// (the C++ nodes have no jvp).
bool needs_python_autograd(const Tensor& input, const optional<Tensor>& weight,
                           const optional<Tensor>& bias) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return true;
  }
  // No tangent exists outside a dual level: one look at the levels rather than one lock
  // per tensor in the common case.
  if (!dual_level_open()) return false;
  return has_tangent(input) || (given(weight) && has_tangent(*weight)) ||
         (given(bias) && has_tangent(*bias));
}

// Whether autograd has nothing to record: grad mode off (torch.no_grad, inference), or
// no input that is differentiated requires grad.  (Tangents on those inputs were sent to the
// Python kernel before; one on a running statistic is ignored, as native does.)  Then the
// forward runs alone, without the node and saved tensors, which cost more than the kernel
// of a small call.
bool records_nothing(const Tensor& input,
                     std::initializer_list<const optional<Tensor>*> differentiated) {
  if (!at::GradMode::is_enabled()) return true;
  if (input.requires_grad()) return false;
  for (const optional<Tensor>* t : differentiated) {
    if (given(*t) && (*t)->requires_grad()) return false;
  }
  return true;
}

// A running statistic without its tangent, if it has one: native ignores those (and the C++
// nodes have no jvp).
optional<Tensor> without_tangent(const optional<Tensor>& t) {
  return given(t) && has_tangent(*t) ? optional<Tensor>(t->_fw_primal(/*level=*/0)) : t;
}

// Running statistics are buffers, never differentiated: as native, refuse ones that require grad.
void check_not_requiring_grad(const optional<Tensor>& running_mean,
                              const optional<Tensor>& running_var) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"},
                                   std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(!given(*stat) || !(*stat)->requires_grad(),
                "batch_norm is not differentiable with respect to argument '", name,
                "'. This input cannot have requires_grad True.");
  }
}

// Compiled autograd (torch._dynamo.compiled_autograd: torch.compile of a backward whose
// forward ran eagerly) does not call a node's apply().  It asks the node what its backward
// depends on (compiled_args: the saved tensors become inputs of its graph, the values are
// specialized on) and has it record its backward in the graph as one call of a function of
// the gradients and that state (apply_with_saved), which it then traces through the
// operators' fake kernels.  torch's generated nodes do the same.
namespace compiled_autograd = torch::dynamo::autograd;

// Gives compiled autograd `backward(grads, state...)` under `name` (a Python identifier:
// it becomes an attribute of torch._dynamo.compiled_autograd.ops).  Once per process.
template <typename... State>
std::string bind_backward(compiled_autograd::SwapSavedVariables& saved, const char* name,
                          variable_list (*backward)(const variable_list&, State...)) {
  auto unpack_and_call = [backward](const variable_list& grads,
                                    const std::vector<c10::IValue>& packed) {
    compiled_autograd::PackedArgs args(packed);
    // Braces unpack in order, as call_backward packed.
    std::tuple<std::decay_t<State>...> state{args.unpack<std::decay_t<State>>()...};
    return std::apply([&](const auto&... s) { return backward(grads, s...); }, state);
  };
  return compiled_autograd::getPyCompilerInterface()->bind_function(
      saved.get_py_compiler(), name, unpack_and_call,
      {compiled_autograd::IValuePacker<std::decay_t<State>>::packed_type()...});
}

// Records a call of the backward bound as `bound` in compiled autograd's graph.
template <typename... State>
variable_list call_backward(compiled_autograd::SwapSavedVariables& saved, const std::string& bound,
                            const variable_list& grads, const torch::autograd::edge_list& edges,
                            const State&... state) {
  compiled_autograd::PackedArgs args;
  (args.pack(state), ...);
  const auto output_metadata =
      compiled_autograd::IValuePacker<std::vector<optional<torch::autograd::InputMetadata>>>::pack(
          compiled_autograd::get_input_metadata(edges));
  return compiled_autograd::getPyCompilerInterface()->call_function(
      saved.get_py_compiler(), "apply_functional", bound, grads, args.vec(), output_metadata);
}

// What the two nodes below share, written once.  Derived gives: saved_list(self) (its saved
// tensors, each with whether it is an output of the forward), a static backward(grads,
// state...), state() (the gradients wanted, the saved tensors unpacked, the values),
// collect_values(args) (every value state() reads, for compiled autograd's key) and
// kBoundName.
template <typename Derived>
struct SavedStateNode : public torch::autograd::Node {
  // Under the node's mutex, as torch's nodes do: backward can run on several threads.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto [saved, is_output] : Derived::saved_list(self())) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::apply([&](const auto&... s) { return Derived::backward(grads, s...); },
                      self().state());
  }

  // Compiled autograd (see bind_backward): the saved tensors, the values, the gradients wanted.
  void compiled_args(compiled_autograd::CompiledNodeArgs& args) const override {
    for (auto [saved, is_output] : Derived::saved_list(self())) args.collect(*saved, is_output);
    self().collect_values(args);
    for (size_t i = 0; i < num_outputs(); ++i) args.collect(task_should_compute_output(i));
  }

  // The saved tensors swapped for the graph's, the backward recorded in it.
  variable_list apply_with_saved(const variable_list& grads,
                                 compiled_autograd::SwapSavedVariables& saved) override {
    for (auto [variable, is_output] : Derived::saved_list(self())) saved.before(*variable);
    static const std::string bound = bind_backward(saved, Derived::kBoundName, &Derived::backward);
    variable_list result = std::apply(
        [&](const auto&... s) { return call_backward(saved, bound, grads, next_edges(), s...); },
        self().state());
    for (auto [variable, is_output] : Derived::saved_list(self())) saved.after(*variable);
    return result;
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

// batch_norm_forward's autograd node on the eager fast path (the composite batch_norm with
// no transform and no tangent), written as torch writes its own (NativeBatchNormBackward0):
// the saved tensors and values are members.  A torch::autograd::Function would do the same
// with a map of saved values and per-input bookkeeping: on an eval call with parameters that
// require grad it cost ~10 us more than the forward alone (8x512x7x7), native's node ~1 us.
// The operator's own Autograd kernel, in Python, does the same as this node.
struct BatchNormBackward : public SavedStateNode<BatchNormBackward> {
  static constexpr const char* kBoundName = "batchnorm_ext_BatchNormBackward";
  torch::autograd::SavedVariable input, weight, running_mean, running_var, save_mean, save_var;
  bool training = false, has_weight = false, has_bias = false;
  double eps = 0;
  c10::ScalarType param_dtype = c10::ScalarType::Float;  // the backward cannot tell it from a bias

  std::string name() const override { return "BatchNormBackward (batchnorm_ext)"; }

  // The saved tensors, each with whether it is an output of the forward.
  template <typename Self>  // BatchNormBackward, const or not
  static auto saved_list(Self& self) {
    return std::array{std::pair{&self.input, false},        std::pair{&self.weight, false},
                      std::pair{&self.running_mean, false}, std::pair{&self.running_var, false},
                      std::pair{&self.save_mean, true},     std::pair{&self.save_var, true}};
  }

  // The backward, from the gradients and the node's state (below).  The edges are input,
  // weight and bias, an empty edge for one not given.
  static variable_list backward(const variable_list& grads, std::array<bool, 3> mask,
                                const Tensor& input, const optional<Tensor>& weight,
                                const optional<Tensor>& running_mean,
                                const optional<Tensor>& running_var, const Tensor& save_mean,
                                const Tensor& save_var, bool training, double eps,
                                optional<c10::ScalarType> param_dtype) {
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return variable_list(3);
    auto [grad_input, grad_weight, grad_bias] =
        backward_op().call(grad_output, input, weight, running_mean, running_var, save_mean,
                           save_var, training, eps, mask, param_dtype);
    return {grad_input, grad_weight, grad_bias};
  }

  // The backward's state: the gradients wanted (an edge may be empty, or not wanted by
  // autograd.grad), the saved tensors unpacked, the values.
  auto state() {
    const std::array<bool, 3> mask = {task_should_compute_output(0),
                                      has_weight && task_should_compute_output(1),
                                      has_bias && task_should_compute_output(2)};
    return std::make_tuple(mask, input.unpack(), or_none(weight.unpack()),
                           or_none(running_mean.unpack()), or_none(running_var.unpack()),
                           save_mean.unpack(getptr()), save_var.unpack(getptr()), training, eps,
                           optional<c10::ScalarType>(param_dtype));
  }

  void collect_values(compiled_autograd::CompiledNodeArgs& args) const {
    args.collect(training);
    args.collect(has_weight);
    args.collect(has_bias);
    args.collect(eps);
    args.collect(param_dtype);
  }
};

// The parameter dtype: that of the first parameter given, else the input's (the backward
// cannot tell it when only a bias was given).
c10::ScalarType param_dtype_of(const Tensor& input,
                               std::initializer_list<const optional<Tensor>*> params) {
  for (const optional<Tensor>* p : params) {
    if (given(*p)) return (*p)->scalar_type();
  }
  return input.scalar_type();
}

// batch_norm_forward with BatchNormBackward as the output's grad_fn, as torch's generated
// autograd kernels do it: the node, the call below autograd, the saved tensors, the history.
ForwardResult forward_with_node(const Tensor& input, const optional<Tensor>& weight,
                                const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                const optional<Tensor>& running_var, bool training, double eps) {
  auto node = c10::make_intrusive<BatchNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  Tensor output, save_mean, save_var;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_var) =
        forward_op().call(input, weight, bias, running_mean, running_var, training, eps);
  }
  // The history first: a node that saves its own output must find it already attached
  // (SavedVariable keeps an output without its grad_fn, or there would be a cycle).
  torch::autograd::set_history(output, node);  // save_mean and save_var: not differentiable
  using torch::autograd::SavedVariable;
  node->input = SavedVariable(input, /*is_output=*/false);
  node->weight = SavedVariable(or_undefined(weight), false);
  // Running statistics are read by the backward only in eval; in training the caller
  // updates them in place after this returns.
  if (!training) {
    node->running_mean = SavedVariable(or_undefined(running_mean), false);
    node->running_var = SavedVariable(or_undefined(running_var), false);
  }
  node->save_mean = SavedVariable(save_mean, /*is_output=*/true);
  node->save_var = SavedVariable(save_var, true);
  node->training = training;
  node->eps = eps;
  node->has_weight = given(weight);
  node->has_bias = given(bias);
  node->param_dtype = param_dtype_of(input, {&weight, &bias, &running_mean, &running_var});
  return {output, save_mean, save_var};
}

// batch_norm_act_forward's autograd node on the eager fast path, as BatchNormBackward.  What
// the backward keeps besides the input: the output for relu (its mask), the bias and the
// residual for silu (its input is recomputed); nothing else the size of the input.
struct BatchNormActBackward : public SavedStateNode<BatchNormActBackward> {
  static constexpr const char* kBoundName = "batchnorm_ext_BatchNormActBackward";
  torch::autograd::SavedVariable input, weight, bias, running_mean, running_var, save_mean,
      save_var, output, residual;
  bool training = false, has_weight = false, has_bias = false, has_residual = false;
  double eps = 0;
  std::string activation;
  c10::ScalarType param_dtype = c10::ScalarType::Float;

  std::string name() const override { return "BatchNormActBackward (batchnorm_ext)"; }

  template <typename Self>
  static auto saved_list(Self& self) {
    return std::array{std::pair{&self.input, false},       std::pair{&self.weight, false},
                      std::pair{&self.bias, false},        std::pair{&self.running_mean, false},
                      std::pair{&self.running_var, false}, std::pair{&self.save_mean, true},
                      std::pair{&self.save_var, true},     std::pair{&self.output, true},
                      std::pair{&self.residual, false}};
  }

  // The edges are input, weight, bias and residual, an empty edge for one not given.
  static variable_list backward(const variable_list& grads, std::array<bool, 4> mask,
                                const optional<Tensor>& output, const Tensor& input,
                                const optional<Tensor>& weight, const optional<Tensor>& bias,
                                const optional<Tensor>& running_mean,
                                const optional<Tensor>& running_var, const Tensor& save_mean,
                                const Tensor& save_var, bool training, double eps,
                                const optional<Tensor>& residual, bool has_residual,
                                const std::string& activation,
                                optional<c10::ScalarType> param_dtype) {
    const Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return variable_list(4);
    auto [grad_input, grad_weight, grad_bias, grad_residual] = act_backward_op().call(
        grad_output, output, input, weight, bias, running_mean, running_var, save_mean, save_var,
        training, eps, residual, has_residual, activation, mask, param_dtype);
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  auto state() {
    const std::array<bool, 4> mask = {task_should_compute_output(0),
                                      has_weight && task_should_compute_output(1),
                                      has_bias && task_should_compute_output(2),
                                      has_residual && task_should_compute_output(3)};
    return std::make_tuple(mask, or_none(output.unpack(getptr())), input.unpack(),
                           or_none(weight.unpack()), or_none(bias.unpack()),
                           or_none(running_mean.unpack()), or_none(running_var.unpack()),
                           save_mean.unpack(getptr()), save_var.unpack(getptr()), training, eps,
                           or_none(residual.unpack()), has_residual, activation,
                           optional<c10::ScalarType>(param_dtype));
  }

  void collect_values(compiled_autograd::CompiledNodeArgs& args) const {
    args.collect(training);
    args.collect(has_weight);
    args.collect(has_bias);
    args.collect(has_residual);
    args.collect(eps);
    args.collect(activation);
    args.collect(param_dtype);
  }
};

// batch_norm_act_forward with BatchNormActBackward as the output's grad_fn, as
// forward_with_node.
ForwardResult act_forward_with_node(const Tensor& input, const optional<Tensor>& weight,
                                    const optional<Tensor>& bias,
                                    const optional<Tensor>& running_mean,
                                    const optional<Tensor>& running_var, bool training, double eps,
                                    const optional<Tensor>& residual,
                                    c10::string_view activation) {
  auto node = c10::make_intrusive<BatchNormActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  Tensor output, save_mean, save_var;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_var) = act_forward_op().call(
        input, weight, bias, running_mean, running_var, training, eps, residual, activation);
  }
  torch::autograd::set_history(output, node);  // first, as in forward_with_node
  using torch::autograd::SavedVariable;
  const bool relu = activation == "relu", silu = activation == "silu";
  node->input = SavedVariable(input, /*is_output=*/false);
  node->weight = SavedVariable(or_undefined(weight), false);
  if (silu) {
    node->bias = SavedVariable(or_undefined(bias), false);
    node->residual = SavedVariable(or_undefined(residual), false);
  }
  if (!training) {  // as in forward_with_node
    node->running_mean = SavedVariable(or_undefined(running_mean), false);
    node->running_var = SavedVariable(or_undefined(running_var), false);
  }
  node->save_mean = SavedVariable(save_mean, /*is_output=*/true);
  node->save_var = SavedVariable(save_var, true);
  if (relu) node->output = SavedVariable(output, true);
  node->training = training;
  node->eps = eps;
  node->has_weight = given(weight);
  node->has_bias = given(bias);
  node->has_residual = given(residual);
  node->activation = std::string(activation);
  node->param_dtype = param_dtype_of(input, {&weight, &bias, &running_mean, &running_var});
  return {output, save_mean, save_var};
}

// batch_norm_backward written with differentiable ATen operations: used only when its own
// result must be differentiated (double backward).  The batch statistics are recomputed
// from `input` so that their dependence on it is part of the graph.
ForwardResult differentiable_backward(const Tensor& grad_output, const Tensor& input,
                                      const optional<Tensor>& weight,
                                      const optional<Tensor>& running_mean,
                                      const optional<Tensor>& running_var, bool training,
                                      double eps, std::array<bool, 3> mask,
                                      optional<c10::ScalarType> param_dtype) {
  // Sizes stay symbolic (sym_size) so that torch.compile can trace this with dynamic shapes.
  std::vector<int64_t> reduce_dims = {0};
  std::vector<c10::SymInt> shape(input.dim(), 1);  // (1, C, 1, ...): broadcasts over a channel
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
  shape[1] = input.sym_size(1);
  const auto opmath = at::toOpMathType(input.scalar_type());
  const Tensor x = input.to(opmath), dy = grad_output.to(opmath);

  Tensor mean, invstd;
  if (training) {
    mean = x.mean(reduce_dims, /*keepdim=*/true);
    invstd = ((x - mean).square().mean(reduce_dims, true) + eps).rsqrt();
  } else {
    mean = running_mean->to(opmath).reshape_symint(shape);
    invstd = (running_var->to(opmath) + eps).rsqrt().reshape_symint(shape);
  }
  const Tensor x_hat = (x - mean) * invstd;
  const Tensor w = given(weight) ? weight->to(opmath).reshape_symint(shape) : at::ones({}, x.options());
  const Tensor dy_x_hat = dy * x_hat;

  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0]) {
    grad_input = training ? dy - dy.mean(reduce_dims, true) - x_hat * dy_x_hat.mean(reduce_dims, true)
                          : dy;
    grad_input = (grad_input * (invstd * w)).to(input.scalar_type());
  }
  const auto param_type = given(weight) ? weight->scalar_type() : param_dtype.value_or(input.scalar_type());
  if (mask[1]) grad_weight = dy_x_hat.sum(reduce_dims).to(param_type);
  if (mask[2]) grad_bias = dy.sum(reduce_dims).to(param_type);
  return {grad_input, grad_weight, grad_bias};
}

// batch_norm_act_backward with differentiable ATen operations (double backward): dz, the
// gradient at the batch norm's output, from the activation's derivative (relu: the mask of
// the output, whose derivative is 0; silu: at z recomputed from the input, differentiably),
// then batch_norm_backward's; dz is also the residual's gradient.
ActBackwardResult differentiable_act_backward(
    const Tensor& grad_output, const optional<Tensor>& output, const Tensor& input,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
    double eps, const optional<Tensor>& residual, bool has_residual, c10::string_view activation,
    std::array<bool, 4> mask, optional<c10::ScalarType> param_dtype) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  Tensor dz = grad_output;
  if (activation == "relu") {  // threshold_backward's: stopped where the output is <= 0
    dz = at::where(*output <= 0, at::zeros({}, grad_output.options()), grad_output);
  } else if (activation == "silu") {
    std::vector<int64_t> reduce_dims = {0};
    for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
    std::vector<c10::SymInt> shape(input.dim(), 1);
    shape[1] = input.sym_size(1);
    const Tensor x = input.to(opmath);
    Tensor mean, invstd;
    if (training) {
      mean = x.mean(reduce_dims, /*keepdim=*/true);
      invstd = ((x - mean).square().mean(reduce_dims, true) + eps).rsqrt();
    } else {
      mean = running_mean->to(opmath).reshape_symint(shape);
      invstd = (running_var->to(opmath) + eps).rsqrt().reshape_symint(shape);
    }
    Tensor z = (x - mean) * invstd;
    if (given(weight)) z = z * weight->to(opmath).reshape_symint(shape);
    if (given(bias)) z = z + bias->to(opmath).reshape_symint(shape);
    if (has_residual) z = z + residual->to(opmath);
    const Tensor sigmoid = z.sigmoid();
    dz = (grad_output.to(opmath) * sigmoid * (1 + z * (1 - sigmoid))).to(input.scalar_type());
  }
  auto [grad_input, grad_weight, grad_bias] = differentiable_backward(
      dz, input, weight, running_mean, running_var, training, eps, {mask[0], mask[1], mask[2]},
      param_dtype);
  return {grad_input, grad_weight, grad_bias, mask[3] ? dz : Tensor()};
}

ActBackwardResult batch_norm_act_backward_autograd(
    const Tensor& grad_output, const optional<Tensor>& output, const Tensor& input,
    const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const Tensor& save_mean, const Tensor& save_var, bool training, double eps,
    const optional<Tensor>& residual, bool has_residual, c10::string_view activation,
    std::array<bool, 4> mask, optional<c10::ScalarType> param_dtype) {
  auto wants_grad = [](const optional<Tensor>& t) { return given(t) && t->requires_grad(); };
  auto tangent = [](const optional<Tensor>& t) { return given(t) && has_tangent(*t); };
  const bool differentiate =
      (at::GradMode::is_enabled() &&
       (grad_output.requires_grad() || input.requires_grad() || wants_grad(weight) ||
        wants_grad(bias) || wants_grad(residual))) ||
      (dual_level_open() && (has_tangent(grad_output) || has_tangent(input) || tangent(weight) ||
                             tangent(bias) || tangent(residual)));
  if (differentiate) {
    return differentiable_act_backward(grad_output, output, input, weight, bias, running_mean,
                                       running_var, training, eps, residual, has_residual,
                                       activation, mask, param_dtype);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return act_backward_op().call(grad_output, output, input, weight, bias, running_mean,
                                running_var, save_mean, save_var, training, eps, residual,
                                has_residual, activation, mask, param_dtype);
}

ForwardResult batch_norm_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                           const optional<Tensor>& weight,
                                           const optional<Tensor>& running_mean,
                                           const optional<Tensor>& running_var,
                                           const Tensor& save_mean, const Tensor& save_var,
                                           bool training, double eps, std::array<bool, 3> mask,
                                           optional<c10::ScalarType> param_dtype) {
  // A tangent (forward-mode AD: dual tensors, torch.func.jvp, jacfwd, hessian) needs the
  // differentiable form as much as requires_grad does: the kernel would drop it silently.
  const bool differentiate =
      (at::GradMode::is_enabled() &&
       (grad_output.requires_grad() || input.requires_grad() ||
        (given(weight) && weight->requires_grad()))) ||
      (dual_level_open() && (has_tangent(grad_output) || has_tangent(input) ||
                             (given(weight) && has_tangent(*weight))));
  if (differentiate) {
    return differentiable_backward(grad_output, input, weight, running_mean, running_var,
                                   training, eps, mask, param_dtype);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_var, training, eps, mask, param_dtype);
}

// A double as Python's repr() writes it (shortest round trip; fixed notation from 1e-4 to
// 1e16, with a ".0" if need be): native formats eps in Python, so messages then match.
std::string python_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto end = std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::scientific).ptr;
  std::string text(buffer, end);  // shortest round trip: [-]d[.ddd]e[+-]dd
  const bool negative = text[0] == '-';
  if (negative) text.erase(0, 1);
  const size_t e = text.find('e');
  std::string digits = text.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exponent = std::stoi(text.substr(e + 1));
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent >= 0) {
      std::string whole = digits.substr(0, std::min<size_t>(digits.size(), exponent + 1));
      whole.append(exponent + 1 - whole.size(), '0');
      out = whole + "." + (digits.size() > size_t(exponent) + 1 ? digits.substr(exponent + 1) : "0");
    } else {
      out = "0." + std::string(-exponent - 1, '0') + digits;
    }
  } else {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char exponent_text[8];
    std::snprintf(exponent_text, sizeof(exponent_text), "e%c%02d", exponent < 0 ? '-' : '+',
                  std::abs(exponent));
    out += exponent_text;
  }
  return negative ? "-" + out : out;
}

// What torch.nn.functional.batch_norm checks before anything else, with its exception
// types: ValueError for a single value per channel and for eps, IndexError for a 0-D
// input in training.  The operator checks the rest (batch_norm_cpu.cpp, check_inputs).
void check_functional_args(const Tensor& input, bool training, double eps) {
  if (training) {
    TORCH_CHECK_INDEX(input.dim() > 0, "batch_norm: expected an input of shape (N, C, *), got a 0-D tensor");
    c10::SymInt values = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values *= input.sym_size(d);
    if (values == 1) {
      std::ostringstream sizes;
      sizes << "torch.Size([";
      for (int64_t d = 0; d < input.dim(); ++d) sizes << (d ? ", " : "") << input.sym_size(d);
      sizes << "])";
      TORCH_CHECK_VALUE(false, "Expected more than 1 value per channel when training, got input size ",
                        sizes.str());
    }
    // As native's `eps <= 0.0` and `eps < 0.0`: NaN passes.
    TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive during training, but got ",
                      python_repr(eps));
  } else {
    TORCH_CHECK_VALUE(!(eps < 0), "batch_norm eps must be non-negative, but got ", python_repr(eps));
  }
}

// batch_norm: checks, the differentiable forward, and in training the update of the
// running statistics (not differentiated).  CompositeImplicitAutograd: torch.compile
// traces through it and sees the functional forward and the in-place update apart.
Tensor batch_norm(const Tensor& input, const optional<Tensor>& weight,
                  const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                  const optional<Tensor>& running_var, bool training, optional<double> momentum,
                  double eps, const optional<Tensor>& num_batches_tracked) {
  check_functional_args(input, training, eps);
  if (input.sym_numel() == 0) {
    // As aten::batch_norm: an empty batch gives an empty output, still connected to the
    // weight and bias for autograd, and leaves the running statistics alone.
    Tensor out = input.clone();
    if (given(weight)) out = out * (*weight)[0];
    if (given(bias)) out = out + (*bias)[0];
    return out;
  }
  // The running statistics go to the forward in training too (it checks them, and does
  // not read or save them there).
  Tensor output, save_mean, save_var;
  if (needs_python_autograd(input, weight, bias)) {
    std::tie(output, save_mean, save_var) =
        forward_op().call(input, weight, bias, running_mean, running_var, training, eps);
  } else if (records_nothing(input, {&weight, &bias})) {  // no_grad, inference: the forward alone
    check_not_requiring_grad(running_mean, running_var);
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_var) =
        forward_op().call(input, weight, bias, running_mean, running_var, training, eps);
  } else {  // the eager fast path: our node, no dispatcher round trip
    check_not_requiring_grad(running_mean, running_var);
    std::tie(output, save_mean, save_var) =
        forward_with_node(input, weight, bias, without_tangent(running_mean),
                          without_tangent(running_var), training, eps);
  }
  if (training && given(running_mean)) {
    at::NoGradGuard no_grad;
    Tensor rm = *running_mean, rv = *running_var;
    update_op().call(rm, rv, save_mean, save_var, input.sym_numel() / input.sym_size(1), momentum,
                     num_batches_tracked);
  }
  return output;
}

// batch_norm_act: batch_norm followed by activation(... + residual), in one kernel pass
// (batch_norm_act_forward), with the same checks, fast path and update.
Tensor batch_norm_act(const Tensor& input, const optional<Tensor>& weight,
                      const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                      const optional<Tensor>& running_var, bool training,
                      optional<double> momentum, double eps,
                      const optional<Tensor>& num_batches_tracked,
                      const optional<Tensor>& residual, c10::string_view activation) {
  check_functional_args(input, training, eps);
  if (input.sym_numel() == 0) {  // as batch_norm, then the residual and the activation
    Tensor out = input.clone();
    if (given(weight)) out = out * (*weight)[0];
    if (given(bias)) out = out + (*bias)[0];
    if (given(residual)) out = out + *residual;
    if (activation == "relu") out = at::relu(out);
    if (activation == "silu") out = at::silu(out);
    return out;
  }
  Tensor output, save_mean, save_var;
  if (needs_python_autograd(input, weight, bias) ||
      (given(residual) && dual_level_open() && has_tangent(*residual))) {
    std::tie(output, save_mean, save_var) = act_forward_op().call(
        input, weight, bias, running_mean, running_var, training, eps, residual, activation);
  } else if (records_nothing(input, {&weight, &bias, &residual})) {  // as in batch_norm
    check_not_requiring_grad(running_mean, running_var);
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, save_mean, save_var) = act_forward_op().call(
        input, weight, bias, running_mean, running_var, training, eps, residual, activation);
  } else {  // the eager fast path, as in batch_norm
    check_not_requiring_grad(running_mean, running_var);
    std::tie(output, save_mean, save_var) = act_forward_with_node(
        input, weight, bias, without_tangent(running_mean), without_tangent(running_var),
        training, eps, residual, activation);
  }
  if (training && given(running_mean)) {
    at::NoGradGuard no_grad;
    Tensor rm = *running_mean, rv = *running_var;
    update_op().call(rm, rv, save_mean, save_var, input.sym_numel() / input.sym_size(1), momentum,
                     num_batches_tracked);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(batchnorm_ext, Autograd, m) {
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
}

TORCH_LIBRARY_IMPL(batchnorm_ext, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm_act", &batch_norm_act);
}

// Under vmap the batched key comes before the composite kernel (and the batched fallback
// refuses an operator that mutates its arguments): decompose there too, as functorch does
// for ATen's composite operators.  The steps reach the vmap rules of batch_norm_forward and
// update_running_stats_ (batchnorm_ext/_vmap.py), which hold native's semantics.
TORCH_LIBRARY_IMPL(batchnorm_ext, FuncTorchBatched, m) {
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm_act", &batch_norm_act);
}

}  // namespace batchnorm_ext
