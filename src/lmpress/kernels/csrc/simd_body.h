// The SIMD row kernels, compiled twice under different target pragmas: avx2.cpp (AVX2+FMA+F16C) and vnni.cpp
// (the same plus AVX512-VNNI/VL, whose vpdpbusd replaces vpmaddubsw+vpmaddwd). Never compiled without a pragma,
// so the rest of the library stays runnable on any x86-64. See kernels.h for the layouts.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace lmp {
namespace LMP_NS {

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum_i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float param(const void* base, bool f16, int64_t idx) {
    return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(base)[idx]) : static_cast<const float*>(base)[idx];
}

// One block's 32 codes in prepared-activation order, as signed bytes (int4: 0..15; uint8 codes shifted by −128,
// the shift being folded into the zero-point by the caller): w whole, a/b its two 16-byte halves.
template <int BITS>
static inline __m256i load_block(const uint8_t* p, bool uns) {
    if (BITS == 4) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), nib = _mm_set1_epi8(0x0f);
        // even columns (low nibbles) in the low half, odd columns in the high half
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
    }
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return uns ? _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))) : w;
}

// acc + Σ w·q over 32 byte pairs, in 8 int32 lanes; w: codes (int4 non-negative, int8 signed), q: int8.
template <int BITS>
static inline __m256i dot_acc(__m256i acc, __m256i w, __m256i q) {
    __m256i u = w, s = q;
    if (BITS == 8) {  // u8·s8 instructions: move w's sign onto q
        u = _mm256_abs_epi8(w);
        s = _mm256_sign_epi8(q, w);
    }
#if LMP_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    // int16 pair sums: at most 2·15·127 (int4) or 2·128·127 (int8), no saturation
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

#define LMP_UNROLL _Pragma("GCC unroll 16")

// One block of 32 columns for R weight rows × MB activation rows, into d (float, per group) or iacc (int32).
template <int BITS, int ACT, int R, int MB>
__attribute__((always_inline)) static inline void block(const Problem& p, const uint8_t* const* src, bool uns,
                                                        int64_t blk, int64_t m0, __m256 (&d)[R][MB],
                                                        __m256i (&iacc)[R][MB]) {
    const int64_t P = p.nblk * BLK;
    LMP_UNROLL for (int r = 0; r < R; ++r) {
        const __m256i w = load_block<BITS>(src[r], uns);
        if (ACT == ACT_F32) {
            const __m128i a = _mm256_castsi256_si128(w), b = _mm256_extracti128_si256(w, 1);
            const __m256 f[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)),
                                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))),
                                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
            LMP_UNROLL for (int m = 0; m < MB; ++m) {
                const float* xb = p.xf + (m0 + m) * P + blk * BLK;
                LMP_UNROLL for (int k = 0; k < 4; ++k) d[r][m] = _mm256_fmadd_ps(f[k], _mm256_loadu_ps(xb + 8 * k), d[r][m]);
            }
        } else {
            LMP_UNROLL for (int m = 0; m < MB; ++m) {
                const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + m) * P + blk * BLK));
                if (ACT == ACT_Q8T) {
                    iacc[r][m] = dot_acc<BITS>(iacc[r][m], w, q);
                } else {
                    const __m256 i = _mm256_cvtepi32_ps(dot_acc<BITS>(_mm256_setzero_si256(), w, q));
                    d[r][m] = _mm256_fmadd_ps(i, _mm256_set1_ps(p.xd[(m0 + m) * p.nblk + blk]), d[r][m]);
                }
            }
        }
    }
}

// Output rows o .. o+R−1 for activation rows m0 .. m0+MB−1. R·MB independent accumulator chains hide the
// latency of the FMA / dot-product chain (one dependent op per block per chain otherwise bounds the loop).
template <int BITS, int ACT, int R, int MB>
static inline void tile(const Problem& p, int64_t o, int64_t m0) {
    constexpr int64_t BPB = BITS == 4 ? 16 : 32;  // weight bytes per block
    const int64_t full = p.I / BLK, gblk = p.ng == 1 ? p.nblk : p.group / BLK;
    const bool uns = BITS == 8 && p.w_unsigned;
    const float zshift = uns ? 128.f : 0.f;
    alignas(32) uint8_t tail[R][32];

    __m256 tot[R][MB];
    __m256i iacc[R][MB];
    float zt[R][MB];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) tot[r][m] = _mm256_setzero_ps(), iacc[r][m] = _mm256_setzero_si256(), zt[r][m] = 0.f;

    for (int64_t g = 0; g < p.ng; ++g) {
        const int64_t b0 = g * gblk, b1 = b0 + gblk < p.nblk ? b0 + gblk : p.nblk;
        __m256 d[R][MB];
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) d[r][m] = _mm256_setzero_ps();
        const int64_t bf = b1 < full ? b1 : full;  // full blocks of this group
        for (int64_t blk = b0; blk < bf; ++blk) {
            const uint8_t* src[R];
            LMP_UNROLL for (int r = 0; r < R; ++r) src[r] = p.w + (o + r) * p.row_bytes + blk * BPB;
            block<BITS, ACT, R, MB>(p, src, uns, blk, m0, d, iacc);
        }
        if (bf < b1) {  // the rows' partial last block: copied, so nothing past the buffer is read
            const uint8_t* src[R];
            for (int r = 0; r < R; ++r) {
                std::memset(tail[r], 0, sizeof tail[r]);
                std::memcpy(tail[r], p.w + (o + r) * p.row_bytes + bf * BPB, p.row_bytes - bf * BPB);
                src[r] = tail[r];
            }
            block<BITS, ACT, R, MB>(p, src, uns, bf, m0, d, iacc);
        }
        if (ACT == ACT_Q8T) continue;
        for (int r = 0; r < R; ++r) {
            const float s = param(p.scales, p.sf16, g * p.O + o + r);
            const float z = (p.zeros ? param(p.zeros, p.sf16, g * p.O + o + r) : 0.f) - zshift;
            for (int m = 0; m < MB; ++m) {
                tot[r][m] = _mm256_fmadd_ps(d[r][m], _mm256_set1_ps(s), tot[r][m]);
                zt[r][m] += s * z * p.xsum[(m0 + m) * p.ng + g];
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        const float bias = p.bias ? p.bias[o + r] : 0.f;
        for (int m = 0; m < MB; ++m) {
            float v;
            if (ACT == ACT_Q8T)
                v = std::fmaf(static_cast<float>(hsum_i(iacc[r][m])), p.xd[m0 + m] * param(p.scales, p.sf16, o + r), bias);
            else v = hsum(tot[r][m]) - zt[r][m] + bias;
            p.y[(m0 + m) * p.O + o + r] = v;
        }
    }
}

// Rows [o0, o1) for every activation row: 4 chains per tile (4 rows × 1, 2 × 2 or 1 × 4 activation rows).
template <int BITS, int ACT>
static void rows_t(const Problem& p, int64_t o0, int64_t o1) {
    int64_t m0 = 0;
    for (; m0 + 4 <= p.M; m0 += 4)
        for (int64_t o = o0; o < o1; ++o) tile<BITS, ACT, 1, 4>(p, o, m0);
    for (; m0 + 2 <= p.M; m0 += 2) {
        int64_t o = o0;
        for (; o + 2 <= o1; o += 2) tile<BITS, ACT, 2, 2>(p, o, m0);
        for (; o < o1; ++o) tile<BITS, ACT, 1, 2>(p, o, m0);
    }
    for (; m0 < p.M; ++m0) {
        int64_t o = o0;
        for (; o + 4 <= o1; o += 4) tile<BITS, ACT, 4, 1>(p, o, m0);
        for (; o < o1; ++o) tile<BITS, ACT, 1, 1>(p, o, m0);
    }
}

}  // namespace LMP_NS

void LMP_ENTRY(const Problem& p, int64_t o0, int64_t o1) {
    using namespace LMP_NS;
    if (p.bits == 4) {
        if (p.act == ACT_F32) rows_t<4, ACT_F32>(p, o0, o1);
        else rows_t<4, ACT_Q8>(p, o0, o1);
    } else {
        if (p.act == ACT_F32) rows_t<8, ACT_F32>(p, o0, o1);
        else if (p.act == ACT_Q8) rows_t<8, ACT_Q8>(p, o0, o1);
        else rows_t<8, ACT_Q8T>(p, o0, o1);
    }
}

}  // namespace lmp
