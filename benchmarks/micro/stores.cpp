// Streaming (non-temporal) stores against ordinary ones, on a 51 MiB float array: the
// measurement behind the kernels' choice of streaming stores for large outputs
// (docs/tutorial/06-making-it-fast.md).  Standalone, no torch:
//
//     g++ -O3 -o /tmp/stores benchmarks/micro/stores.cpp && /tmp/stores
//
// Each line: the best of 20 runs, in ms, of y = 1.5 * x + 0.5 over the array.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
using namespace std;
static double now(){return chrono::duration<double>(chrono::steady_clock::now().time_since_epoch()).count();}
const long M = 16L*64*112*112;
float *X, *Y;
__attribute__((target("avx512f"))) void f512() { __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(0.5f); for (long i = 0; i < M; i += 16) _mm512_storeu_ps(Y+i, _mm512_fmadd_ps(_mm512_loadu_ps(X+i), a, b)); }
__attribute__((target("avx512f"))) void f512nt() { __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(0.5f); for (long i = 0; i < M; i += 16) _mm512_stream_ps(Y+i, _mm512_fmadd_ps(_mm512_loadu_ps(X+i), a, b)); _mm_sfence(); }
__attribute__((target("avx2,fma"))) void f256() { __m256 a = _mm256_set1_ps(1.5f), b = _mm256_set1_ps(0.5f); for (long i = 0; i < M; i += 8) _mm256_storeu_ps(Y+i, _mm256_fmadd_ps(_mm256_loadu_ps(X+i), a, b)); }
__attribute__((target("avx2,fma"))) void f256x2() { __m256 a = _mm256_set1_ps(1.5f), b = _mm256_set1_ps(0.5f); for (long i = 0; i < M; i += 16) { _mm256_storeu_ps(Y+i, _mm256_fmadd_ps(_mm256_loadu_ps(X+i), a, b)); _mm256_storeu_ps(Y+i+8, _mm256_fmadd_ps(_mm256_loadu_ps(X+i+8), a, b));} }
void fscalar() { for (long i = 0; i < M; ++i) Y[i] = X[i]*1.5f + 0.5f; }
void fcopy() { memcpy(Y, X, M*4); }
template<class F> double best(F f){ double b=1e9; for(int i=0;i<20;++i){double t=now(); f(); b=min(b, now()-t);} return b*1e3; }
int main() {
  X = (float*)aligned_alloc(64, M*4); Y = (float*)aligned_alloc(64, M*4); for (long i=0;i<M;++i) {X[i] = i*1e-6f; Y[i]=0;}
  for (int r = 0; r < 2; ++r)
  printf("512 %.2f  512nt %.2f  256 %.2f  256x2 %.2f  scalar(sse) %.2f  memcpy %.2f\n", best(f512), best(f512nt), best(f256), best(f256x2), best(fscalar), best(fcopy));
}
