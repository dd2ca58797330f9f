// Batch normalization kernels, part 2: statistics of a block of values, and Chan's formula
// to merge them (see vec_io.h for how the kernel headers fit together).
#pragma once

#include "vec_io.h"

#include <cmath>
#include <cstdint>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// The statistics of a set of values are its count, its mean and M2, the sum of squared
// deviations from the mean (variance = M2 / count).  Two sets merge exactly with Chan's
// formula, so a channel's statistics are built from blocks that each fit in L1 cache:
// each block takes two quick sweeps while it is in cache (one pass over memory), and
// no value is ever divided by anything.

struct Moments {
  int64_t count = 0;
  double mean = 0;
  double m2 = 0;
};

// Chan, Golub & LeVeque: the statistics of the union of two disjoint sets.
// The merged mean: a + delta * b_share, which is exact when the means agree; with an
// infinite mean, the weighted mean instead, which stays infinite as a plain sum would.
inline double merged_mean(double a, double b, double delta, double a_share, double b_share) {
  return std::isfinite(delta) ? a + delta * b_share : a * a_share + b * b_share;
}

inline void merge(Moments& a, const Moments& b) {
  if (b.count == 0) return;
  const int64_t n = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double a_share = static_cast<double>(a.count) / n;
  const double b_share = static_cast<double>(b.count) / n;
  a.mean = merged_mean(a.mean, b.mean, delta, a_share, b_share);
  a.m2 += b.m2 + delta * delta * static_cast<double>(a.count) * b_share;
  a.count = n;
}

// max(x, 0) that lets NaN through (std::max(0.0, NaN) is 0).
inline double non_negative(double x) { return x < 0 ? 0.0 : x; }

// About how many values a block holds: 8 KiB of floats, which stay in L1 between the
// two sweeps.
constexpr int64_t kBlockValues = 2048;

// A block: `planes` runs of `len` contiguous values, `stride` apart, from `offset`.
struct Block {
  int64_t offset;
  int64_t planes;
  int64_t len;
  int64_t stride;
  int64_t count() const { return planes * len; }

  template <typename F>
  void for_each_run(F f) const {
    for (int64_t p = 0; p < planes; ++p) f(offset + p * stride, len);
  }
};

// Two passes in double, one value at a time: the slow path for blocks with Inf, NaN or
// values so large that float sums overflow.
template <typename T>
Moments block_moments_exact(const T* data, const Block& block) {
  double sum = 0;
  block.for_each_run([&](int64_t offset, int64_t len) {
    for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(data[offset + i]);
  });
  const double mean = sum / static_cast<double>(block.count());
  double m2 = 0;
  block.for_each_run([&](int64_t offset, int64_t len) {
    for (int64_t i = 0; i < len; ++i) {
      const double d = static_cast<double>(data[offset + i]) - mean;
      m2 += d * d;
    }
  });
  return {block.count(), mean, m2};
}

// The statistics of one block by the corrected two-pass algorithm (Chan, Golub & LeVeque
// 1983): sweep 1 finds the mean; sweep 2, over data now in cache, sums the deviations
// d = x - mean and d^2.  The d sum to zero up to the rounding in the mean, and that
// remainder corrects both the mean and M2, so large offsets cost no accuracy.
template <typename T>
Moments block_moments(const T* data, const Block& block) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;

  Vec sum[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  block.for_each_run([&](int64_t offset, int64_t len) {
    for_each_vector(data + offset, len, acc_t(0), [&](int j, Vec x) { sum[j] += x; });
  });
  const double count = static_cast<double>(block.count());
  const acc_t mean = static_cast<acc_t>(sum_lanes((sum[0] + sum[1]) + (sum[2] + sum[3])) / count);

  const Vec mean_vec(mean);
  Vec dev[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  Vec sq[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  block.for_each_run([&](int64_t offset, int64_t len) {
    // Missing lanes of a last partial vector hold the mean: their deviation is 0.
    for_each_vector(data + offset, len, mean, [&](int j, Vec x) {
      const Vec d = x - mean_vec;
      dev[j] += d;
      sq[j] = at::vec::fmadd(d, d, sq[j]);
    });
  });
  const double d_sum = sum_lanes((dev[0] + dev[1]) + (dev[2] + dev[3]));
  const double d2_sum = sum_lanes((sq[0] + sq[1]) + (sq[2] + sq[3]));
  // Inf or NaN in the block, or float sums that overflowed (values near the float range):
  // do it again in double, as native's double sums would give it.
  if (!std::isfinite(d2_sum)) return block_moments_exact(data, block);
  return {block.count(), mean + d_sum / count, non_negative(d2_sum - d_sum * d_sum / count)};
}

// The two sums the backward needs: sum(dy) and sum(dy * (x - mean)).
struct GradSums {
  double dy = 0;
  double dy_xmu = 0;
};

inline void merge(GradSums& a, const GradSums& b) {
  a.dy += b.dy;
  a.dy_xmu += b.dy_xmu;
}

// sum(dz) and sum(dz * (x - mean)) over a block, where dz = grad_at(i, n) is the gradient
// at the batch norm's output for the n values at index i (n = lanes but for a last partial
// vector, whose missing lanes must be 0).  Without an epilogue dz is grad_output; with one
// it comes from the epilogue's backward (see epilogues.h).
template <typename T, typename GradAt>
GradSums block_grad_sums(const T* input, const Block& block, opmath_t<T> mean, GradAt grad_at) {
  using Vec = Vectorized<opmath_t<T>>;
  const Vec mean_vec(mean);
  Vec dy_sum[2] = {Vec(0), Vec(0)};
  Vec dy_xmu_sum[2] = {Vec(0), Vec(0)};
  block.for_each_run([&](int64_t offset, int64_t len) {
    for_each_vector_index<T>(len, [&](int j, int64_t i, int64_t n) {
      const Vec dz = grad_at(offset + i, n);
      dy_sum[j] += dz;
      dy_xmu_sum[j] = at::vec::fmadd(dz, load_vec_n(input + offset + i, n) - mean_vec, dy_xmu_sum[j]);
    });
  });
  return {sum_lanes(dy_sum[0] + dy_sum[1]), sum_lanes(dy_xmu_sum[0] + dy_xmu_sum[1])};
}

// The same sums when dz is grad_output itself (a plain batch norm): x and dy read side by
// side in one loop, which the general form above, computing dz vector by vector, does not
// match in speed (measured: the plain backward of 16x64x56x56 1.3 ms this way, 1.7 ms the
// general way).
template <typename T>
GradSums block_grad_sums(const T* input, const T* grad_output, const Block& block,
                         opmath_t<T> mean) {
  using Vec = Vectorized<opmath_t<T>>;
  const Vec mean_vec(mean);
  Vec dy_sum[2] = {Vec(0), Vec(0)};
  Vec dy_xmu_sum[2] = {Vec(0), Vec(0)};
  block.for_each_run([&](int64_t offset, int64_t len) {
    // Missing lanes of a last partial vector have dy = 0 and add nothing.
    for_each_vector_pair(input + offset, grad_output + offset, len, [&](int j, Vec x, Vec dy) {
      dy_sum[j] += dy;
      dy_xmu_sum[j] = at::vec::fmadd(dy, x - mean_vec, dy_xmu_sum[j]);
    });
  });
  return {sum_lanes(dy_sum[0] + dy_sum[1]), sum_lanes(dy_xmu_sum[0] + dy_xmu_sum[1])};
}

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
