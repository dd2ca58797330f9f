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
  // Into an empty set: b as it is.  The formula gives the same but for a mean beyond
  // 1e154 (double input), whose delta^2 overflows: delta^2 * 0 would make M2 NaN.
  if (a.count == 0) {
    a = b;
    return;
  }
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

// A float sum rounds relative to its running total, which grows with every term: summed
// in float lanes over a whole block (2048 values: 128 terms per lane with AVX2), sum(dy)
// came out 1.7 times as far from the float64 sum as native's, which sums each plane in
// float and the planes in double.  So the gradient sums are taken in two levels (a
// cascade): the running lanes are folded into a second vector every kFoldValues values,
// which leaves about 8 terms per lane in the first level and at most 2048 / kFoldValues
// in the second, for a vector add per fold (a horizontal sum into double per fold
// measured 5-10% slower on bfloat16 backward passes).
template <typename T>
constexpr int64_t kFoldValues = 16 * kLanes<T>;

// Two float accumulators (two independent add chains) and the vector they are folded into.
template <typename Vec>
struct CascadeSum {
  Vec lanes[2] = {Vec(0), Vec(0)};
  Vec folded = Vec(0);
  void fold() {
    folded += lanes[0] + lanes[1];
    lanes[0] = lanes[1] = Vec(0);
  }
  double total() const { return sum_lanes(folded); }  // after the last fold
};

// Calls sum(offset, len) over the block's runs, cut into pieces of at most kFoldValues
// values, and fold() whenever kFoldValues values or more were summed since the last fold,
// and at the end.  Always inlined: called out of line, the accumulators that sum and fold
// share would live in memory rather than registers.
template <typename T, typename Sum, typename Fold>
C10_ALWAYS_INLINE void for_each_fold(const Block& block, Sum sum, Fold fold) {
  int64_t since_fold = 0;
  block.for_each_run([&](int64_t offset, int64_t len) {
    for (int64_t start = 0; start < len; start += kFoldValues<T>) {
      const int64_t n = std::min(kFoldValues<T>, len - start);
      sum(offset + start, n);
      since_fold += n;
      if (since_fold >= kFoldValues<T>) {
        fold();
        since_fold = 0;
      }
    }
  });
  if (since_fold > 0) fold();
}

// sum(dz) and sum(dz * (x - mean)) over a block, where dz = grad_at(i, n) is the gradient
// at the batch norm's output for the n values at index i (n = lanes but for a last partial
// vector, whose missing lanes must be 0).  Without an epilogue dz is grad_output; with one
// it comes from the epilogue's backward (see epilogues.h).
template <typename T, typename GradAt>
GradSums block_grad_sums(const T* input, const Block& block, opmath_t<T> mean, GradAt grad_at) {
  using Vec = Vectorized<opmath_t<T>>;
  const Vec mean_vec(mean);
  CascadeSum<Vec> dy_sum, dy_xmu_sum;
  for_each_fold<T>(block, [&](int64_t offset, int64_t len) {
    for_each_vector_index<T>(len, [&](int j, int64_t i, int64_t n) {
      const Vec dz = grad_at(offset + i, n);
      dy_sum.lanes[j] += dz;
      dy_xmu_sum.lanes[j] =
          at::vec::fmadd(dz, load_vec_n(input + offset + i, n) - mean_vec, dy_xmu_sum.lanes[j]);
    });
  }, [&] { dy_sum.fold(); dy_xmu_sum.fold(); });
  return {dy_sum.total(), dy_xmu_sum.total()};
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
  CascadeSum<Vec> dy_sum, dy_xmu_sum;
  for_each_fold<T>(block, [&](int64_t offset, int64_t len) {
    // Missing lanes of a last partial vector have dy = 0 and add nothing.
    for_each_vector_pair(input + offset, grad_output + offset, len, [&](int j, Vec x, Vec dy) {
      dy_sum.lanes[j] += dy;
      dy_xmu_sum.lanes[j] = at::vec::fmadd(dy, x - mean_vec, dy_xmu_sum.lanes[j]);
    });
  }, [&] { dy_sum.fold(); dy_xmu_sum.fold(); });
  return {dy_sum.total(), dy_xmu_sum.total()};
}

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
