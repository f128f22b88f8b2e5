// Weight-only linear for PackedLinear's 2- and 3-bit codes, activations in float32.
//
// Layout (quant.primitives.pack): each row is a little-endian bit stream, 8 codes in `bits` bytes (3 bytes for
// int3, 2 for int2), code c at bits [c·bits, (c+1)·bits) of its chunk; fp16 scales and zeros [ng, O]; a weight is
// (code − zero)·scale. A group holds a whole number of chunks (group % 8 == 0) or the whole row. Per output row
// and group the kernel sums x·code and x in float32 and finishes with scale·(Σ x·code − zero·Σ x): the
// reference's (code − zero)·scale products up to float summation order.
//
// AVX2: per chunk one broadcast of its 16/24-bit word, a variable shift per lane and a mask give 8 codes as int32,
// converted and multiplied with 8 activations (FMA); 4 output rows share each activation load. Scalar: the same
// sums one code at a time. The rows' partial last chunk (in_features % 8) is done in scalar code by both.
#include <algorithm>
#include <cstring>

#include "avx2_util.h"
#include "kernels.h"
#ifdef LMP_X86
#include <immintrin.h>
#define LMP_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

namespace lmp {
namespace {

// The chunk k of a row as an integer (bytes past the row's end read as 0).
inline uint32_t chunk_word(const uint8_t* row, int64_t k, int bits, int64_t row_bytes) {
    uint32_t v = 0;
    const int64_t off = k * bits, n = std::min<int64_t>(bits, row_bytes - off);
    for (int64_t i = 0; i < n; ++i) v |= static_cast<uint32_t>(row[off + i]) << (8 * i);
    return v;
}

// Σ x·code and Σ x over codes [c0, c1) of one row, one code at a time.
inline void sums_scalar(const LowBit& p, const uint8_t* row, const float* x, int64_t c0, int64_t c1, float& a,
                        float& sx) {
    const uint32_t mask = (1u << p.bits) - 1;
    for (int64_t c = c0; c < c1; ++c) {
        const uint32_t word = chunk_word(row, c >> 3, p.bits, p.row_bytes);
        a += x[c] * static_cast<float>((word >> ((c & 7) * p.bits)) & mask);
        sx += x[c];
    }
}

inline float group_param(const void* base, int64_t g, int64_t O, int64_t o) {
    return base ? half_to_float(static_cast<const uint16_t*>(base)[g * O + o]) : 0.f;
}

void lowbit_scalar(const LowBit& p, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* row = p.w + o * p.row_bytes;
        for (int64_t m = 0; m < p.M; ++m) {
            const float* x = p.x + m * p.I;
            float y = p.bias ? p.bias[o] : 0.f;
            for (int64_t g = 0; g < p.ng; ++g) {
                float a = 0.f, sx = 0.f;
                sums_scalar(p, row, x, g * p.group, std::min(p.I, (g + 1) * p.group), a, sx);
                y += group_param(p.scales, g, p.O, o) * (a - group_param(p.zeros, g, p.O, o) * sx);
            }
            p.y[m * p.O + o] = y;
        }
    }
}

#ifdef LMP_X86
// n ≤ 4 consecutive fp16 values from base[i] as floats (F16C).
LMP_AVX2_FN inline void params(const void* base, int64_t i, int n, float* out) {
    const uint16_t* h = static_cast<const uint16_t*>(base) + i;
    if (n == 4) {
        _mm_storeu_ps(out, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h))));
        return;
    }
    for (int r = 0; r < n; ++r) out[r] = half_to_float(h[r]);
}

// Rows o..o+R−1 (R ≤ 4), every activation row. BITS a constant, so that a chunk's load is two or three plain
// byte loads, not a call to memcpy.
template <int BITS, int R>
LMP_AVX2_FN void lowbit_tile(const LowBit& p, int64_t o) {
    constexpr int bits = BITS;
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const int64_t full = p.I >> 3;  // whole chunks of the row
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = p.w + (o + r) * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
        const float* x = p.x + m * p.I;
        float y[R];
        for (int r = 0; r < R; ++r) y[r] = p.bias ? p.bias[o + r] : 0.f;
        for (int64_t g = 0; g < p.ng; ++g) {
            const int64_t c0 = g * p.group, c1 = std::min(p.I, c0 + p.group);
            const int64_t k0 = c0 >> 3, k1 = std::min(full, c1 >> 3);
            __m256 acc[R], sxv = _mm256_setzero_ps();
            for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
            // chunks whose 4-byte word stays inside the row: one broadcast load each (the bits above the chunk's
            // own are never shifted into a lane's low bits); the row's last one or two assembled byte by byte
            const int64_t kf = std::max(k0, std::min(k1, (p.row_bytes - 4) / bits + 1));
            for (int64_t k = k0; k < k1; ++k) {
                const __m256 xv = _mm256_loadu_ps(x + k * 8);
                sxv = _mm256_add_ps(sxv, xv);
                for (int r = 0; r < R; ++r) {
                    const uint8_t* b = rows[r] + k * bits;
                    __m256i wv;
                    if (k < kf) {
                        int32_t word;
                        std::memcpy(&word, b, 4);
                        wv = _mm256_set1_epi32(word);
                    } else {
                        uint32_t word = b[0] | static_cast<uint32_t>(b[1]) << 8;
                        if (bits == 3) word |= static_cast<uint32_t>(b[2]) << 16;
                        wv = _mm256_set1_epi32(static_cast<int>(word));
                    }
                    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(wv, shifts), mask);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), xv, acc[r]);
                }
            }
            const float sx0 = hsum8(sxv);
            float sc[4], zp[4] = {0.f, 0.f, 0.f, 0.f};
            params(p.scales, g * p.O + o, R, sc);
            if (p.zeros) params(p.zeros, g * p.O + o, R, zp);
            for (int r = 0; r < R; ++r) {
                float a = hsum8(acc[r]), sx = sx0;
                if (k1 * 8 < c1) sums_scalar(p, rows[r], x, k1 * 8, c1, a, sx);  // the partial last chunk
                y[r] += sc[r] * (a - zp[r] * sx);
            }
        }
        for (int r = 0; r < R; ++r) p.y[m * p.O + o + r] = y[r];
    }
}

template <int BITS>
LMP_AVX2_FN void lowbit_avx2(const LowBit& p, int64_t o0, int64_t o1) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) lowbit_tile<BITS, 4>(p, o);
    for (; o < o1; ++o) lowbit_tile<BITS, 1>(p, o);
}
#endif

}  // namespace

void lowbit_rows(const LowBit& p, int isa, int64_t o0, int64_t o1) {
#ifdef LMP_X86
    if (isa >= ISA_AVX2) return p.bits == 3 ? lowbit_avx2<3>(p, o0, o1) : lowbit_avx2<2>(p, o0, o1);
#endif
    (void)isa;
    lowbit_scalar(p, o0, o1);
}

}  // namespace lmp
