// AVX2 + FMA + F16C kernels (selected at run time; see module.cpp).
#include "kernels.h"
#ifdef LMP_X86
// Headers first, outside the pragma, so no inline library code is compiled for the wider target.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define LMP_NS avx2
#define LMP_ENTRY rows_avx2
#define LMP_VNNI 0
#include "simd_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
