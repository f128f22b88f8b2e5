// The SIMD row kernels, compiled twice under different target pragmas: avx2.cpp (AVX2+FMA+F16C) and vnni.cpp
// (the same plus AVX512-VNNI/VL, whose vpdpbusd replaces vpmaddubsw+vpmaddwd). Never compiled without a pragma,
// so the rest of the library stays runnable on any x86-64. See kernels.h for the layouts.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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
            LMP_UNROLL for (int m = 0; m < MB; ++m) {  // ACT_Q8T: int32 over the whole row
                const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + m) * P + blk * BLK));
                iacc[r][m] = dot_acc<BITS>(iacc[r][m], w, q);
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

// ACT_F32 and ACT_Q8T: rows [o0, o1) for every activation row, 4 chains per tile (4 rows × 1, 2 × 2 or 1 × 4
// activation rows). ACT_Q8 has its own kernel below.
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


// ---- ACT_Q8: int8 activations per block of 32 (kernels.h), integer dot products, float across blocks ----------
//
// The row is walked in units: int4 64 columns, whose 32 code bytes one load brings (low nibbles: the even
// columns of both blocks, high nibbles: the odd ones, meeting the activations laid out to match), int8 one block
// of 32. A unit's dot product lands in 8 int32 lanes, lanes 0-3 from its first block, 4-7 from its second (int4),
// is converted once and multiplied by the lanes' activation scales (xdv). A segment is a run of units whose
// low-half and high-half blocks stay in the same groups; at its end the 8-lane sums of 4 rows are reduced with
// two hadds into [rows 0-3, low groups | rows 0-3, high groups] and multiplied by those groups' scales. The zero
// points never enter the loop: Σ_g scale·zero·Σx_g is computed beforehand for a whole range of rows.

struct Seg {
    int32_t u0, u1, glo, ghi;
};

// Codes of one unit for R rows, as the u8 operands of the dot products.
template <int BITS, bool UNS>
struct Codes {
    __m256i a, b;  // int4: low / high nibbles; int8: VNNI unsigned codes, AVX2 |signed code| (a) and code (b)
    __attribute__((always_inline)) inline void load(const uint8_t* w) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        if (BITS == 4) {
            const __m256i m = _mm256_set1_epi8(0x0f);
            a = _mm256_and_si256(v, m);
            b = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
        } else {
#if LMP_VNNI
            a = UNS ? v : _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));  // signed → c + 128
#else
            b = UNS ? _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))) : v;  // unsigned → c − 128
            a = _mm256_abs_epi8(b);
#endif
        }
    }
    // int32 lanes of Σ code·q; c: VNNI int8 start value (−128·Σq of the block, making the u8 codes signed again)
    __attribute__((always_inline)) inline __m256i dot(__m256i qa, __m256i qb, __m256i c) const {
        if (BITS == 4) {
#if LMP_VNNI
            (void)c;
            return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, qa), b, qb);
#else
            (void)c;  // int16 sums of 4 products of at most 15·127: no saturation
            return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a, qa), _mm256_maddubs_epi16(b, qb)),
                                     _mm256_set1_epi16(1));
#endif
        }
#if LMP_VNNI
        (void)qb;
        return _mm256_dpbusd_epi32(c, a, qa);
#else
        (void)qb, (void)c;  // pair sums of at most 128·127: no saturation
        return _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(qa, b)), _mm256_set1_epi16(1));
#endif
    }
};

template <bool SF16>
static inline __m128 param4(const void* base, int64_t idx) {
    if (SF16)
        return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + idx)));
    return _mm_loadu_ps(static_cast<const float*>(base) + idx);
}

// Software prefetch distance of the weights, in bytes past the current tile's first byte (gemv_tile), for rows
// shorter than GEMV_PF_ROW bytes: longer rows are streams the hardware prefetcher follows by itself (measured:
// 4864 int8 columns 1.2× faster without; 576-1536 columns 2-3× faster with).
constexpr int64_t GEMV_PF = 8192, GEMV_PF_ROW = 2048;

// Rows r = 0..R−1 (weights at w[r], scales at sc[g·sstride + r]) × activation rows m0..m0+MB−1 → out[m][r]
// (without the zero-point term and bias).
template <int BITS, bool UNS, bool SF16, int R, int MB>
static void q8_tile(const Problem& p, const Seg* segs, int nseg, const uint8_t* const* w, int64_t m0,
                    const void* sc, int64_t sstride, float (&out)[MB][R]) {
    constexpr int64_t QU = BITS == 4 ? 64 : 32;  // activation bytes per unit
    const int64_t full = p.row_bytes / 32, tb = p.row_bytes - full * 32, units = q8_units(BITS, p.nblk);
    alignas(32) uint8_t tail[R][32];
    if (tb)
        for (int r = 0; r < R; ++r) {
            std::memset(tail[r], 0, 32);
            std::memcpy(tail[r], w[r] + full * 32, tb);
        }
    const int8_t* xq[MB];
    const float* xdv[MB];
    const int32_t* xc[MB];
    for (int m = 0; m < MB; ++m) {
        xq[m] = p.xq + (m0 + m) * p.xq_stride;
        xdv[m] = p.xdv + (m0 + m) * units * 8;
        xc[m] = p.xc + (m0 + m) * p.nblk;
    }
    __m256 tot[R / 4][MB];
    for (int k = 0; k < R / 4; ++k)
        for (int m = 0; m < MB; ++m) tot[k][m] = _mm256_setzero_ps();

    for (int s = 0; s < nseg; ++s) {
        const Seg sg = segs[s];
        __m256 acc[R][MB];
        LMP_UNROLL for (int r = 0; r < R; ++r) LMP_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
        auto step = [&](int64_t u, const uint8_t* const* src, int64_t off) __attribute__((always_inline)) {
            __m256i qa[MB], qb[MB], c[MB];
            __m256 dv[MB];
            LMP_UNROLL for (int m = 0; m < MB; ++m) {
                qa[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + u * QU));
                qb[m] = BITS == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + u * QU + 32)) : qa[m];
                c[m] = BITS == 8 && LMP_VNNI ? _mm256_setr_epi32(xc[m][u], 0, 0, 0, 0, 0, 0, 0) : _mm256_setzero_si256();
                dv[m] = _mm256_loadu_ps(xdv[m] + u * 8);
            }
            const char* pf = reinterpret_cast<const char*>(w[0]) + GEMV_PF + u * R * 32;  // as gemv_tile
            if (p.row_bytes < GEMV_PF_ROW) LMP_UNROLL for (int k = 0; k < R / 2; ++k) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
            LMP_UNROLL for (int r = 0; r < R; ++r) {
                Codes<BITS, UNS> cw;
                cw.load(src[r] + off);
                LMP_UNROLL for (int m = 0; m < MB; ++m)
                    acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cw.dot(qa[m], qb[m], c[m])), dv[m], acc[r][m]);
            }
        };
        const int64_t ue = sg.u1 < full ? sg.u1 : full;
        for (int64_t u = sg.u0; u < ue; ++u) step(u, w, u * 32);
        if (sg.u1 > full) {  // the rows' partial last unit, from the zero-padded copies
            const uint8_t* tp[R];
            for (int r = 0; r < R; ++r) tp[r] = tail[r];
            step(full, tp, 0);
        }
        LMP_UNROLL for (int k = 0; k < R / 4; ++k) {
            const __m256 sv = _mm256_set_m128(param4<SF16>(sc, sg.ghi * sstride + 4 * k), param4<SF16>(sc, sg.glo * sstride + 4 * k));
            LMP_UNROLL for (int m = 0; m < MB; ++m) {
                const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[4 * k][m], acc[4 * k + 1][m]),
                                                _mm256_hadd_ps(acc[4 * k + 2][m], acc[4 * k + 3][m]));
                tot[k][m] = _mm256_fmadd_ps(h, sv, tot[k][m]);
            }
        }
    }
    for (int k = 0; k < R / 4; ++k)
        for (int m = 0; m < MB; ++m)
            _mm_storeu_ps(&out[m][4 * k], _mm_add_ps(_mm256_castps256_ps128(tot[k][m]), _mm256_extractf128_ps(tot[k][m], 1)));
}

// zt[m][o − o0] = bias[o] − Σ_g scale·(zero + zshift)·xsum[m][g] for rows [o0, o1).
template <bool SF16>
static void q8_zero_term(const Problem& p, int64_t o0, int64_t o1, float zshift, float* zt) {
    const int64_t n = o1 - o0;
    const bool z = p.zeros || zshift != 0.f;
    for (int64_t m = 0; m < p.M; ++m) {
        float* t = zt + m * n;
        for (int64_t i = 0; i < n; ++i) t[i] = p.bias ? p.bias[o0 + i] : 0.f;
        if (!z) continue;
        const float* xs = p.xsum + m * p.ng;
        for (int64_t g = 0; g < p.ng; ++g) {
            const int64_t base = g * p.O + o0;
            const __m256 xg = _mm256_set1_ps(xs[g]), sh = _mm256_set1_ps(zshift);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                __m256 sv, zv;
                if (SF16) {
                    sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.scales) + base + i)));
                    zv = p.zeros ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.zeros) + base + i)))
                                 : _mm256_setzero_ps();
                } else {
                    sv = _mm256_loadu_ps(static_cast<const float*>(p.scales) + base + i);
                    zv = p.zeros ? _mm256_loadu_ps(static_cast<const float*>(p.zeros) + base + i) : _mm256_setzero_ps();
                }
                _mm256_storeu_ps(t + i, _mm256_fnmadd_ps(_mm256_mul_ps(sv, _mm256_add_ps(zv, sh)), xg, _mm256_loadu_ps(t + i)));
            }
            for (; i < n; ++i) {
                const float sz = param(p.scales, SF16, base + i) * ((p.zeros ? param(p.zeros, SF16, base + i) : 0.f) + zshift);
                t[i] -= sz * xs[g];
            }
        }
    }
}

struct Q8Scratch {
    std::vector<Seg> segs;
    std::vector<float> zt, sloc;
};
static thread_local Q8Scratch q8s;

// Rows [o, o1) for activation rows m0..m0+MB−1: tiles of R rows, then of 4, then one of 4 with the last row
// repeated (its scales copied, so nothing past the buffers is read).
template <int BITS, bool UNS, bool SF16, int R, int MB>
static void q8_sweep(const Problem& p, const Seg* segs, int nseg, int64_t o, int64_t o0, int64_t o1, int64_t m0,
                     const float* zt) {
    float out[MB][R];
    const size_t es = SF16 ? 2 : 4;
    for (; o + R <= o1; o += R) {
        const uint8_t* w[R];
        for (int r = 0; r < R; ++r) w[r] = p.w + (o + r) * p.row_bytes;
        q8_tile<BITS, UNS, SF16, R, MB>(p, segs, nseg, w, m0, static_cast<const char*>(p.scales) + o * es, p.O, out);
        for (int m = 0; m < MB; ++m)
            for (int r = 0; r < R; ++r) p.y[(m0 + m) * p.O + o + r] = out[m][r] + zt[(m0 + m) * (o1 - o0) + o - o0 + r];
    }
    if (o >= o1) return;
    if (R > 4) return q8_sweep<BITS, UNS, SF16, 4, MB>(p, segs, nseg, o, o0, o1, m0, zt);
    const int64_t n = o1 - o;
    const uint8_t* w[R];
    std::vector<float>& sl = q8s.sloc;
    sl.resize(p.ng * 4);
    for (int r = 0; r < R; ++r) {
        const int64_t row = o + (r < n ? r : n - 1);
        w[r] = p.w + row * p.row_bytes;
        if (r < 4)
            for (int64_t g = 0; g < p.ng; ++g) sl[g * 4 + r] = param(p.scales, SF16, g * p.O + row);
    }
    float out4[MB][4];
    const uint8_t* w4[4] = {w[0], w[1 % R], w[2 % R], w[3 % R]};
    q8_tile<BITS, UNS, false, 4, MB>(p, segs, nseg, w4, m0, sl.data(), 4, out4);
    for (int m = 0; m < MB; ++m)
        for (int64_t r = 0; r < n; ++r) p.y[(m0 + m) * p.O + o + r] = out4[m][r] + zt[(m0 + m) * (o1 - o0) + o - o0 + r];
}

// ---- ACT_Q8 with one activation row (the decode GEMV): output rows in the lanes ------------------------------
// A tile is 8 consecutive weight rows. Per unit, each row's integer dot product (Codes::dot: 8 int32 lanes of
// partial sums, int4 lanes 0-3 block 2u and 4-7 block 2u+1, int8 all block u) is reduced across the 8 rows at once
// (hadd tree) into one vector per block whose lane r is row r's Σ code·q over that block. Then per block
// A += float(Σ)·d[b], and at each group's end tot += S_g·(A − Z'_g·xsum_g) with the group's 8 scales and zeros
// loaded as one vector (they lie side by side in the group-major [ng, O] layout): no per-row scalar work, no
// horizontal sums per row, the zero point folded into the same pass. The weights are software-prefetched
// GEMV_PF bytes ahead of the tile: a tile reads 8 short streams (one per row), too short for the hardware
// prefetcher to lock on, and without it the loop waits on memory latency rather than bandwidth.

// Lane r of the result: Σ of the 8 lanes of v[r] (int8: one block per unit).
static inline __m256i reduce8(const __m256i (&v)[8]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// int4: lane r of lo / hi: Σ of lanes 0-3 / 4-7 of v[r] (blocks 2u and 2u+1).
static inline void reduce8x2(const __m256i (&v)[8], __m256i& lo, __m256i& hi) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    lo = _mm256_permute2x128_si256(a, b, 0x20);
    hi = _mm256_permute2x128_si256(a, b, 0x31);
}

template <bool SF16>
static inline __m256 param8(const void* base, int64_t idx) {
    if (SF16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + idx)));
    return _mm256_loadu_ps(static_cast<const float*>(base) + idx);
}

// The 8 rows w[0..7] → out[0..7] (bias included). Scales / zeros of row r, group g at sc / zp[g·sstride + r]
// (zp null: zero 0); zshift is added to every zero (−128 for uint8 int8 codes read as signed); pf: the tile's
// first weight byte, the prefetch cursor's origin.
template <int BITS, bool UNS, bool SF16>
static void gemv_tile(const Problem& p, const uint8_t* const (&w)[8], const void* sc, const void* zp, int64_t sstride,
                      float zshift, const float* bias, float* out, const char* pf) {
    const int64_t full = p.row_bytes / 32, tb = p.row_bytes - full * 32, units = q8_units(BITS, p.nblk);
    const int64_t gblk = p.ng == 1 ? p.nblk : p.group / BLK;
    const bool zterm = zp || zshift != 0.f;
    const int8_t* xq = p.xq;
    const float *xd = p.xd, *xs = p.xsum;
    alignas(32) uint8_t tail[8][32];
    if (tb)
        for (int r = 0; r < 8; ++r) {
            std::memset(tail[r], 0, 32);
            std::memcpy(tail[r], w[r] + full * 32, tb);
        }
    __m256 tot = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
    int64_t g = 0, left = gblk;  // the group being accumulated, blocks it still has
    auto block = [&](__m256i isum, int64_t b) __attribute__((always_inline)) {
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(xd + b), acc);
        if (--left && b + 1 < p.nblk) return;
        const __m256 s = param8<SF16>(sc, g * sstride);
        if (zterm) {
            __m256 z = _mm256_set1_ps(zshift);
            if (zp) z = _mm256_add_ps(param8<SF16>(zp, g * sstride), z);
            acc = _mm256_fnmadd_ps(z, _mm256_broadcast_ss(xs + g), acc);
        }
        tot = _mm256_fmadd_ps(s, acc, tot);
        acc = _mm256_setzero_ps(), left = gblk, ++g;
    };
    auto unit = [&](int64_t u, const uint8_t* const* src, int64_t off) __attribute__((always_inline)) {
        const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + u * (BITS == 4 ? 64 : 32)));
        const __m256i qb = BITS == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + u * 64 + 32)) : qa;
        __m256i d[8];
        LMP_UNROLL for (int r = 0; r < 8; ++r) {
            Codes<BITS, UNS> cw;
            cw.load(src[r] + off);
            d[r] = cw.dot(qa, qb, _mm256_setzero_si256());
        }
        if (BITS == 4) {
            __m256i lo, hi;
            reduce8x2(d, lo, hi);
            block(lo, 2 * u);
            if (2 * u + 1 < p.nblk) block(hi, 2 * u + 1);
        } else {
            __m256i s = reduce8(d);
            if (LMP_VNNI) s = _mm256_add_epi32(s, _mm256_set1_epi32(p.xc[u]));  // the codes' +128 (Codes::load)
            block(s, u);
        }
    };
    const bool pfon = p.row_bytes < GEMV_PF_ROW;
    for (int64_t u = 0; u < full; ++u) {
        if (pfon) {
            const char* c = pf + GEMV_PF + u * 256;  // 8 rows × 32 bytes per unit: 4 lines
            _mm_prefetch(c, _MM_HINT_T0), _mm_prefetch(c + 64, _MM_HINT_T0);
            _mm_prefetch(c + 128, _MM_HINT_T0), _mm_prefetch(c + 192, _MM_HINT_T0);
        }
        unit(u, w, u * 32);
    }
    if (full < units) {  // the rows' partial last unit, from the zero-padded copies
        const uint8_t* tp[8];
        for (int r = 0; r < 8; ++r) tp[r] = tail[r];
        unit(full, tp, 0);
    }
    if (bias) tot = _mm256_add_ps(tot, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(out, tot);
}

// Rows [o0, o1) of y for the one activation row: whole tiles of 8, then the rest as one tile whose missing rows
// repeat the last one (scales, zeros and bias copied to locals, so nothing past the buffers is read). Tiles read
// their scales and zeros from p.tiles when there is one and the tile starts on a multiple of 8.
template <int BITS, bool UNS, bool SF16>
static void gemv_q8(const Problem& p, int64_t o0, int64_t o1) {
    const float zshift = BITS == 8 && UNS ? -128.f : 0.f;
    const size_t es = SF16 ? 2 : 4;
    const char *sc = static_cast<const char*>(p.scales), *zp = static_cast<const char*>(p.zeros);
    int64_t o = o0;
    for (; o + 8 <= o1; o += 8) {
        const uint8_t* w[8];
        for (int r = 0; r < 8; ++r) w[r] = p.w + (o + r) * p.row_bytes;
        const char* pf = reinterpret_cast<const char*>(w[0]);
        if (SF16 && p.tiles && !(o & 7)) {
            const uint16_t* t = p.tiles + (o >> 3) * p.ng * 16;
            gemv_tile<BITS, UNS, true>(p, w, t, t + 8, 16, zshift, p.bias ? p.bias + o : nullptr, p.y + o, pf);
        } else {
            gemv_tile<BITS, UNS, SF16>(p, w, sc + o * es, zp ? zp + o * es : nullptr, p.O, zshift,
                                       p.bias ? p.bias + o : nullptr, p.y + o, pf);
        }
    }
    if (o >= o1) return;
    const int64_t n = o1 - o;
    std::vector<float>& loc = q8s.sloc;
    loc.assign(p.ng * 16 + 16, 0.f);  // scales [ng, 8], zeros [ng, 8], bias [8], out [8]
    float *ls = loc.data(), *lz = ls + p.ng * 8, *lb = lz + p.ng * 8, *lo = lb + 8;
    const uint8_t* w[8];
    for (int r = 0; r < 8; ++r) {
        const int64_t row = o + (r < n ? r : n - 1);
        w[r] = p.w + row * p.row_bytes;
        for (int64_t g = 0; g < p.ng; ++g) {
            ls[g * 8 + r] = param(p.scales, SF16, g * p.O + row);
            lz[g * 8 + r] = p.zeros ? param(p.zeros, SF16, g * p.O + row) : 0.f;
        }
        lb[r] = p.bias ? p.bias[row] : 0.f;
    }
    gemv_tile<BITS, UNS, false>(p, w, ls, p.zeros ? lz : nullptr, 8, zshift, lb, lo, reinterpret_cast<const char*>(w[0]));
    for (int64_t r = 0; r < n; ++r) p.y[o + r] = lo[r];
}

#if LMP_VNNI
constexpr int Q8_R1 = 8;   // rows per tile for one activation row (32 vector registers)
constexpr int Q8_MB = 4;   // activation rows per tile for several
#else
constexpr int Q8_R1 = 8;
constexpr int Q8_MB = 2;
#endif

template <int BITS, bool UNS, bool SF16>
static void rows_q8(const Problem& p, int64_t o0, int64_t o1) {
    if (p.M == 1) return gemv_q8<BITS, UNS, SF16>(p, o0, o1);
    // segments (same for every tile)
    std::vector<Seg>& segs = q8s.segs;
    segs.clear();
    const int64_t units = q8_units(BITS, p.nblk), gblk = p.ng == 1 ? p.nblk : p.group / BLK;
    for (int64_t u = 0; u < units; ++u) {
        const int64_t blo = BITS == 4 ? 2 * u : u, bhi = BITS == 4 ? std::min(2 * u + 1, p.nblk - 1) : u;
        const int32_t glo = static_cast<int32_t>(blo / gblk), ghi = static_cast<int32_t>(bhi / gblk);
        if (!segs.empty() && segs.back().glo == glo && segs.back().ghi == ghi) segs.back().u1 = static_cast<int32_t>(u + 1);
        else segs.push_back({static_cast<int32_t>(u), static_cast<int32_t>(u + 1), glo, ghi});
    }
    const int nseg = static_cast<int>(segs.size());
    std::vector<float>& zt = q8s.zt;
    zt.resize(p.M * (o1 - o0));
    q8_zero_term<SF16>(p, o0, o1, BITS == 8 && UNS ? -128.f : 0.f, zt.data());
    int64_t m0 = 0;
    for (; m0 + Q8_MB <= p.M; m0 += Q8_MB) q8_sweep<BITS, UNS, SF16, 4, Q8_MB>(p, segs.data(), nseg, o0, o0, o1, m0, zt.data());
    if (Q8_MB > 2 && m0 + 2 <= p.M) {
        q8_sweep<BITS, UNS, SF16, 4, 2>(p, segs.data(), nseg, o0, o0, o1, m0, zt.data());
        m0 += 2;
    }
    if (m0 < p.M) q8_sweep<BITS, UNS, SF16, Q8_R1, 1>(p, segs.data(), nseg, o0, o0, o1, m0, zt.data());
}

#if !LMP_VNNI
}  // namespace LMP_NS
// ACT_Q8 activations (kernels.h): max |x| and rounding in AVX2, ties to even as the reference's torch.round.
void quantize_q8_avx2(const Problem& p, const float* x, int8_t* xq, float* xd, float* xdv, int32_t* xc, float* xsum) {
    const int64_t gcols = p.ng == 1 ? p.I : p.group, units = q8_units(p.bits, p.nblk);
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t m = 0; m < p.M; ++m) {
        const float* xr = x + m * p.I;
        int8_t* q = xq + m * p.xq_stride;
        float* d = xd + m * p.nblk;
        std::memset(q, 0, p.xq_stride);
        for (int64_t g = 0; g < p.ng; ++g) xsum[m * p.ng + g] = 0.f;
        for (int64_t b = 0; b < p.nblk; ++b) {
            const int64_t c0 = b * BLK, n = std::min<int64_t>(BLK, p.I - c0);
            alignas(32) float v[BLK] = {};
            std::memcpy(v, xr + c0, n * sizeof(float));
            __m256 vv[4], mx = _mm256_setzero_ps();
            for (int k = 0; k < 4; ++k) vv[k] = _mm256_load_ps(v + 8 * k), mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, vv[k]));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h), id = amax > 0.f ? 127.f / amax : 0.f;
            d[b] = amax / 127.f;
            alignas(32) int32_t qi[BLK];
            __m256i qs = _mm256_setzero_si256();
            for (int k = 0; k < 4; ++k) {
                const __m256i t = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(vv[k], _mm256_set1_ps(id)),
                                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                qs = _mm256_add_epi32(qs, t);
                _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 8 * k), t);
            }
            const int32_t sum = LMP_NS::hsum_i(qs);
            // the 32 codes as int8 in column order (values are within ±127: the packs never saturate)
            __m256i a = _mm256_packs_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(qi)),
                                           _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + 8)));
            __m256i c = _mm256_packs_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(qi + 16)),
                                           _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + 24)));
            a = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, c), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            if (p.bits == 4) {  // even columns to dst[0..15], odd ones to dst[32..47] (the int4 kernel's layout)
                const __m256i eo = _mm256_shuffle_epi8(a, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11,
                                                                           13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
                                                                           7, 9, 11, 13, 15));
                const __m256i split = _mm256_permute4x64_epi64(eo, 0xD8);  // [evens 0-7, evens 8-15 | odds, odds]
                int8_t* dst = q + (b >> 1) * 64 + (b & 1) * 16;
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(split));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_extracti128_si256(split, 1));
            } else {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), a);
            }
            xc[m * p.nblk + b] = -128 * sum;
            xsum[m * p.ng + c0 / gcols] += d[b] * static_cast<float>(sum);
        }
        float* dv = xdv + m * units * 8;
        for (int64_t u = 0; u < units; ++u)
            for (int l = 0; l < 8; ++l) {
                const int64_t b = p.bits == 4 ? 2 * u + (l >> 2) : u;
                dv[u * 8 + l] = b < p.nblk ? d[b] : 0.f;
            }
    }
}
namespace LMP_NS {
#endif

}  // namespace LMP_NS

void LMP_ENTRY(const Problem& p, int64_t o0, int64_t o1) {
    using namespace LMP_NS;
    if (p.bits == 4) {
        if (p.act == ACT_F32) rows_t<4, ACT_F32>(p, o0, o1);
        else if (p.sf16) rows_q8<4, false, true>(p, o0, o1);
        else rows_q8<4, false, false>(p, o0, o1);
    } else {
        if (p.act == ACT_F32) rows_t<8, ACT_F32>(p, o0, o1);
        else if (p.act == ACT_Q8T) rows_t<8, ACT_Q8T>(p, o0, o1);
        else if (p.w_unsigned) p.sf16 ? rows_q8<8, true, true>(p, o0, o1) : rows_q8<8, true, false>(p, o0, o1);
        else p.sf16 ? rows_q8<8, false, true>(p, o0, o1) : rows_q8<8, false, false>(p, o0, o1);
    }
}

}  // namespace lmp
