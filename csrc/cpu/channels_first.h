// Batch normalization kernels, part 3: channels first (contiguous NCHW), where a channel is
// cut into blocks (see vec_io.h for how the kernel headers fit together).
#pragma once

#include "moments.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

// A channel is `batch` planes of `inner` contiguous values, C * inner apart.  It is cut
// into blocks of about kBlockValues: several whole planes when planes are small, pieces of
// one plane when they are large.

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
    // Plane, piece and channel counted along, not divided out for each piece: two integer
    // divisions cost as much as writing a 7x7 plane.
    int64_t plane = begin / pieces, piece = begin % pieces, c = plane % g.channels;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t start = piece * piece_len;
      apply(c, Block{plane * g.inner + start, 1, std::min(piece_len, g.inner - start), 0});
      if (++piece == pieces) {
        piece = 0;
        ++plane;
        if (++c == g.channels) c = 0;
      }
    }
    stream_fence();
  });
}

// Planes this short are the ones whose statistics may be taken in memory order
// (channels_first_plane_reduce, below).
constexpr int64_t kShortPlane = 256;

// Reduces short planes (inner < kShortPlane) in memory order: one Partial per plane
// (reduce(c, plane)), then a channel's planes merged in batch order.  Walking channel by
// channel would follow one stream per plane of the channel (and per tensor read), each a
// few cache lines long: more streams than the hardware prefetcher follows, so every short
// run waits on its own cache misses.  That costs when the data comes from memory (the
// tensors a pass touches add up to kPlaneOrderBytes or more, as much as streams past the
// cache); from cache the walk by channel is faster, with its second sweep in L1 (measured
// on an AMD EPYC: the training forward of 16x2048x7x7, 13 MB touched, 0.64 ms by channel,
// 0.81 ms in memory order; its fused forward and backward with a residual, 19 and 32 MB
// touched, 5.8 ms by channel, 3.1 ms in memory order).  Planes and merge order do not
// depend on the number of threads, so neither does the result.
constexpr int64_t kPlaneOrderBytes = kStreamBytes;

// Whether a pass that touches `tensors` tensors of g's size reduces in memory order.
template <typename T>
bool reduces_in_plane_order(const Geometry& g, int64_t tensors) {
  return g.inner >= kLanes<T> && g.inner < kShortPlane &&
         tensors * g.count() * g.channels * int64_t(sizeof(T)) >= kPlaneOrderBytes;
}

template <typename Partial, typename Reduce>
std::vector<Partial> channels_first_plane_reduce(const Geometry& g, Reduce reduce) {
  const int64_t planes = g.batch * g.channels;
  std::vector<Partial> partials(planes);
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / g.inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      partials[p] = reduce(p % g.channels, Block{p * g.inner, 1, g.inner, 0});
    }
  });
  std::vector<Partial> totals(g.channels);
  at::parallel_for(0, g.channels, std::max<int64_t>(1, kGrain / g.batch), [&](int64_t begin, int64_t end) {
    // Channels inner: their merges are independent, so the divisions in them overlap.
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t c = begin; c < end; ++c) merge(totals[c], partials[n * g.channels + c]);
    }
  });
  return totals;
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

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
