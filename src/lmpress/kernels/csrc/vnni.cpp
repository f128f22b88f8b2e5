// AVX2 kernels with AVX512-VNNI's vpdpbusd on 256-bit registers (selected at run time; see module.cpp).
#include "kernels.h"
#ifdef LMP_X86
// Headers first, outside the pragma, so no inline library code is compiled for the wider target.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#define LMP_NS vnni
#define LMP_ENTRY rows_vnni
#define LMP_VNNI 1
#include "simd_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
