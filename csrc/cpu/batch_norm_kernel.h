// Batch normalization on the CPU: the kernels.
//
// Read top to bottom:
//   1. moving values between memory and vector registers;
//   2. statistics of a block of values, and Chan's formula to merge them;
//   3. channels-first (NCHW) kernels: a channel is cut into blocks;
//   4. channels-last (NHWC) kernels: every vector lane always sees the same channel;
//   5. the entry points, one template for every dtype.
//
// This header is compiled once per instruction set (kernel_default.cpp, kernel_avx2.cpp,
// kernel_avx512.cpp), each time with CPU_CAPABILITY naming it, so everything here lives in
// the namespace CPU_CAPABILITY, as at::vec does.
#pragma once

#include "kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------
// 1. Values in and out of vector registers.
//
// Arithmetic happens in opmath_t<T>: float for float, bfloat16 and half; double for double.
// A vector holds kLanes<T> values of it (16 floats with AVX-512, 8 with AVX2).

template <typename T>
using opmath_t = at::opmath_type<T>;

template <typename T>
constexpr int64_t kLanes = Vectorized<opmath_t<T>>::size();

template <typename T>
inline Vectorized<opmath_t<T>> load_vec(const T* p) {
  if constexpr (at::is_reduced_floating_point_v<T>) {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);  // kLanes<T> bfloat16/half values, widened to float
    return v;
  } else {
    return Vectorized<T>::loadu(p);
  }
}

// The first `count` (< kLanes) values at p, the other lanes set to `fill`: the end of a
// run is one masked vector rather than a scalar loop.
template <typename T>
inline Vectorized<opmath_t<T>> load_vec(const T* p, int64_t count, opmath_t<T> fill) {
  using Vec = Vectorized<opmath_t<T>>;
  if constexpr (at::is_reduced_floating_point_v<T>) {
    const auto wide = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, count));
    return Vec::set(Vec(fill), std::get<0>(wide), count);
  } else {
    return Vec::set(Vec(fill), Vec::loadu(p, count), count);
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// One vector of floats rounded to bfloat16/half (at::vec's convert_from_float converts two).
template <typename T>
inline auto narrow(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
    // One instruction instead of at::vec's rounding in software, unless a lane holds a
    // denormal float: the instruction flushes those to zero, software rounding keeps them.
    const __m512 magnitude = _mm512_abs_ps(v);
    const __mmask16 denormal =
        _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ) &
        _mm512_cmp_ps_mask(magnitude, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    if (denormal == 0) return __m256i(_mm512_cvtneps_pbh(v));
#endif
    return at::vec::cvtfp32_bf16(v);
  } else {
    return at::vec::cvtfp32_fp16(v);
  }
}
#endif

template <typename T>
inline void store_vec(T* p, const Vectorized<opmath_t<T>>& v, int64_t count = kLanes<T>) {
  if constexpr (at::is_reduced_floating_point_v<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (count == kLanes<T>) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow<T>(v));
#elif defined(CPU_CAPABILITY_AVX2)
    if (count == kLanes<T>) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow<T>(v));
#endif
    at::vec::convert_from_float<T>(v, v).store(p, count);
  } else {
    v.store(p, count);
  }
}

// Stores past the caches (non-temporal): for an output too large to stay in cache, each
// line is then written without first being read in.  p must be aligned to the vector size.
template <typename T>
inline void stream_vec(T* p, const Vectorized<opmath_t<T>>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow<T>(v));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow<T>(v));
  }
#else
  store_vec(p, v);
#endif
}

// Streaming stores are not ordered with ordinary ones: fence them before the data is used.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <bool kStream, typename T>
inline void put_vec(T* p, const Vectorized<opmath_t<T>>& v) {
  if constexpr (kStream) {
    stream_vec(p, v);
  } else {
    store_vec(p, v);
  }
}

// a * b + c, for a vector (one fused instruction) or a single value.
template <typename V>
inline V multiply_add(const V& a, const V& b, const V& c) {
  if constexpr (std::is_arithmetic_v<V>) {
    return a * b + c;
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

template <typename V>
inline typename V::value_type sum_lanes(const V& v) {
  return at::vec::vec_reduce_all<typename V::value_type>([](V a, V b) { return a + b; }, v);
}

// Calls step(j, v) for each vector of the run x[0, len), j = 0..3 cycling so that a caller
// can keep four independent accumulators (one add chain would wait on the add latency).
// The last vector may be partial: its missing lanes hold `fill`.
template <typename T, typename Step>
inline void for_each_vector(const T* x, int64_t len, opmath_t<T> fill, Step step) {
  constexpr int64_t L = kLanes<T>;
  int64_t i = 0;
  for (; i + 4 * L <= len; i += 4 * L) {
    step(0, load_vec(x + i));
    step(1, load_vec(x + i + L));
    step(2, load_vec(x + i + 2 * L));
    step(3, load_vec(x + i + 3 * L));
  }
  for (; i + L <= len; i += L) step(0, load_vec(x + i));
  if (i < len) step(1, load_vec(x + i, len - i, fill));
}

// The same over two runs read side by side (input and grad_output); missing lanes are 0.
template <typename T, typename Step>
inline void for_each_vector_pair(const T* x, const T* y, int64_t len, Step step) {
  constexpr int64_t L = kLanes<T>;
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    step(0, load_vec(x + i), load_vec(y + i));
    step(1, load_vec(x + i + L), load_vec(y + i + L));
  }
  for (; i + L <= len; i += L) step(0, load_vec(x + i), load_vec(y + i));
  if (i < len) step(1, load_vec(x + i, len - i, 0), load_vec(y + i, len - i, 0));
}

// out[i] = f(in[i]...) over a run of values; f is a generic lambda that works on a
// vector and on a single value alike (coefficients are broadcast with V(c)).  With
// kStream, stores past the cache from the first vector-aligned address on.
template <bool kStream, typename T, typename F, typename... In>
inline void map_run(T* out, int64_t len, const F& f, const In*... in) {
  constexpr int64_t L = kLanes<T>;
  int64_t i = 0;
  if constexpr (kStream) {
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) / sizeof(T)) % L;
    if (misaligned != 0) {
      i = std::min(len, L - misaligned);
      store_vec(out, f(load_vec(in, i, 0)...), i);
    }
  }
  for (; i + L <= len; i += L) put_vec<kStream>(out + i, f(load_vec(in + i)...));
  if (i < len) store_vec(out + i, f(load_vec(in + i, len - i, 0)...), len - i);
}

template <typename T, typename F, typename... In>
inline void map_run(bool stream, T* out, int64_t len, const F& f, const In*... in) {
  if (stream) {
    map_run<true>(out, len, f, in...);
  } else {
    map_run<false>(out, len, f, in...);
  }
}

// Outputs at least this large are written with streaming stores: they would not stay in
// the last-level cache anyway (32 MiB, shared, on the machines this was measured on).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
bool streams(const T* out, const Geometry& g) {
  const int64_t bytes = g.count() * g.channels * int64_t(sizeof(T));
  return bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(out) % (kLanes<T> * sizeof(T)) == 0;
}

// ---------------------------------------------------------------------------------------
// 2. Statistics.
//
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

// Values of work below which a loop is not worth a parallel region (ATen uses the same).
constexpr int64_t kGrain = 32768;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// 3. Channels first (contiguous NCHW).
//
// A channel is `batch` planes of `inner` contiguous values, C * inner apart.  It is cut
// into blocks of about kBlockValues: several whole planes when planes are small, pieces of
// one plane when they are large.

constexpr int64_t kBlockValues = 2048;  // 8 KiB of floats: stays in L1 between two sweeps

struct ChannelsFirstBlocks {
  const Geometry& g;
  int64_t planes_per_block;
  int64_t pieces_per_plane;
  int64_t piece_len;
  int64_t per_channel;

  explicit ChannelsFirstBlocks(const Geometry& geometry) : g(geometry) {
    if (g.inner >= kBlockValues) {
      planes_per_block = 1;
      pieces_per_plane = divup(g.inner, kBlockValues);
      // A multiple of 64 values: pieces start aligned whenever the plane does.
      piece_len = divup(divup(g.inner, pieces_per_plane), 64) * 64;
      pieces_per_plane = divup(g.inner, piece_len);
      per_channel = g.batch * pieces_per_plane;
    } else {
      planes_per_block = std::max<int64_t>(1, kBlockValues / g.inner);
      pieces_per_plane = 1;
      piece_len = g.inner;
      per_channel = divup(g.batch, planes_per_block);
    }
  }

  Block operator()(int64_t c, int64_t b) const {
    const int64_t plane_stride = g.channels * g.inner;
    if (pieces_per_plane == 1) {
      const int64_t first = b * planes_per_block;
      const int64_t planes = std::min(planes_per_block, g.batch - first);
      return {(first * g.channels + c) * g.inner, planes, g.inner, plane_stride};
    }
    const int64_t plane = b / pieces_per_plane;
    const int64_t start = (b % pieces_per_plane) * piece_len;
    return {(plane * g.channels + c) * g.inner + start, 1, std::min(piece_len, g.inner - start),
            plane_stride};
  }
};

// Apply alone (eval forward, eval grad_input, and after the statistics of few channels):
// in memory order, plane after plane, long planes in pieces, so that reads and writes
// stream.
template <typename Apply>
void channels_first_apply(const ChannelsFirstBlocks& blocks, Apply apply) {
  const Geometry& g = blocks.g;
  // Pieces of up to 16K values (nothing has to stay in L1 here; they only split the work).
  const int64_t piece_len = divup(std::min(g.inner, 8 * kBlockValues), 64) * 64;
  const int64_t pieces = divup(g.inner, piece_len);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(g.inner, piece_len));
  at::parallel_for(0, g.batch * g.channels * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t plane = u / pieces;
      const int64_t start = (u % pieces) * piece_len;
      apply(plane % g.channels,
            Block{plane * g.inner + start, 1, std::min(piece_len, g.inner - start), 0});
    }
    stream_fence();
  });
}

// The shape shared by the training forward and the backward: reduce every block to a
// Partial (Moments or GradSums), merge a channel's partials in block order, turn the total
// into per-channel coefficients (finish), then write the output block by block (apply).
//
// With many channels each thread takes whole channels and applies right after reducing,
// while the channel is still in L2.  With few channels (C = 3) the blocks of all channels
// are spread over the threads instead.  Blocks and merge order are the same either way, so
// the result is the same to the bit for any number of threads.
template <typename Partial, typename Reduce, typename Finish, typename Apply>
void channels_first_reduce_apply(const ChannelsFirstBlocks& blocks, Reduce reduce,
                                 Finish finish, Apply apply) {
  const Geometry& g = blocks.g;
  const int64_t per_channel = blocks.per_channel;
  const int64_t total_values = g.count() * g.channels;
  const bool by_channel =
      g.channels >= 4 * at::get_num_threads() || total_values <= kGrain;

  if (by_channel) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.count()));
    at::parallel_for(0, g.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Partial total;
        for (int64_t b = 0; b < per_channel; ++b) merge(total, reduce(c, blocks(c, b)));
        finish(c, total);
        for (int64_t b = 0; b < per_channel; ++b) apply(c, blocks(c, b));
      }
      stream_fence();
    });
    return;
  }

  const int64_t units = g.channels * per_channel;
  const int64_t grain = std::max<int64_t>(1, kGrain / kBlockValues);
  std::vector<Partial> partials(units);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      partials[u] = reduce(u / per_channel, blocks(u / per_channel, u % per_channel));
    }
  });
  for (int64_t c = 0; c < g.channels; ++c) {
    Partial total;
    for (int64_t b = 0; b < per_channel; ++b) merge(total, partials[c * per_channel + b]);
    finish(c, total);
  }
  channels_first_apply(blocks, apply);
}

// ---------------------------------------------------------------------------------------
// 4. Channels last (NHWC, and (N, C) input).
//
// The data is rows of C values, so value i belongs to channel i % C.  Read it in periods
// of P = lcm(C, lanes) values: then every lane of every vector always sees the same
// channel, whatever C is (C = 3 gives P = 48 with 16 lanes).  Statistics are kept per lane
// over blocks of whole periods and folded into channels at the end; the rows left over
// after the last full period (fewer than P / C) are handled one value at a time.

struct ChannelsLastPlan {
  int64_t channels;
  int64_t period;             // P = lcm(C, lanes) values
  int64_t rows;               // batch * inner
  int64_t periods;            // full periods
  int64_t tail_begin;         // first value after the last full period
  int64_t periods_per_block;  // a block: two sweeps in cache, like the channels-first one
  int64_t blocks;
  int64_t blocks_per_chunk;   // a chunk: one task of the parallel reduction
  int64_t chunks;

  ChannelsLastPlan(const Geometry& g, int64_t lanes) {
    channels = g.channels;
    period = std::lcm(g.channels, lanes);
    rows = g.count();
    periods = rows * channels / period;
    tail_begin = periods * period;
    // About 4096 values (16 KiB of floats, in L1 between the two sweeps), and at least 16
    // periods so that merging blocks costs little next to reading them (so for a long
    // period, C large and not a multiple of the lanes, a block outgrows L1).
    periods_per_block = std::clamp<int64_t>(2 * kBlockValues / period, 16, 64);
    blocks = divup(periods, periods_per_block);
    // Chunks have a fixed size, never one per thread: the result must not depend on the
    // number of threads.  Their per-lane results (2 P + 1 doubles each) take at most 8 MiB.
    const int64_t max_chunks = std::clamp<int64_t>((int64_t(1) << 20) / (2 * period + 1), 1, 256);
    blocks_per_chunk = std::max<int64_t>(
        {1, 16 * kBlockValues / (periods_per_block * period), divup(blocks, max_chunks)});
    chunks = divup(blocks, blocks_per_chunk);
  }

  int64_t first_period(int64_t block) const { return block * periods_per_block; }
  int64_t periods_in(int64_t block) const {
    return std::min(periods_per_block, periods - first_period(block));
  }
};

// The sums lane_sums returns for a block, per lane.
template <typename A>
struct LaneSums {
  std::vector<A> mean, dev, sq;
  explicit LaneSums(int64_t width) : mean(width), dev(width), sq(width) {}
};

// Calls f(G, k) for groups of G vectors of lanes, [k, k + G * lanes), that cover a
// period: G = 4 where it can, so that four independent accumulators hide the add latency.
template <typename T, typename F>
void for_each_column_group(int64_t period, F f) {
  constexpr int64_t L = kLanes<T>;
  int64_t k = 0;
  for (; k + 4 * L <= period; k += 4 * L) f(std::integral_constant<int, 4>{}, k);
  switch ((period - k) / L) {
    case 3: f(std::integral_constant<int, 3>{}, k); break;
    case 2: f(std::integral_constant<int, 2>{}, k); break;
    case 1: f(std::integral_constant<int, 1>{}, k); break;
    default: break;
  }
}

// Per-lane sums of a block of `n` periods starting at x, in two sweeps while the block is
// in cache, as block_moments does for a run.  The sweep-1 mean and the sums of
// d = x - mean and d^2 are returned raw; merge_block_lanes corrects them in double
// (rounding the corrected mean to float would bias the merged variance).  Returns false if
// the block holds Inf or NaN or its float sums overflowed (see block_moments): then
// lane_sums_exact must do it again.
template <typename T>
bool lane_sums(const T* x, int64_t period, int64_t n, LaneSums<opmath_t<T>>& out) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = kLanes<T>;
  // Sweep 1, row after row as the data lies in memory (so that it streams): the sum of
  // every lane, kept in out.mean.
  acc_t* sum = out.mean.data();
  for (int64_t k = 0; k < period; k += L) load_vec(x + k).store(sum + k);
  for (int64_t r = 1; r < n; ++r) {
    for (int64_t k = 0; k < period; k += L) (Vec::loadu(sum + k) + load_vec(x + r * period + k)).store(sum + k);
  }
  // Sweep 2, over the block now in L1: a group of columns at a time, so that the
  // accumulators are registers.
  const Vec inv_n(acc_t(1) / acc_t(n));
  Vec all_sq(0);
  for_each_column_group<T>(period, [&](auto group, int64_t k) {
    constexpr int G = decltype(group)::value;
    Vec mean[G], dev[G], sq[G];
    for (int g = 0; g < G; ++g) {
      mean[g] = Vec::loadu(sum + k + g * L) * inv_n;
      dev[g] = sq[g] = Vec(0);
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int g = 0; g < G; ++g) {
        const Vec d = load_vec(x + r * period + k + g * L) - mean[g];
        dev[g] += d;
        sq[g] = at::vec::fmadd(d, d, sq[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      mean[g].store(out.mean.data() + k + g * L);
      dev[g].store(out.dev.data() + k + g * L);
      sq[g].store(out.sq.data() + k + g * L);
      all_sq += sq[g];
    }
  });
  return std::isfinite(sum_lanes(all_sq));
}

// The slow path of lane_sums, in double one value at a time (see block_moments_exact):
// the exact mean of every lane, dev = 0, and sq = M2.
template <typename T>
void lane_sums_exact(const T* x, int64_t period, int64_t n, LaneSums<double>& out) {
  std::fill(out.mean.begin(), out.mean.end(), 0.0);
  std::fill(out.dev.begin(), out.dev.end(), 0.0);
  std::fill(out.sq.begin(), out.sq.end(), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t l = 0; l < period; ++l) out.mean[l] += static_cast<double>(x[r * period + l]);
  }
  for (int64_t l = 0; l < period; ++l) out.mean[l] /= static_cast<double>(n);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t l = 0; l < period; ++l) {
      const double d = static_cast<double>(x[r * period + l]) - out.mean[l];
      out.sq[l] += d * d;
    }
  }
}

// Chan's merge of (other_count, other_mean, other_m2) into one lane.  kInfinite: a mean
// may be infinite (see merged_mean); otherwise plain multiply-adds that vectorize.
template <bool kInfinite>
inline void merge_lane(double& mean, double& m2, double other_mean, double other_m2,
                       double own_share, double other_share, double cross) {
  const double delta = other_mean - mean;
  if constexpr (kInfinite) {
    mean = merged_mean(mean, other_mean, delta, own_share, other_share);
  } else {
    mean += delta * other_share;
  }
  m2 += other_m2 + delta * delta * cross;
}

// Chan's merge for every lane at once.  All lanes hold the same count, so the weights are
// scalars.
template <bool kInfinite>
void merge_lanes(double* mean, double* m2, int64_t count, const double* other_mean,
                 const double* other_m2, int64_t other_count, int64_t width) {
  const double own_share = double(count) / double(count + other_count);
  const double other_share = double(other_count) / double(count + other_count);
  const double cross = double(count) * other_share;
  for (int64_t l = 0; l < width; ++l) {
    merge_lane<kInfinite>(mean[l], m2[l], other_mean[l], other_m2[l], own_share, other_share,
                          cross);
  }
}

template <bool kInfinite, typename A>
void merge_block_lanes(double* mean, double* m2, int64_t count, const LaneSums<A>& block,
                       int64_t other_count, int64_t width) {
  const double own_share = double(count) / double(count + other_count);
  const double other_share = double(other_count) / double(count + other_count);
  const double cross = double(count) * other_share;
  const double inv_n = 1.0 / double(other_count);
  for (int64_t l = 0; l < width; ++l) {
    const double dev = block.dev[l];
    merge_lane<kInfinite>(mean[l], m2[l], double(block.mean[l]) + dev * inv_n,
                          non_negative(double(block.sq[l]) - dev * dev * inv_n), own_share,
                          other_share, cross);
  }
}

// Runs reduce_chunk(chunk, lanes) for every chunk in parallel; each chunk writes `width`
// doubles of per-lane results.  Returns them all, chunk after chunk.
template <typename F>
std::vector<double> reduce_chunks(const ChannelsLastPlan& plan, int64_t width, F reduce_chunk) {
  std::vector<double> results(plan.chunks * width, 0.0);
  const int64_t grain = plan.blocks_per_chunk * plan.periods_per_block * plan.period >= kGrain ? 1 : 4;
  at::parallel_for(0, plan.chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) reduce_chunk(chunk, results.data() + chunk * width);
  });
  return results;
}

// Per-channel statistics of channels-last data.
template <typename T>
std::vector<Moments> channels_last_moments(const T* x, const ChannelsLastPlan& plan) {
  using acc_t = opmath_t<T>;
  const int64_t P = plan.period;
  const int64_t C = plan.channels;

  // Per-lane statistics of each chunk: mean[P] then m2[P], then 1 if a mean may be
  // infinite (a block went through lane_sums_exact).
  const int64_t width = 2 * P + 1;
  const std::vector<double> chunk_stats = reduce_chunks(plan, width, [&](int64_t chunk, double* out) {
    LaneSums<acc_t> block(P);
    LaneSums<double> exact(P);
    bool infinite = false;
    int64_t count = 0;
    const int64_t first = chunk * plan.blocks_per_chunk;
    const int64_t last = std::min(plan.blocks, first + plan.blocks_per_chunk);
    for (int64_t b = first; b < last; ++b) {
      const int64_t n = plan.periods_in(b);
      const T* rows = x + plan.first_period(b) * P;
      const bool finite = lane_sums(rows, P, n, block);
      if (!finite) {  // Inf, NaN or float overflow in the block: redo it in double
        lane_sums_exact(rows, P, n, exact);
        infinite = true;
      }
      // From then on a mean may be infinite, and the merges must allow for it.
      if (!infinite) {
        merge_block_lanes<false>(out, out + P, count, block, n, P);
      } else if (finite) {
        merge_block_lanes<true>(out, out + P, count, block, n, P);
      } else {
        merge_block_lanes<true>(out, out + P, count, exact, n, P);
      }
      count += n;
    }
    out[2 * P] = infinite ? 1.0 : 0.0;
  });

  // Merge the chunks in order, then fold lanes into channels: lane l is channel l % C.
  bool infinite = false;
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) infinite |= chunk_stats[chunk * width + 2 * P] != 0;
  std::vector<double> mean(P, 0.0), m2(P, 0.0);
  int64_t count = 0;
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t first = chunk * plan.blocks_per_chunk;
    const int64_t last = std::min(plan.blocks, first + plan.blocks_per_chunk);
    const int64_t n = plan.first_period(last - 1) + plan.periods_in(last - 1) - plan.first_period(first);
    const double* stats = chunk_stats.data() + chunk * width;
    if (infinite) {
      merge_lanes<true>(mean.data(), m2.data(), count, stats, stats + P, n, P);
    } else {
      merge_lanes<false>(mean.data(), m2.data(), count, stats, stats + P, n, P);
    }
    count += n;
  }
  std::vector<Moments> channel(C);
  for (int64_t l = 0; l < P && plan.periods > 0; ++l) merge(channel[l % C], {plan.periods, mean[l], m2[l]});

  // The rows after the last full period, one channel at a time.
  const int64_t tail_rows = (plan.rows * C - plan.tail_begin) / C;
  if (tail_rows > 0) {
    for (int64_t c = 0; c < C; ++c) {
      const T* column = x + plan.tail_begin + c;
      double sum = 0;
      for (int64_t r = 0; r < tail_rows; ++r) sum += double(acc_t(column[r * C]));
      const double tail_mean = sum / tail_rows;
      double sq = 0;
      for (int64_t r = 0; r < tail_rows; ++r) {
        const double d = double(acc_t(column[r * C])) - tail_mean;
        sq += d * d;
      }
      merge(channel[c], {tail_rows, tail_mean, sq});
    }
  }
  return channel;
}

// Per-channel sum(dy) and sum(dy * (x - mean)) of channels-last data.
template <typename T>
std::vector<GradSums> channels_last_grad_sums(const T* x, const T* dy, const ChannelsLastPlan& plan,
                                              const std::vector<opmath_t<T>>& mean_pattern) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;
  const int64_t P = plan.period;
  const int64_t C = plan.channels;

  const std::vector<double> chunk_sums = reduce_chunks(plan, 2 * P, [&](int64_t chunk, double* out) {
    // Per block, row after row (as the data lies in memory), sums per lane in float; then
    // added to the chunk's sums in double.
    std::vector<acc_t> dy_sum(P), dy_xmu_sum(P);
    const int64_t first = chunk * plan.blocks_per_chunk;
    const int64_t last = std::min(plan.blocks, first + plan.blocks_per_chunk);
    for (int64_t b = first; b < last; ++b) {
      std::fill(dy_sum.begin(), dy_sum.end(), acc_t(0));
      std::fill(dy_xmu_sum.begin(), dy_xmu_sum.end(), acc_t(0));
      const int64_t end_row = plan.first_period(b) + plan.periods_in(b);
      for (int64_t r = plan.first_period(b); r < end_row; ++r) {
        for (int64_t k = 0; k < P; k += kLanes<T>) {
          const int64_t i = r * P + k;
          const Vec grad = load_vec(dy + i);
          (Vec::loadu(dy_sum.data() + k) + grad).store(dy_sum.data() + k);
          at::vec::fmadd(grad, load_vec(x + i) - Vec::loadu(mean_pattern.data() + k),
                         Vec::loadu(dy_xmu_sum.data() + k))
              .store(dy_xmu_sum.data() + k);
        }
      }
      for (int64_t l = 0; l < P; ++l) {
        out[l] += dy_sum[l];
        out[P + l] += dy_xmu_sum[l];
      }
    }
  });

  std::vector<GradSums> channel(C);
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const double* sums = chunk_sums.data() + chunk * 2 * P;
    for (int64_t l = 0; l < P; ++l) merge(channel[l % C], {sums[l], sums[P + l]});
  }
  for (int64_t i = plan.tail_begin; i < plan.rows * C; ++i) {
    const int64_t c = i % C;
    const acc_t g = dy[i];
    merge(channel[c], {double(g), double(g * (acc_t(x[i]) - mean_pattern[c]))});
  }
  return channel;
}

// A per-channel coefficient repeated over a period: the coefficient of every lane.
template <typename A>
std::vector<A> lane_pattern(const std::vector<A>& per_channel, int64_t period) {
  std::vector<A> pattern(period);
  for (int64_t l = 0; l < period; ++l) pattern[l] = per_channel[l % per_channel.size()];
  return pattern;
}

// out = f(c, in...) over all the data, where c holds the NP coefficients of each value's
// lane, taken from NP lane patterns: vectors over the full periods, single values after.
// With kStream the output is written with streaming stores.
template <int NP, bool kStream, typename T, typename F, typename... In>
void channels_last_map(const ChannelsLastPlan& plan,
                       const std::array<const opmath_t<T>*, NP>& patterns, T* out, const F& f,
                       const In*... in) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = kLanes<T>;
  const int64_t P = plan.period;
  // Memory is walked in order: going back to earlier rows for the next group of columns
  // measured twice as slow.  So coefficients stay in registers over many rows only when
  // one group of columns is the whole period (C up to 4 vectors of lanes, or C = 3).
  if (P <= 4 * L) {
    const int64_t periods_per_task = std::clamp<int64_t>(kBlockValues / P, 1, 64);
    const int64_t grain = std::max<int64_t>(1, kGrain / (periods_per_task * P));
    at::parallel_for(0, divup(plan.periods, periods_per_task), grain, [&](int64_t begin, int64_t end) {
      for_each_column_group<T>(P, [&](auto group, int64_t k) {
        constexpr int G = decltype(group)::value;
        std::array<Vec, NP> c[G];
        for (int g = 0; g < G; ++g) {
          for (int q = 0; q < NP; ++q) c[g][q] = Vec::loadu(patterns[q] + k + g * L);
        }
        const int64_t last = std::min(plan.periods, end * periods_per_task);
        for (int64_t row = begin * periods_per_task; row < last; ++row) {
          for (int g = 0; g < G; ++g) {
            const int64_t i = row * P + k + g * L;
            put_vec<kStream>(out + i, f(c[g], load_vec(in + i)...));
          }
        }
      });
      stream_fence();
    });
  } else {  // longer periods: the coefficients are loaded (from L1) with each vector
    at::parallel_for(0, plan.periods, std::max<int64_t>(1, kGrain / P), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * P; i < end * P; i += P) {
        for (int64_t k = 0; k < P; k += L) {
          std::array<Vec, NP> c;
          for (int q = 0; q < NP; ++q) c[q] = Vec::loadu(patterns[q] + k);
          put_vec<kStream>(out + i + k, f(c, load_vec(in + i + k)...));
        }
      }
      stream_fence();
    });
  }
  for (int64_t i = plan.tail_begin; i < plan.rows * plan.channels; ++i) {
    std::array<acc_t, NP> c;  // lane i % C: the patterns repeat every C lanes
    for (int q = 0; q < NP; ++q) c[q] = patterns[q][i % plan.channels];
    out[i] = static_cast<T>(f(c, static_cast<acc_t>(in[i])...));
  }
}

template <int NP, typename T, typename F, typename... In>
void channels_last_map(const ChannelsLastPlan& plan, bool stream,
                       const std::array<const opmath_t<T>*, NP>& patterns, T* out, const F& f,
                       const In*... in) {
  if (stream) {
    channels_last_map<NP, true>(plan, patterns, out, f, in...);
  } else {
    channels_last_map<NP, false>(plan, patterns, out, f, in...);
  }
}

// ---------------------------------------------------------------------------------------
// 5. Entry points.  T is the input dtype, P the parameter dtype (T, or float for mixed
// bfloat16/half input).

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
  T* y = static_cast<T*>(args.output);
  const P* weight = static_cast<const P*>(args.weight);
  const P* bias = static_cast<const P*>(args.bias);

  // Training: y = (x - mean) * scale + shift, with scale = weight / sqrt(var + eps) and
  // shift = bias: subtracting the mean first keeps the rounding small when it is large.
  // Eval: y = x * scale + (shift - mean * scale), one multiply-add, as native computes it.
  std::vector<acc_t> mean(C), scale(C), shift(C);
  auto set_coefficients = [&](int64_t c, acc_t channel_mean, acc_t invstd) {
    mean[c] = channel_mean;
    scale[c] = (weight ? acc_t(weight[c]) : acc_t(1)) * invstd;
    shift[c] = bias ? acc_t(bias[c]) : acc_t(0);
  };
  auto finish = [&](int64_t c, const Moments& m) {
    const double var = m.m2 / double(m.count);
    if (args.save_mean != nullptr) {
      static_cast<double*>(args.save_mean)[c] = m.mean;
      static_cast<double*>(args.save_var)[c] = var;
    }
    // As native: a constant channel with eps = 0 gives invstd 0, not infinity.
    const double invstd = (var == 0 && args.eps == 0) ? 0.0 : 1.0 / std::sqrt(var + args.eps);
    set_coefficients(c, acc_t(m.mean), acc_t(invstd));
    // x - mean[c] is exact for x near the mean; what rounding the mean to acc_t lost goes
    // into the shift: y = (x - mean_hi) * scale + (shift - (mean - mean_hi) * scale).
    shift[c] = acc_t(double(shift[c]) - (m.mean - double(mean[c])) * double(scale[c]));
  };
  if (!args.training) {
    const P* running_mean = static_cast<const P*>(args.running_mean);
    const P* running_var = static_cast<const P*>(args.running_var);
    for (int64_t c = 0; c < C; ++c) {
      set_coefficients(c, acc_t(running_mean[c]),
                       acc_t(1) / std::sqrt(acc_t(running_var[c]) + acc_t(args.eps)));
      shift[c] -= mean[c] * scale[c];
    }
  }
  // Statistics of a larger batch given (SyncBatchNorm): used as if computed here.
  const bool given = args.training && args.batch_mean != nullptr;
  if (given) {
    // Moments of count 1 with M2 = var: finish takes var = M2 / count.
    for (int64_t c = 0; c < C; ++c) finish(c, {1, args.batch_mean[c], args.batch_var[c]});
  }
  auto centered = [](auto v, auto m, auto s, auto t) { return (v - m) * s + t; };
  const bool stream = streams(y, g);
  auto affine = [](auto v, auto s, auto t) { return multiply_add(v, s, t); };

  if (g.layout == Layout::ChannelsFirst) {
    const ChannelsFirstBlocks blocks(g);
    auto normalize = [&](int64_t c, const Block& block) {
      const acc_t m = mean[c], s = scale[c], t = shift[c];
      block.for_each_run([&](int64_t offset, int64_t len) {
        if (args.training) {
          map_run(stream, y + offset, len, [=](auto v) {
            using V = decltype(v);
            return centered(v, V(m), V(s), V(t));
          }, x + offset);
        } else {
          map_run(stream, y + offset, len, [=](auto v) {
            using V = decltype(v);
            return affine(v, V(s), V(t));
          }, x + offset);
        }
      });
    };
    auto moments = [&](int64_t, const Block& b) { return block_moments(x, b); };
    if (args.training && !given && y) {
      channels_first_reduce_apply<Moments>(blocks, moments, finish, normalize);
    } else if (args.training && !given) {  // statistics only
      channels_first_reduce_apply<Moments>(blocks, moments, finish, [](int64_t, const Block&) {});
    } else {
      channels_first_apply(blocks, normalize);
    }
    return;
  }

  const ChannelsLastPlan plan(g, kLanes<T>);
  if (args.training && !given) {
    const std::vector<Moments> moments = channels_last_moments(x, plan);
    for (int64_t c = 0; c < C; ++c) finish(c, moments[c]);
  }
  if (y == nullptr) return;  // statistics only
  const auto mean_p = lane_pattern(mean, plan.period);
  const auto scale_p = lane_pattern(scale, plan.period);
  const auto shift_p = lane_pattern(shift, plan.period);
  if (args.training) {
    channels_last_map<3>(plan, stream, {mean_p.data(), scale_p.data(), shift_p.data()}, y,
                         [&](const auto& c, auto v) { return centered(v, c[0], c[1], c[2]); }, x);
  } else {
    channels_last_map<2>(plan, stream, {scale_p.data(), shift_p.data()}, y,
                         [&](const auto& c, auto v) { return affine(v, c[0], c[1]); }, x);
  }
}

template <typename T, typename P>
void backward_typed(const BackwardArgs& args) {
  using acc_t = opmath_t<T>;
  const Geometry& g = args.geometry;
  const int64_t C = g.channels;
  const T* x = static_cast<const T*>(args.input);
  const T* dy = static_cast<const T*>(args.grad_output);
  T* dx = static_cast<T*>(args.grad_input);
  const P* weight = static_cast<const P*>(args.weight);
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
  std::vector<acc_t> mean(C), invstd(C);
  std::vector<double> mean_low(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    if (args.training) {
      const double m = static_cast<const double*>(args.save_mean)[c];
      const double var = static_cast<const double*>(args.save_var)[c];
      mean[c] = acc_t(m);
      mean_low[c] = m - double(mean[c]);
      invstd[c] = (var == 0 && args.eps == 0) ? acc_t(0) : acc_t(1.0 / std::sqrt(var + args.eps));
    } else {
      mean[c] = acc_t(static_cast<const P*>(args.running_mean)[c]);
      const acc_t var = acc_t(static_cast<const P*>(args.running_var)[c]);
      invstd[c] = acc_t(1) / std::sqrt(var + acc_t(args.eps));
    }
  }

  // dx = k_dy * dy + k_x * (x - mean) + k_c.  In training the batch statistics depend on
  // x, which gives k_x and k_c; in eval they are constants and dx = k_dy * dy.
  std::vector<acc_t> k_dy(C), k_x(C, acc_t(0)), k_c(C, acc_t(0));
  for (int64_t c = 0; c < C; ++c) k_dy[c] = (weight ? acc_t(weight[c]) : acc_t(1)) * invstd[c];
  // Values per channel: here, or over all processes when the sums are given (SyncBatchNorm).
  const double count = double(args.given_sums ? args.count : g.count());
  auto finish = [&](int64_t c, const GradSums& sums) {
    // The sums used x - mean[c]; sum(dy * (x - true mean)) differs by mean_low * sum(dy).
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
      const double kx = -double(k_dy[c]) * i * i * dy_xmu / count;
      k_x[c] = acc_t(kx);
      k_c[c] = acc_t(-double(k_dy[c]) * sums.dy / count - kx * mean_low[c]);
    }
  };
  if (args.given_sums) {
    for (int64_t c = 0; c < C; ++c) finish(c, {args.given_sums[c], args.given_sums[C + c]});
  }
  const bool need_sums =
      !args.given_sums && (grad_weight || grad_bias || args.grad_sums || (dx && args.training));
  const bool stream = dx && streams(dx, g);

  // The two forms of dx, for a vector or a single value.
  auto dx_train = [](auto grad, auto v, auto a, auto b, auto k, auto m) {
    return multiply_add(a, grad, multiply_add(b, v - m, k));
  };
  auto dx_eval = [](auto grad, auto a) { return grad * a; };

  if (g.layout == Layout::ChannelsFirst) {
    const ChannelsFirstBlocks blocks(g);
    auto apply = [&](int64_t c, const Block& block) {
      if (!dx) return;
      block.for_each_run([&](int64_t offset, int64_t len) {
        if (args.training) {
          map_run(stream, dx + offset, len, [=, a = k_dy[c], b = k_x[c], k = k_c[c], m = mean[c]](auto grad, auto v) {
            using V = decltype(v);
            return dx_train(grad, v, V(a), V(b), V(k), V(m));
          }, dy + offset, x + offset);
        } else {
          map_run(stream, dx + offset, len, [=, a = k_dy[c]](auto grad) {
            using V = decltype(grad);
            return dx_eval(grad, V(a));
          }, dy + offset);
        }
      });
    };
    if (need_sums) {
      channels_first_reduce_apply<GradSums>(
          blocks, [&](int64_t c, const Block& b) { return block_grad_sums(x, dy, b, mean[c]); },
          finish, apply);
    } else {
      channels_first_apply(blocks, apply);
    }
    return;
  }

  const ChannelsLastPlan plan(g, kLanes<T>);
  const auto mean_p = lane_pattern(mean, plan.period);
  if (need_sums) {
    const std::vector<GradSums> sums = channels_last_grad_sums(x, dy, plan, mean_p);
    for (int64_t c = 0; c < C; ++c) finish(c, sums[c]);
  }
  if (!dx) return;
  const auto k_dy_p = lane_pattern(k_dy, plan.period);
  if (!args.training) {
    channels_last_map<1>(plan, stream, {k_dy_p.data()}, dx,
                         [&](const auto& c, auto grad) { return dx_eval(grad, c[0]); }, dy);
    return;
  }
  const auto k_x_p = lane_pattern(k_x, plan.period);
  const auto k_c_p = lane_pattern(k_c, plan.period);
  channels_last_map<4>(
      plan, stream, {k_dy_p.data(), k_x_p.data(), k_c_p.data(), mean_p.data()}, dx,
      [&](const auto& c, auto grad, auto v) { return dx_train(grad, v, c[0], c[1], c[2], c[3]); },
      dy, x);
}

// One function per entry point, one instantiation per (input, parameter) dtype pair.
template <template <typename, typename> class Kernel, typename Args>
void dispatch_dtypes(const Args& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.input_type, "batch_norm_ext", [&] {
    if constexpr (at::is_reduced_floating_point_v<scalar_t>) {
      if (args.param_type == at::kFloat) return Kernel<scalar_t, float>::run(args);
    }
    Kernel<scalar_t, scalar_t>::run(args);
  });
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

// The table for this instruction set: kernels_DEFAULT, kernels_AVX2 or kernels_AVX512.
#define BATCHNORM_EXT_TABLE_NAME(isa) BATCHNORM_EXT_PASTE(kernels_, isa)
#define BATCHNORM_EXT_PASTE(a, b) a##b
extern const KernelTable BATCHNORM_EXT_TABLE_NAME(CPU_CAPABILITY);
const KernelTable BATCHNORM_EXT_TABLE_NAME(CPU_CAPABILITY) = {&CPU_CAPABILITY::forward,
                                                              &CPU_CAPABILITY::backward};

}  // namespace batchnorm_ext::cpu
