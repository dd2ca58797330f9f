// Batch normalization kernels, part 4: channels last (NHWC, and (N, C) input), where every
// vector lane always sees the same channel (see vec_io.h for how the kernel headers fit
// together).
#pragma once

#include "moments.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <type_traits>
#include <vector>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// The data is rows of C values, so value i belongs to channel i % C.  Read it in periods
// of P = lcm(C, lanes) values: then every lane of every vector always sees the same
// channel, whatever C is (C = 3 gives P = 48 with 16 lanes).  Statistics are kept per lane
// over blocks of whole periods and folded into channels at the end; the rows left over
// after the last full period (fewer than P / C) are handled one value at a time.
//
// When lcm(C, lanes) is long (C large and odd: 16 C values), a period is one row instead,
// P = C, whose last vector is partial ("ragged": masked loads and stores): per-lane arrays
// of C values rather than 16 C, and blocks that still fit in L1.

// The longest lcm(C, lanes) period; longer ones become rows.
constexpr int64_t kMaxPeriod = 2048;
// The values of a block of periods, unless its periods are very long (see
// periods_per_block): 512 KiB of floats, which L2 holds (1 MiB and more per core on the
// CPUs here).
constexpr int64_t kL2BlockValues = int64_t(1) << 17;

struct ChannelsLastPlan {
  int64_t channels;
  int64_t period;             // P: lcm(C, lanes) values, or one row of C
  int64_t width;              // P rounded up to whole vectors: per-lane arrays hold this many
  bool ragged;                // P is not a whole number of vectors
  int64_t rows;               // batch * inner
  int64_t periods;            // full periods
  int64_t tail_begin;         // first value after the last full period
  int64_t periods_per_block;  // a block: two sweeps in cache, like the channels-first one
  int64_t blocks;
  int64_t blocks_per_chunk;   // a chunk: one task of the parallel reduction
  int64_t chunks;

  ChannelsLastPlan(const Geometry& g, int64_t lanes) {
    channels = g.channels;
    const int64_t lcm = std::lcm(g.channels, lanes);
    period = lcm <= kMaxPeriod ? lcm : g.channels;
    width = divup(period, lanes) * lanes;
    ragged = width != period;
    rows = g.count();
    periods = rows * channels / period;
    tail_begin = periods * period;
    // 64 periods, so that merging a block's per-lane sums (in double, per lane) costs
    // little next to reading them; fewer (4 at least) where 64 would pass 512 KiB, which
    // stays in L2 between the two sweeps (blocks
    // of long periods do not fit in L1, and their second sweep reads from L2, which costs
    // less than merging more, smaller blocks).  Measured, channels-last training forward,
    // 16 periods -> 64: (8, 2048, 7, 7) 0.60 -> 0.50 ms, (256, 1024) 0.156 -> 0.140 ms;
    // short periods (up to 256 values) the same within noise.
    periods_per_block = std::clamp<int64_t>(kL2BlockValues / period, 4, 64);
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

// Calls f(r, rows) for rows = 4 periods from r where it can, else 1, for r from `begin` to
// `end`: a loop over periods that works on four of them side by side.
template <typename F>
inline void for_each_row_group(int64_t begin, int64_t end, F f) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) f(r, std::integral_constant<int, 4>{});
  for (; r < end; ++r) f(r, std::integral_constant<int, 1>{});
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
  // every lane, kept in out.mean.  Four rows at a time, in order, for each vector of sums:
  // one load and store of the sum per four vectors of data.  A ragged period's last vector
  // is partial (its missing lanes read 0, and are never read back).
  acc_t* sum = out.mean.data();
  for (int64_t k = 0; k < period; k += L) load_vec_n(x + k, std::min(L, period - k)).store(sum + k);
  for_each_row_group(1, n, [&](int64_t r, auto rows) {
    for (int64_t k = 0; k < period; k += L) {
      Vec s = Vec::loadu(sum + k);
      for (int q = 0; q < decltype(rows)::value; ++q) {
        s += load_vec_n(x + (r + q) * period + k, std::min(L, period - k));
      }
      s.store(sum + k);
    }
  });
  // Sweep 2, over the block now in L1 (L2 for long periods): a group of columns at a time,
  // so that the accumulators are registers.
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
  const int64_t full = period / L * L;
  if (full < period) {  // a ragged period's last, partial vector, masked (missing lanes: 0)
    const Vec mean = Vec::loadu(sum + full) * inv_n;
    Vec dev(0), sq(0);
    for (int64_t r = 0; r < n; ++r) {
      const Vec d = load_vec(x + r * period + full, period - full, acc_t(0)) - mean;
      dev += d;
      sq = at::vec::fmadd(d, d, sq);
    }
    mean.store(out.mean.data() + full);
    dev.store(out.dev.data() + full);
    sq.store(out.sq.data() + full);
    all_sq += sq;
  }
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
  if (own_share == 0) {  // into an empty lane: the other as it is (see merge in moments.h)
    mean = other_mean;
    m2 = other_m2;
    return;
  }
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
    LaneSums<acc_t> block(plan.width);
    LaneSums<double> exact(0);  // sized when a block needs it (Inf, NaN, overflow)
    bool infinite = false;
    int64_t count = 0;
    const int64_t first = chunk * plan.blocks_per_chunk;
    const int64_t last = std::min(plan.blocks, first + plan.blocks_per_chunk);
    for (int64_t b = first; b < last; ++b) {
      const int64_t n = plan.periods_in(b);
      const T* rows = x + plan.first_period(b) * P;
      const bool finite = lane_sums(rows, P, n, block);
      if (!finite) {  // Inf, NaN or float overflow in the block: redo it in double
        if (exact.mean.empty()) exact = LaneSums<double>(P);
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
  // A period is P / C rows of C lanes: lane row + c is channel c.  (One channel per lane,
  // not l % C: with many channels and few values each, 8x512x1x1, the integer division
  // was a tenth of the call.)
  std::vector<Moments> channel(C);
  for (int64_t row = 0; row < P && plan.periods > 0; row += C) {
    for (int64_t c = 0; c < C; ++c) merge(channel[c], {plan.periods, mean[row + c], m2[row + c]});
  }

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

// A per-channel coefficient repeated over a period: the coefficient of every lane (and 0
// in the lanes a ragged period's last vector has in excess).  Where the period is one row
// of whole vectors, that is the per-channel array itself, used as it is (copying it for
// each coefficient cost a tenth of the backward of 8x512x1x1); it must outlive the pattern.
template <typename A>
class LanePattern {
 public:
  LanePattern(const std::vector<A>& per_channel, const ChannelsLastPlan& plan) {
    if (plan.period == plan.channels && !plan.ragged) {
      data_ = per_channel.data();
      return;
    }
    copy_.assign(plan.width, A(0));
    for (int64_t l = 0; l < plan.period && !per_channel.empty(); l += plan.channels) {
      std::copy(per_channel.begin(), per_channel.end(), copy_.begin() + l);
    }
    data_ = copy_.data();
  }
  LanePattern(const LanePattern&) = delete;  // data_ may point into copy_
  LanePattern& operator=(const LanePattern&) = delete;

  const A* data() const { return data_; }

 private:
  std::vector<A> copy_;
  const A* data_;
};

// Per-channel sum(dz) and sum(dz * (x - mean)) of channels-last data, where dz is the
// gradient at the batch norm's output: grad_at(i, k, n) for the n values (a whole vector,
// or fewer at the end of a ragged period, the missing lanes 0) at index i, whose lanes
// start at lane k of the period, and grad_at_value(i, c) for the single value i of channel
// c after the last full period (see block_grad_sums).
template <typename T, typename GradAt, typename GradAtValue>
std::vector<GradSums> channels_last_grad_sums(const T* x, const ChannelsLastPlan& plan,
                                              const LanePattern<opmath_t<T>>& mean_pattern,
                                              GradAt grad_at, GradAtValue grad_at_value) {
  using acc_t = opmath_t<T>;
  using Vec = Vectorized<acc_t>;
  const int64_t P = plan.period;
  const int64_t C = plan.channels;

  const std::vector<double> chunk_sums = reduce_chunks(plan, 2 * P, [&](int64_t chunk, double* out) {
    // Per block, row after row (as the data lies in memory), sums per lane in float; then
    // added to the chunk's sums in double.
    std::vector<acc_t> dy_sum(plan.width), dy_xmu_sum(plan.width);
    const int64_t first = chunk * plan.blocks_per_chunk;
    const int64_t last = std::min(plan.blocks, first + plan.blocks_per_chunk);
    for (int64_t b = first; b < last; ++b) {
      std::fill(dy_sum.begin(), dy_sum.end(), acc_t(0));
      std::fill(dy_xmu_sum.begin(), dy_xmu_sum.end(), acc_t(0));
      // Four periods at a time, in order, for each vector of sums (as lane_sums).
      const int64_t end_row = plan.first_period(b) + plan.periods_in(b);
      for_each_row_group(plan.first_period(b), end_row, [&](int64_t r, auto rows) {
        for (int64_t k = 0; k < P; k += kLanes<T>) {
          const int64_t n = std::min(kLanes<T>, P - k);
          const Vec mean = Vec::loadu(mean_pattern.data() + k);
          Vec dy_s = Vec::loadu(dy_sum.data() + k), dy_xmu_s = Vec::loadu(dy_xmu_sum.data() + k);
          for (int q = 0; q < decltype(rows)::value; ++q) {
            const int64_t i = (r + q) * P + k;
            const Vec grad = grad_at(i, k, n);
            dy_s += grad;
            dy_xmu_s = at::vec::fmadd(grad, load_vec_n(x + i, n) - mean, dy_xmu_s);
          }
          dy_s.store(dy_sum.data() + k);
          dy_xmu_s.store(dy_xmu_sum.data() + k);
        }
      });
      for (int64_t l = 0; l < P; ++l) {
        out[l] += dy_sum[l];
        out[P + l] += dy_xmu_sum[l];
      }
    }
  });

  // Lanes into channels row by row, as channels_last_moments does.
  std::vector<GradSums> channel(C);
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const double* sums = chunk_sums.data() + chunk * 2 * P;
    for (int64_t row = 0; row < P; row += C) {
      for (int64_t c = 0; c < C; ++c) merge(channel[c], {sums[row + c], sums[P + row + c]});
    }
  }
  for (int64_t row = plan.tail_begin; row < plan.rows * C; row += C) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = grad_at_value(row + c, c);
      merge(channel[c], {double(g), double(g * (acc_t(x[row + c]) - mean_pattern.data()[c]))});
    }
  }
  return channel;
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
  } else {
    // Longer periods: the coefficients are loaded (from L1) with each vector, and used for
    // four periods side by side, so that their loads do not outnumber the data's: data in
    // L2 is limited by the load ports, not by memory (measured with the AVX2 kernels,
    // (8, 1280, 7, 7) channels-last training forward 0.368 -> 0.332 ms).
    //
    // Streaming stores of vectors shorter than a cache line (AVX2: 32 bytes of float) write
    // a row's whole line at once, S vectors, before the next row's: a line whose halves
    // were streamed with other rows' stores between them measured slow (AVX2 kernels on an
    // Intel Xeon, 8x256x56x56 channels-last eval: 2.26 ms streamed, 1.90 ms not).
    const int64_t full = P / L * L;  // a ragged period ends with a partial vector
    constexpr int S = kStream ? int(std::max<int64_t>(1, 64 / (L * int64_t(sizeof(T))))) : 1;
    auto periods_from = [&](int64_t i, auto rows) {  // rows periods starting at value i
      constexpr int R = decltype(rows)::value;
      int64_t k = 0;
      for (; k + S * L <= full; k += S * L) {
        std::array<Vec, NP> c[S];
        for (int v = 0; v < S; ++v) {
          for (int q = 0; q < NP; ++q) c[v][q] = Vec::loadu(patterns[q] + k + v * L);
        }
        for (int r = 0; r < R; ++r) {
          for (int v = 0; v < S; ++v) {
            const int64_t j = i + r * P + k + v * L;
            put_vec<kStream>(out + j, f(c[v], load_vec(in + j)...));
          }
        }
      }
      for (; k < full; k += L) {  // the vectors left of a period that is not whole lines
        std::array<Vec, NP> c;
        for (int q = 0; q < NP; ++q) c[q] = Vec::loadu(patterns[q] + k);
        for (int r = 0; r < R; ++r) {
          put_vec<kStream>(out + i + r * P + k, f(c, load_vec(in + i + r * P + k)...));
        }
      }
      if (full < P) {
        std::array<Vec, NP> c;
        for (int q = 0; q < NP; ++q) c[q] = Vec::loadu(patterns[q] + full);
        for (int r = 0; r < R; ++r) {
          const int64_t j = i + r * P + full;
          store_vec(out + j, f(c, load_vec(in + j, P - full, acc_t(0))...), P - full);
        }
      }
    };
    at::parallel_for(0, plan.periods, std::max<int64_t>(1, kGrain / P), [&](int64_t begin, int64_t end) {
      for_each_row_group(begin, end, [&](int64_t period, auto rows) { periods_from(period * P, rows); });
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
  // Streaming stores need aligned vectors, which the rows of a ragged period are not.
  if (stream && !plan.ragged) {
    channels_last_map<NP, true>(plan, patterns, out, f, in...);
  } else {
    channels_last_map<NP, false>(plan, patterns, out, f, in...);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
