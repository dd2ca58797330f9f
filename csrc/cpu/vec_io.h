// Batch normalization kernels, part 1: values between memory and vector registers.
//
// The kernels are six headers, read in this order: vec_io.h (this one), moments.h,
// channels_first.h, channels_last.h, epilogues.h (what a fused batch norm applies after
// normalizing), and batch_norm_kernel.h, the entry points, which includes the others.  They are compiled once per instruction set (kernel_default.cpp,
// kernel_avx2.cpp, kernel_avx512.cpp, kernel_avx512bf16.cpp), each time with
// CPU_CAPABILITY naming it, so everything lives in the namespace CPU_CAPABILITY, as at::vec
// does.
#pragma once

#include "kernel_api.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace batchnorm_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

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
  Vec v;
  if constexpr (at::is_reduced_floating_point_v<T>) {
    v = std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, count)));
  } else {
    v = Vec::loadu(p, count);
  }
  // at::vec's partial loads fill the other lanes with 0 (its blend, not always inlined,
  // cost a call per short run: a 7x7 plane's last vector).
  return fill == opmath_t<T>(0) ? v : Vec::set(Vec(fill), v, count);
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

// The vector of the last L values of a run, p[0, L), in which the first `done` lanes (values
// already summed with the vector before) are set to `fill`: for a run of at least a vector,
// its partial last vector without a partial load (at::vec's go through memory but with
// AVX-512; a 7x7 plane is 3 vectors and 1 value).  Sums over the lanes take the same
// values either way, in other lanes.
template <typename T>
inline Vectorized<opmath_t<T>> load_vec_last(const T* p, int64_t done, opmath_t<T> fill) {
  using Vec = Vectorized<opmath_t<T>>;
  const Vec lane = Vec::arange(opmath_t<T>(0), opmath_t<T>(1));
  return Vec::blendv(load_vec(p), Vec(fill), lane < Vec(opmath_t<T>(done)));
}

// Calls step(j, v) for each vector of the run x[0, len), j = 0..3 cycling so that a caller
// can keep four independent accumulators (one add chain would wait on the add latency).
// A last partial vector's missing lanes hold `fill` (see load_vec_last).
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
  if (i < len && len >= L) {
    step(1, load_vec_last(x + len - L, L - (len - i), fill));
  } else if (i < len) {
    step(1, load_vec(x + i, len - i, fill));
  }
}

// Calls step(j, x, y) for the vectors of two runs x[0, len) and y[0, len) side by side,
// j = 0, 1 alternating for two independent accumulators; a last partial vector's missing
// lanes hold 0 in both.  (Its lanes are those of for_each_vector_index, so that a fused
// batch norm's backward sums, which go through that, match a plain one's to the bit.)
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

// The n values at p: a whole vector (n = lanes), or the first n with the other lanes 0.
template <typename T>
inline Vectorized<opmath_t<T>> load_vec_n(const T* p, int64_t n) {
  return n == kLanes<T> ? load_vec(p) : load_vec(p, n, opmath_t<T>(0));
}

// Calls step(j, i, n) for the vectors of the run [0, len): the n values from index i (n is
// the lane count but for a last partial vector), j = 0, 1 alternating for two independent
// accumulators.
template <typename T, typename Step>
inline void for_each_vector_index(int64_t len, Step step) {
  constexpr int64_t L = kLanes<T>;
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    step(0, i, L);
    step(1, i + L, L);
  }
  for (; i + L <= len; i += L) step(0, i, L);
  if (i < len) step(1, i, len - i);
}

// Whether a partial vector is one masked load or store (at::vec's AVX-512 code), rather
// than a copy through memory (its AVX2 and default code).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMaskedPartials = true;
#else
constexpr bool kMaskedPartials = false;
#endif

// out[i] = f(in[i]...) over a run of values; f is a generic lambda that works on a
// vector and on a single value alike (coefficients are broadcast with V(c)).  With
// kStream, stores past the cache from the first vector-aligned address on.
// The run's last partial vector: masked with AVX-512; elsewhere, in a run of at least a
// vector, a whole vector that overlaps the one before it (the values in both computed
// twice, to the same bits), cheaper than a partial one through memory (a 7x7 plane is 3
// vectors and 1 value).  Where masks exist the overlap costs more than they do: its load
// and store cross the vector before, and a 7x7 plane writes 4 vectors for 3 (measured on
// an Intel Xeon with AVX-512: the eval forward of 8x576x7x7, 15% slower with the overlap).
// out never overlaps an input (outputs are new tensors).
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
  if (i == len) return;
  if (!kMaskedPartials && len >= L) {
    store_vec(out + len - L, f(load_vec(in + len - L)...));
  } else {
    store_vec(out + i, f(load_vec(in + i, len - i, 0)...), len - i);
  }
}

template <typename T, typename F, typename... In>
inline void map_run(bool stream, T* out, int64_t len, const F& f, const In*... in) {
  if (stream) {
    map_run<true>(out, len, f, in...);
  } else {
    map_run<false>(out, len, f, in...);
  }
}

// f(std::true_type{}) or f(std::false_type{}): a flag made a compile-time constant, for a
// loop that should not test it at every step.
template <typename F>
inline decltype(auto) with_bool(bool flag, F f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Outputs at least this large are written with streaming stores: they would not stay in
// the last-level cache anyway (32 MiB, shared, on the machines this was measured on).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
bool streams(const T* out, const Geometry& g) {
  const int64_t bytes = g.count() * g.channels * int64_t(sizeof(T));
  return bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(out) % (kLanes<T> * sizeof(T)) == 0;
}

// Values of work below which a loop is not worth a parallel region (ATen uses the same).
constexpr int64_t kGrain = 32768;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace CPU_CAPABILITY
}  // namespace batchnorm_ext::cpu
