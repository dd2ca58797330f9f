// Batch normalization kernels, part 6: the entry points, one template for every dtype and
// both layouts, and the table of them for this instruction set.  kernel_<isa>.cpp compiles
// this header (and the five it includes: vec_io.h, moments.h, channels_first.h,
// channels_last.h, epilogues.h) once per instruction set.
//
// T is the input dtype, P the parameter dtype: opmath_t<T> (float for bfloat16 and half
// input; parameters of their own type are widened to float first, see dispatch_dtypes).
#pragma once

#include "channels_first.h"
#include "channels_last.h"
#include "epilogues.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// invstd = 1 / sqrt(var + eps), for a channel or a vector of them.  In training (batch
// variance, double) a constant channel with eps = 0 gets 0, not infinity, as native.
inline double batch_inverse_std(double var, double eps) {
  return (var == 0 && eps == 0) ? 0.0 : 1.0 / std::sqrt(var + eps);
}
inline Vectorized<double> batch_inverse_std(const Vectorized<double>& var, double eps) {
  using Vec = Vectorized<double>;
  const Vec invstd = Vec(1) / (var + Vec(eps)).sqrt();
  return eps == 0 ? Vec::blendv(invstd, Vec(0), var == Vec(0)) : invstd;
}

// The per-channel arithmetic of a call with many channels and few values each is a large
// part of it (8x512x1x1: one division and square root per channel, one at a time, were a
// fifth of the training forward).  So where every channel is done at once, it runs a
// vector of channels at a time; IEEE division and square root round exactly, so each value
// is the one computed alone.

// batch_inverse_std of every channel's batch variance (training).
inline std::vector<double> batch_inverse_stds(const double* var, double eps, int64_t C) {
  std::vector<double> invstd(C);
  map_run<false>(invstd.data(), C, [eps](auto v) { return batch_inverse_std(v, eps); }, var);
  return invstd;
}

// invstd = 1 / sqrt(running_var + eps) of every channel, in acc_t as native (eval).
template <typename A>
std::vector<A> running_inverse_stds(const A* running_var, double eps, int64_t C) {
  std::vector<A> invstd(C);
  map_run<false>(invstd.data(), C, [eps](auto v) {
    using Vec = decltype(v);
    return Vec(1) / (v + Vec(A(eps))).sqrt();
  }, running_var);
  return invstd;
}

// The forward: statistics (training), per-channel coefficients, then the output, through
// the epilogue (epilogues.h): y = activation(z [+ residual]) with z the normalized value.
template <typename T, typename P>
void forward_typed(const ForwardArgs& args) {
  using acc_t = opmath_t<T>;
  const Geometry& g = args.geometry;
  const int64_t C = g.channels;
  if (g.count() == 0 || C == 0) {  // nothing to normalize (and nothing to divide by below)
    if (args.training && args.batch_mean == nullptr && args.save_mean != nullptr) {
      for (int64_t c = 0; c < C; ++c) {  // the statistics of no values
        static_cast<double*>(args.save_mean)[c] = std::numeric_limits<double>::quiet_NaN();
        static_cast<double*>(args.save_var)[c] = std::numeric_limits<double>::quiet_NaN();
      }
    }
    return;
  }
  const T* x = static_cast<const T*>(args.input);
  const T* residual = static_cast<const T*>(args.residual);
  T* y = static_cast<T*>(args.output);
  const P* weight = static_cast<const P*>(args.weight);
  const P* bias = static_cast<const P*>(args.bias);

  // Training: z = (x - mean) * scale + shift, with scale = weight / sqrt(var + eps) and
  // shift = bias: subtracting the mean first keeps the rounding small when it is large.
  // Eval: z = x * scale + (shift - mean * scale), one multiply-add, as native computes it.
  std::vector<acc_t> mean(C), scale(C), shift(C);
  auto set_coefficients = [&](int64_t c, acc_t channel_mean, acc_t invstd) {
    mean[c] = channel_mean;
    scale[c] = (weight ? acc_t(weight[c]) : acc_t(1)) * invstd;
    shift[c] = bias ? acc_t(bias[c]) : acc_t(0);
  };
  // Training: from the batch mean, variance and invstd, saved (for the backward and the
  // running statistics) where asked.
  auto set_batch_coefficients = [&](int64_t c, double batch_mean, double var, double invstd) {
    if (args.save_mean != nullptr) {
      static_cast<double*>(args.save_mean)[c] = batch_mean;
      static_cast<double*>(args.save_var)[c] = var;
    }
    set_coefficients(c, acc_t(batch_mean), acc_t(invstd));
    // x - mean[c] is exact for x near the mean; what rounding the mean to acc_t lost goes
    // into the shift: z = (x - mean_hi) * scale + (shift - (mean - mean_hi) * scale).
    shift[c] = acc_t(double(shift[c]) - (batch_mean - double(mean[c])) * double(scale[c]));
  };
  // One channel's statistics (as the channels-first reduction hands them over) ...
  auto finish = [&](int64_t c, const Moments& m) {
    const double var = m.m2 / double(m.count);
    set_batch_coefficients(c, m.mean, var, batch_inverse_std(var, args.eps));
  };
  // ... or every channel's at once, from arrays of batch means and variances ...
  auto finish_all = [&](const double* batch_mean, const double* var) {
    const std::vector<double> invstd = batch_inverse_stds(var, args.eps, C);
    for (int64_t c = 0; c < C; ++c) set_batch_coefficients(c, batch_mean[c], var[c], invstd[c]);
  };
  // ... or from every channel's statistics, each of g.count() values.
  auto finish_moments = [&](const std::vector<Moments>& moments) {
    std::vector<double> batch_mean(C), m2(C), var(C);
    for (int64_t c = 0; c < C; ++c) {
      batch_mean[c] = moments[c].mean;
      m2[c] = moments[c].m2;
    }
    const double count = double(g.count());
    map_run<false>(var.data(), C, [count](auto v) { return v / decltype(v)(count); }, m2.data());
    finish_all(batch_mean.data(), var.data());
  };
  if (!args.training) {
    const P* running_mean = static_cast<const P*>(args.running_mean);
    const std::vector<acc_t> invstd = running_inverse_stds(static_cast<const P*>(args.running_var), args.eps, C);
    for (int64_t c = 0; c < C; ++c) {
      set_coefficients(c, acc_t(running_mean[c]), invstd[c]);
      shift[c] -= mean[c] * scale[c];
    }
  }
  // Statistics of a larger batch given (SyncBatchNorm): used as if computed here.
  const bool given = args.training && args.batch_mean != nullptr;
  if (given) finish_all(args.batch_mean, args.batch_var);
  const bool stream = streams(y, g);
  // z for a vector or a single value, in training and in eval.
  auto centered = [](auto v, auto m, auto s, auto t) { return (v - m) * s + t; };
  auto affine = [](auto v, auto s, auto t) { return multiply_add(v, s, t); };
  // Calls f(epilogue) with epilogue(z, r...) = activation(z + residual) (r: an empty pack
  // without a residual), and write(f) calls f on the input and the residual.
  auto with_output_epilogue = [&](auto f) {
    return with_epilogue(args.activation, residual != nullptr, [&](auto e) {
      using E = decltype(e);
      return f(e, [](auto z, auto... r) { return E::act::forward((z + ... + r)); });
    });
  };

  if (g.layout == Layout::ChannelsFirst) {
    const ChannelsFirstBlocks blocks(g);
    auto moments = [&](int64_t, const Block& b) { return block_moments(x, b); };
    // Short planes of data from memory: the statistics first, in memory order (see
    // channels_first_plane_reduce), then the output as in eval.
    const bool plane_order = args.training && !given &&
                             reduces_in_plane_order<T>(g, 1 + (y != nullptr) + (residual != nullptr));
    if (plane_order) {
      finish_moments(channels_first_plane_reduce<Moments>(g, moments));
    } else if (args.training && !given && !y) {  // statistics only
      channels_first_reduce_apply<Moments>(blocks, moments, finish, [](int64_t, const Block&) {});
      return;
    }
    if (y == nullptr) return;
    // The epilogue, training or eval and streaming or not are chosen once, outside the
    // loops: blocks can be short (a 7x7 plane is 4 vectors, which a branch or two per
    // plane slows by a third).
    with_output_epilogue([&](auto e, auto epilogue) {
      using E = decltype(e);
      with_bool(args.training, [&](auto training) {
        with_bool(stream, [&](auto streaming) {
          auto normalize = [&](int64_t c, const Block& block) {
            const acc_t m = mean[c], s = scale[c], t = shift[c];
            auto f = [=](auto v, auto... r) {
              using V = decltype(v);
              if constexpr (decltype(training)::value) {
                return epilogue(centered(v, V(m), V(s), V(t)), r...);
              } else {
                return epilogue(affine(v, V(s), V(t)), r...);
              }
            };
            block.for_each_run([&](int64_t offset, int64_t len) {
              if constexpr (E::kResidual) {
                map_run<decltype(streaming)::value>(y + offset, len, f, x + offset, residual + offset);
              } else {
                map_run<decltype(streaming)::value>(y + offset, len, f, x + offset);
              }
            });
          };
          if constexpr (decltype(training)::value) {
            if (!given && !plane_order) {
              channels_first_reduce_apply<Moments>(blocks, moments, finish, normalize);
              return;
            }
          }
          channels_first_apply(blocks, normalize);
        });
      });
    });
    return;
  }

  const ChannelsLastPlan plan(g, kLanes<T>);
  if (args.training && !given) {
    finish_moments(channels_last_moments(x, plan));
  }
  if (y == nullptr) return;  // statistics only
  const LanePattern<acc_t> mean_p(mean, plan);
  const LanePattern<acc_t> scale_p(scale, plan);
  const LanePattern<acc_t> shift_p(shift, plan);
  using Patterns = const acc_t*;
  with_output_epilogue([&](auto e, auto epilogue) {
    using E = decltype(e);
    auto write = [&](auto patterns, auto f) {
      constexpr int NP = std::tuple_size_v<decltype(patterns)>;
      if constexpr (E::kResidual) {
        channels_last_map<NP>(plan, stream, patterns, y, f, x, residual);
      } else {
        channels_last_map<NP>(plan, stream, patterns, y, f, x);
      }
    };
    if (args.training) {
      write(std::array<Patterns, 3>{mean_p.data(), scale_p.data(), shift_p.data()},
            [&](const auto& c, auto v, auto... r) { return epilogue(centered(v, c[0], c[1], c[2]), r...); });
    } else {
      write(std::array<Patterns, 2>{scale_p.data(), shift_p.data()},
            [&](const auto& c, auto v, auto... r) { return epilogue(affine(v, c[0], c[1]), r...); });
    }
  });
}

// The backward: the sums over the batch (sum(dz) and sum(dz * (x - mean)), dz the
// gradient at the normalized value), parameter gradients, then grad_input.  With an
// epilogue, dz comes from its backward (epilogues.h); with a residual, dz is also the
// residual's gradient: the sums pass writes it, and grad_input is computed from it.
template <typename T, typename P>
void backward_typed(const BackwardArgs& args) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;
  const Geometry& g = args.geometry;
  const int64_t C = g.channels;
  const T* x = static_cast<const T*>(args.input);
  const T* dy = static_cast<const T*>(args.grad_output);
  const T* y = static_cast<const T*>(args.output);
  const T* residual = static_cast<const T*>(args.residual);
  T* grad_residual = static_cast<T*>(args.grad_residual);
  T* dx = static_cast<T*>(args.grad_input);
  const P* weight = static_cast<const P*>(args.weight);
  const P* bias = static_cast<const P*>(args.bias);
  P* grad_weight = static_cast<P*>(args.grad_weight);
  P* grad_bias = static_cast<P*>(args.grad_bias);
  if (g.count() == 0 || C == 0) {  // every sum is over no values; no grad_input to write
    for (int64_t c = 0; c < C; ++c) {
      if (grad_weight) grad_weight[c] = P(0);
      if (grad_bias) grad_bias[c] = P(0);
      if (args.grad_sums) args.grad_sums[c] = args.grad_sums[C + c] = 0.0;
    }
    return;
  }

  // The statistics the forward normalized with.  The batch mean (double) is split into
  // mean (rounded to acc_t, subtracted from x exactly) and mean_low, the rest.
  // invstd as the forward computed it.
  std::vector<acc_t> mean(C), invstd(C);
  std::vector<double> mean_low(C, 0.0);
  if (args.training) {
    const double* batch_mean = static_cast<const double*>(args.save_mean);
    const std::vector<double> batch_invstd =
        batch_inverse_stds(static_cast<const double*>(args.save_var), args.eps, C);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = acc_t(batch_mean[c]);
      mean_low[c] = batch_mean[c] - double(mean[c]);
      invstd[c] = acc_t(batch_invstd[c]);
    }
  } else {
    const P* running_mean = static_cast<const P*>(args.running_mean);
    for (int64_t c = 0; c < C; ++c) mean[c] = acc_t(running_mean[c]);
    invstd = running_inverse_stds(static_cast<const P*>(args.running_var), args.eps, C);
  }

  // dx = k_dy * dz + k_x * (x - mean) + k_c.  In training the batch statistics depend on
  // x, which gives k_x and k_c; in eval they are constants and dx = k_dy * dz.
  std::vector<acc_t> k_dy(C), k_x(C, acc_t(0)), k_c(C, acc_t(0));
  for (int64_t c = 0; c < C; ++c) k_dy[c] = (weight ? acc_t(weight[c]) : acc_t(1)) * invstd[c];
  // SiLU's z, recomputed as the forward computed it: z = (x - mean) * k_dy + z_shift in
  // training, z = x * k_dy + z_shift in eval.
  const bool needs_z = args.activation == Activation::SiLU;
  std::vector<acc_t> z_shift(C, acc_t(0));
  for (int64_t c = 0; c < C && needs_z; ++c) {
    const acc_t b = bias ? acc_t(bias[c]) : acc_t(0);
    z_shift[c] = args.training ? acc_t(double(b) - mean_low[c] * double(k_dy[c])) : b - mean[c] * k_dy[c];
  }
  // Values per channel: here, or over all processes when the sums are given (SyncBatchNorm).
  // (Multiplied by 1 / count: a division per channel was a tenth of the backward of
  // 8x512x1x1.)
  const double inv_count = 1.0 / double(args.given_sums ? args.count : g.count());
  auto finish = [&](int64_t c, const GradSums& sums) {
    // The sums used x - mean[c]; sum(dz * (x - true mean)) differs by mean_low * sum(dz).
    // Sums given from outside are already the true ones.
    const double dy_xmu = args.given_sums ? sums.dy_xmu : sums.dy_xmu - mean_low[c] * sums.dy;
    if (grad_weight) grad_weight[c] = P(dy_xmu * invstd[c]);
    if (grad_bias) grad_bias[c] = P(sums.dy);
    if (args.grad_sums) {
      args.grad_sums[c] = sums.dy;
      args.grad_sums[C + c] = dy_xmu;
    }
    if (args.training) {
      const double i = invstd[c];
      const double kx = -double(k_dy[c]) * i * i * dy_xmu * inv_count;
      k_x[c] = acc_t(kx);
      k_c[c] = acc_t(-double(k_dy[c]) * sums.dy * inv_count - kx * mean_low[c]);
    }
  };
  if (args.given_sums) {
    for (int64_t c = 0; c < C; ++c) finish(c, {args.given_sums[c], args.given_sums[C + c]});
  }
  // With a residual the sums pass writes dz (its gradient), so it runs even in eval.
  const bool need_sums = !args.given_sums && (grad_weight || grad_bias || args.grad_sums ||
                                              (dx && args.training) || grad_residual);
  const bool stream = dx && streams(dx, g);
  const bool training = args.training;

  // dz from the vectors (or values) at one place: grad (dy), and out (y, for ReLU) or z
  // (SiLU), z being computed from v (x), the coefficients m, s, t and the residual r (an
  // empty pack or one).
  auto dz_of = [training](auto e, auto grad, auto v, auto out, auto m, auto s, auto t, auto... r) {
    using Act = typename decltype(e)::act;
    using V = decltype(grad);
    if constexpr (Act::kBackwardNeedsZ) {
      const V z = training ? (v - m) * s + t : multiply_add(v, s, t);
      return Act::backward(grad, out, (z + ... + r));
    } else {
      return Act::backward(grad, out, grad);
    }
  };
  // What an epilogue reads besides dy: y (ReLU's mask) or x and the residual (SiLU's z).
  // Whatever it does not read is given as dy (never used, and no extra stream).
  const T* out_or_dy = args.activation == Activation::ReLU ? y : dy;
  const T* residual_or_dy = residual ? residual : dy;
  const bool residual_read = needs_z && residual;

  // The two forms of dx from dz, for a vector or a single value.
  auto dx_train = [](auto grad, auto v, auto a, auto b, auto k, auto m) {
    return multiply_add(a, grad, multiply_add(b, v - m, k));
  };
  auto dx_eval = [](auto grad, auto a) { return grad * a; };
  // Where dx reads dz from: grad_residual once the sums pass wrote it; dy for a plain
  // batch norm; otherwise dz is computed again from dy (and y or x).
  const bool plain = args.activation == Activation::Identity && !grad_residual;
  const T* dz_in_memory = grad_residual ? grad_residual : (plain ? dy : nullptr);
  auto with_grad_epilogue = [&](auto f) {
    return with_epilogue(args.activation, grad_residual != nullptr, f);
  };

  if (g.layout == Layout::ChannelsFirst) {
    const ChannelsFirstBlocks blocks(g);
    // The epilogue is chosen once, outside the loops (blocks can be short: a 7x7 plane).
    with_grad_epilogue([&](auto e) {
      using E = decltype(e);
      auto block_sums = [&](int64_t c, const Block& block) {
        const acc_t m = mean[c], s = k_dy[c], t = z_shift[c];
        if constexpr (E::kActivation == Activation::Identity && !E::kResidual) {
          return block_grad_sums(x, dy, block, m);  // dz = dy: nothing to compute or store
        }
        return block_grad_sums(x, block, m, [&](int64_t i, int64_t n) {
          Vec dz;
          if constexpr (E::kActivation == Activation::Identity) {
            dz = load_vec_n(dy + i, n);
          } else {
            const Vec v = load_vec_n(x + i, n);
            const Vec out = load_vec_n(out_or_dy + i, n);
            dz = residual_read ? dz_of(e, load_vec_n(dy + i, n), v, out, Vec(m), Vec(s), Vec(t),
                                       load_vec_n(residual_or_dy + i, n))
                               : dz_of(e, load_vec_n(dy + i, n), v, out, Vec(m), Vec(s), Vec(t));
          }
          if (grad_residual) store_vec(grad_residual + i, dz, n);
          return dz;
        });
      };
      auto apply = [&](int64_t c, const Block& block) {
        if (!dx) return;
        const acc_t a = k_dy[c], b = k_x[c], k = k_c[c], m = mean[c], t = z_shift[c];
        block.for_each_run([&](int64_t offset, int64_t len) {
          if (dz_in_memory && training) {
            map_run(stream, dx + offset, len, [=](auto dz, auto v) {
              using V = decltype(v);
              return dx_train(dz, v, V(a), V(b), V(k), V(m));
            }, dz_in_memory + offset, x + offset);
          } else if (dz_in_memory) {
            map_run(stream, dx + offset, len, [=](auto dz) {
              using V = decltype(dz);
              return dx_eval(dz, V(a));
            }, dz_in_memory + offset);
          } else if constexpr (!E::kResidual && E::kActivation != Activation::Identity) {
            // dz from dy and y (ReLU) or x (SiLU)
            map_run(stream, dx + offset, len, [=](auto grad, auto v, auto out) {
              using V = decltype(grad);
              const V dz = dz_of(e, grad, v, out, V(m), V(a), V(t));
              return training ? dx_train(dz, v, V(a), V(b), V(k), V(m)) : dx_eval(dz, V(a));
            }, dy + offset, x + offset, out_or_dy + offset);
          }
        });
      };
      // Short planes of data from memory: the sums in memory order (see
      // channels_first_plane_reduce), then grad_input.
      const bool plane_order =
          need_sums && reduces_in_plane_order<T>(g, 2 + (dx != nullptr) + (grad_residual != nullptr) +
                                                        (args.activation == Activation::ReLU) + residual_read);
      if (plane_order) {
        const std::vector<GradSums> sums = channels_first_plane_reduce<GradSums>(g, block_sums);
        for (int64_t c = 0; c < C; ++c) finish(c, sums[c]);
        channels_first_apply(blocks, apply);
      } else if (need_sums) {
        channels_first_reduce_apply<GradSums>(blocks, block_sums, finish, apply);
      } else {
        channels_first_apply(blocks, apply);
      }
    });
    return;
  }

  const ChannelsLastPlan plan(g, kLanes<T>);
  const LanePattern<acc_t> mean_p(mean, plan);
  const LanePattern<acc_t> k_dy_p(k_dy, plan);
  const LanePattern<acc_t> z_shift_p(z_shift, plan);
  if (need_sums) {
    const std::vector<GradSums> sums = with_grad_epilogue([&](auto e) {
      auto grad_at = [&](int64_t i, int64_t k, int64_t n) {
        Vec dz;
        if constexpr (decltype(e)::kActivation == Activation::Identity) {
          dz = load_vec_n(dy + i, n);
        } else {
          const Vec m = Vec::loadu(mean_p.data() + k), s = Vec::loadu(k_dy_p.data() + k);
          const Vec t = Vec::loadu(z_shift_p.data() + k);
          const Vec grad = load_vec_n(dy + i, n), v = load_vec_n(x + i, n);
          const Vec out = load_vec_n(out_or_dy + i, n);
          dz = residual_read ? dz_of(e, grad, v, out, m, s, t, load_vec_n(residual_or_dy + i, n))
                             : dz_of(e, grad, v, out, m, s, t);
        }
        if (grad_residual) store_vec(grad_residual + i, dz, n);
        return dz;
      };
      auto grad_at_value = [&](int64_t i, int64_t c) {
        acc_t dz;
        if constexpr (decltype(e)::kActivation == Activation::Identity) {
          dz = acc_t(dy[i]);
        } else {
          const acc_t grad = acc_t(dy[i]), v = acc_t(x[i]), out = acc_t(out_or_dy[i]);
          dz = residual_read ? dz_of(e, grad, v, out, mean[c], k_dy[c], z_shift[c], acc_t(residual_or_dy[i]))
                             : dz_of(e, grad, v, out, mean[c], k_dy[c], z_shift[c]);
        }
        if (grad_residual) grad_residual[i] = T(dz);
        return dz;
      };
      return channels_last_grad_sums(x, plan, mean_p, grad_at, grad_at_value);
    });
    for (int64_t c = 0; c < C; ++c) finish(c, sums[c]);
  }
  if (!dx) return;
  using Patterns = const acc_t*;
  const LanePattern<acc_t> k_x_p(k_x, plan);
  const LanePattern<acc_t> k_c_p(k_c, plan);
  if (dz_in_memory && !training) {
    channels_last_map<1>(plan, stream, {k_dy_p.data()}, dx,
                         [&](const auto& c, auto dz) { return dx_eval(dz, c[0]); }, dz_in_memory);
  } else if (dz_in_memory) {
    channels_last_map<4>(
        plan, stream, {k_dy_p.data(), k_x_p.data(), k_c_p.data(), mean_p.data()}, dx,
        [&](const auto& c, auto dz, auto v) { return dx_train(dz, v, c[0], c[1], c[2], c[3]); },
        dz_in_memory, x);
  } else {  // dz from dy and y (ReLU) or x (SiLU), no residual
    with_epilogue(args.activation, false, [&](auto e) {
      channels_last_map<5>(
          plan, stream,
          std::array<Patterns, 5>{k_dy_p.data(), k_x_p.data(), k_c_p.data(), mean_p.data(),
                                  z_shift_p.data()},
          dx,
          [&](const auto& c, auto grad, auto v, auto out) {
            const auto dz = dz_of(e, grad, v, out, c[3], c[0], c[4]);
            return training ? dx_train(dz, v, c[0], c[1], c[2], c[3]) : dx_eval(dz, c[0]);
          },
          dy, x, out_or_dy);
    });
  }
}

// Parameters of the input's own reduced type (bfloat16 weight for bfloat16 input) are
// widened to float before the kernels run, and their gradients narrowed after: a few values
// per channel, so that every input dtype is one instantiation of the kernels, with
// parameters of opmath_t<T>, not two.  (The kernels widen each parameter to float anyway,
// and round float gradients to the parameter type: the bits are the same.)
template <typename T>
struct WidenedParameters {
  std::vector<float> weight, bias, running_mean, running_var, grad_weight, grad_bias;

  static const float* widen(std::vector<float>& out, const void* p, int64_t n) {
    if (p == nullptr) return nullptr;
    out.assign(static_cast<const T*>(p), static_cast<const T*>(p) + n);
    return out.data();
  }
  ForwardArgs operator()(ForwardArgs args) {
    const int64_t C = args.geometry.channels;
    args.weight = widen(weight, args.weight, C);
    args.bias = widen(bias, args.bias, C);
    args.running_mean = widen(running_mean, args.running_mean, C);
    args.running_var = widen(running_var, args.running_var, C);
    args.param_type = at::kFloat;
    return args;
  }
  BackwardArgs operator()(BackwardArgs args) {
    const int64_t C = args.geometry.channels;
    args.weight = widen(weight, args.weight, C);
    args.bias = widen(bias, args.bias, C);
    args.running_mean = widen(running_mean, args.running_mean, C);
    args.running_var = widen(running_var, args.running_var, C);
    if (args.grad_weight) {
      grad_weight.resize(C);
      args.grad_weight = grad_weight.data();
    }
    if (args.grad_bias) {
      grad_bias.resize(C);
      args.grad_bias = grad_bias.data();
    }
    args.param_type = at::kFloat;
    return args;
  }
  // The gradients, narrowed into the caller's parameter type.
  void narrow(const ForwardArgs&) {}
  void narrow(const BackwardArgs& original) {
    if (original.grad_weight) {
      std::copy(grad_weight.begin(), grad_weight.end(), static_cast<T*>(original.grad_weight));
    }
    if (original.grad_bias) {
      std::copy(grad_bias.begin(), grad_bias.end(), static_cast<T*>(original.grad_bias));
    }
  }
};

// The AVX512_BF16 build (kernel_avx512bf16.cpp defines BATCHNORM_EXT_BFLOAT16_ONLY) differs
// from the AVX512 one only where floats are rounded to bfloat16 (narrow, in vec_io.h), so
// it is compiled for bfloat16 input alone and hands the other dtypes to the AVX512 kernels.
#ifdef BATCHNORM_EXT_BFLOAT16_ONLY
inline void avx512_kernel(const ForwardArgs& args) { kernels_AVX512.forward(args); }
inline void avx512_kernel(const BackwardArgs& args) { kernels_AVX512.backward(args); }
#endif

// One instantiation per input dtype: Kernel<T, opmath_t<T>>.
template <template <typename, typename> class Kernel, typename Args>
void dispatch_dtypes(const Args& args) {
  auto run = [&](auto input) {
    using T = decltype(input);
    if constexpr (at::is_reduced_floating_point_v<T>) {
      if (args.param_type != at::kFloat) {
        WidenedParameters<T> widened;
        Kernel<T, float>::run(widened(args));
        return widened.narrow(args);
      }
    }
    Kernel<T, opmath_t<T>>::run(args);
  };
#ifdef BATCHNORM_EXT_BFLOAT16_ONLY
  if (args.input_type != at::kBFloat16) return avx512_kernel(args);
  run(c10::BFloat16());
#else
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.input_type, "batch_norm_ext",
                                  [&] { run(scalar_t()); });
#endif
}

template <typename T, typename P>
struct Forward {
  static void run(const ForwardArgs& args) { forward_typed<T, P>(args); }
};
template <typename T, typename P>
struct Backward {
  static void run(const BackwardArgs& args) { backward_typed<T, P>(args); }
};

inline void forward(const ForwardArgs& args) { dispatch_dtypes<Forward>(args); }
inline void backward(const BackwardArgs& args) { dispatch_dtypes<Backward>(args); }

}  // namespace CPU_CAPABILITY

// The table for this instruction set: kernels_DEFAULT, kernels_AVX2, kernels_AVX512 or
// kernels_AVX512_BF16.
#define BATCHNORM_EXT_TABLE_NAME(isa) BATCHNORM_EXT_PASTE(kernels_, isa)
#define BATCHNORM_EXT_PASTE(a, b) a##b
extern const KernelTable BATCHNORM_EXT_TABLE_NAME(CPU_CAPABILITY);
const KernelTable BATCHNORM_EXT_TABLE_NAME(CPU_CAPABILITY) = {&CPU_CAPABILITY::forward,
                                                              &CPU_CAPABILITY::backward};

}  // namespace batchnorm_ext::cpu
