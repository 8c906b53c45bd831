#include "exp_runs.h"

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DMLFAST_X86_EXP 1
#endif

namespace dmlfast {
namespace {

#ifdef DMLFAST_X86_EXP
// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so that r keeps its
// digits), |r| <= ln(2)/2; e^r by its Taylor polynomial to r^7 (truncation < 6e-9 relative); 2^n as
// two powers 2^{n/2} 2^{n - n/2}, each a normal float for every n the clamp to [-104, 89] gives, so
// results down to the subnormals and up to the largest float come out without special cases.
__attribute__((target("avx2,fma"))) __m256 exp8(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));  // NaN kept
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i whole = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(whole, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, first), second);
}

__attribute__((target("avx2,fma"))) void exp_in_place_avx2(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
  if (i < n) {  // the tail through the same lanes, so that every element gets the same arithmetic
    float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = i; k < n; ++k) tail[k - i] = v[k];
    _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
    for (int64_t k = i; k < n; ++k) v[k] = tail[k - i];
  }
}

#endif

// Read once; __builtin_cpu_init first because this may run while the library is being loaded,
// before libgcc's own initialisation of the processor model.
bool has_avx2() {
#ifdef DMLFAST_X86_EXP
  static const bool answer = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return answer;
#else
  return false;
#endif
}

}  // namespace

bool exp_in_place_is_vectorized() { return has_avx2(); }

void exp_in_place(float* v, int64_t n) {
#ifdef DMLFAST_X86_EXP
  if (has_avx2()) {
    exp_in_place_avx2(v, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

void exp_in_place(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

}  // namespace dmlfast
