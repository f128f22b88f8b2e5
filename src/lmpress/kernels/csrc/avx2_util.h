// Small AVX2 helpers shared by the float kernels (decode.cpp, lowbit.cpp); x86 only.
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace lmp {

// The sum of a register's 8 floats.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

}  // namespace lmp
#endif
