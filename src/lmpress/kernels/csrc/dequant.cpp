// Dequantization of PackedLinear weights into float32 [O, I]: w[o, c] = (code − zero) · scale, computed as two
// rounded float32 steps, subtract then multiply — the operations and order of quant.primitives.dequantize
// (codes.float() − zero, then · scale, zero and scale widened from fp16 exactly), so the result is bit for bit the
// reference weight. Used for inputs too large for the GEMV kernels (prefill, evaluation batches): the caller then
// runs torch's float matmul on the buffer.
//
// Codes: the little-endian bitstream of quant.primitives.pack for any width 2..8 (column c at bits c·b ..).
// Groups: any size (group ≥ I or 0: one group per row); scales and zeros fp16 [n_groups, O], zeros optional.
// Each row is first unpacked into a byte buffer of codes (L1-resident), then converted group by group; rows are
// split across the pool's threads.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#ifdef LMP_X86
#include <immintrin.h>
#endif

namespace lmp {
namespace {

// Byte images of the codes in one byte of 2-bit codes (4 codes) and in 12 bits of 3-bit codes (4 codes).
struct Lut {
    uint32_t two[256], three[4096];
    Lut() {
        for (uint32_t v = 0; v < 256; ++v)
            two[v] = (v & 3) | ((v >> 2) & 3) << 8 | ((v >> 4) & 3) << 16 | ((v >> 6) & 3) << 24;
        for (uint32_t v = 0; v < 4096; ++v)
            three[v] = (v & 7) | ((v >> 3) & 7) << 8 | ((v >> 6) & 7) << 16 | ((v >> 9) & 7) << 24;
    }
};
const Lut& luts() {
    static const Lut t;
    return t;
}

// Codes of one row (I columns) into out[0, I). Bits 8 are read in place by the caller.
void unpack_row_scalar(const uint8_t* w, int64_t row_bytes, int64_t I, int bits, uint8_t* out) {
    if (bits == 4) {
        int64_t c = 0;
        for (; c + 2 <= I; c += 2) {
            const uint8_t v = w[c >> 1];
            out[c] = v & 15, out[c + 1] = v >> 4;
        }
        if (c < I) out[c] = w[c >> 1] & 15;
        return;
    }
    if (bits == 2) {  // one byte → four codes, through a table of their 4-byte images
        const Lut& t = luts();
        int64_t c = 0;
        for (; c + 4 <= I; c += 4) std::memcpy(out + c, &t.two[w[c >> 2]], 4);
        for (; c < I; ++c) out[c] = (w[c >> 2] >> ((c & 3) * 2)) & 3;
        return;
    }
    if (bits == 3) {  // every 8 columns fill one 24-bit word (the row holds whole words): two 12-bit table lookups
        const Lut& t = luts();
        int64_t c = 0;
        for (; c + 8 <= I; c += 8) {
            const uint8_t* b = w + (c >> 3) * 3;
            const uint32_t v = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
            std::memcpy(out + c, &t.three[v & 0xfff], 4);
            std::memcpy(out + c + 4, &t.three[v >> 12], 4);
        }
        if (c < I) {
            const uint8_t* b = w + (c >> 3) * 3;
            const uint32_t v = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
            for (int k = 0; c + k < I; ++k) out[c + k] = (v >> (3 * k)) & 7;
        }
        return;
    }
    const unsigned mask = (1u << bits) - 1;  // 5..7 bits: the generic bitstream, two bytes at a time
    for (int64_t c = 0; c < I; ++c) {
        const int64_t bit = c * bits, j = bit >> 3;
        const unsigned v = w[j] | (j + 1 < row_bytes ? (unsigned)w[j + 1] << 8 : 0u);
        out[c] = (v >> (bit & 7)) & mask;
    }
}

struct Dq {
    const uint8_t* w;
    int64_t row_bytes, O, I, group, ng;
    int bits;
    const void* scales;
    const void* zeros;
    bool sf16;
    float* out;
    int isa;
};

void rows_dq_scalar(const Dq& d, int64_t o0, int64_t o1) {
    std::vector<uint8_t> buf(d.bits == 8 ? 0 : d.I);
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* wr = d.w + o * d.row_bytes;
        const uint8_t* codes = wr;
        if (d.bits != 8) unpack_row_scalar(wr, d.row_bytes, d.I, d.bits, buf.data()), codes = buf.data();
        float* dst = d.out + o * d.I;
        for (int64_t g = 0; g < d.ng; ++g) {
            const float s = load_param(d.scales, d.sf16, g * d.O + o);
            const float z = d.zeros ? load_param(d.zeros, d.sf16, g * d.O + o) : 0.f;
            const int64_t c0 = g * d.group, c1 = c0 + d.group < d.I ? c0 + d.group : d.I;
            for (int64_t c = c0; c < c1; ++c) {
                const float t = static_cast<float>(codes[c]) - z;  // rounded, then
                dst[c] = t * s;                                    // rounded again: no fused multiply-add
            }
        }
    }
}

#ifdef LMP_X86
#define LMP_DQ_TARGET __attribute__((target("avx2,f16c")))

LMP_DQ_TARGET void unpack4_avx2(const uint8_t* w, int64_t I, uint8_t* out) {
    const __m128i nib = _mm_set1_epi8(0x0f);
    int64_t c = 0;
    for (; c + 32 <= I; c += 32) {  // 16 bytes → 32 codes, column 2j low nibble, 2j+1 high
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (c >> 1)));
        const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c + 16), _mm_unpackhi_epi8(lo, hi));
    }
    for (; c + 2 <= I; c += 2) {
        const uint8_t v = w[c >> 1];
        out[c] = v & 15, out[c + 1] = v >> 4;
    }
    if (c < I) out[c] = w[c >> 1] & 15;
}

LMP_DQ_TARGET void rows_dq_avx2(const Dq& d, int64_t o0, int64_t o1) {
    std::vector<uint8_t> buf(d.bits == 8 ? 0 : d.I);
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* wr = d.w + o * d.row_bytes;
        const uint8_t* codes = wr;
        if (d.bits == 4) unpack4_avx2(wr, d.I, buf.data()), codes = buf.data();
        else if (d.bits != 8) unpack_row_scalar(wr, d.row_bytes, d.I, d.bits, buf.data()), codes = buf.data();
        float* dst = d.out + o * d.I;
        for (int64_t g = 0; g < d.ng; ++g) {
            const int64_t gi = g * d.O + o;
            const float s = d.sf16 ? _cvtsh_ss(static_cast<const uint16_t*>(d.scales)[gi])
                                   : static_cast<const float*>(d.scales)[gi];
            const float z = !d.zeros ? 0.f
                            : d.sf16 ? _cvtsh_ss(static_cast<const uint16_t*>(d.zeros)[gi])
                                     : static_cast<const float*>(d.zeros)[gi];
            const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
            const int64_t c0 = g * d.group, c1 = c0 + d.group < d.I ? c0 + d.group : d.I;
            int64_t c = c0;
            for (; c + 32 <= c1; c += 32) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c));
                const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
                const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
                const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
                const __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                const __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
                _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_sub_ps(f0, vz), vs));
                _mm256_storeu_ps(dst + c + 8, _mm256_mul_ps(_mm256_sub_ps(f1, vz), vs));
                _mm256_storeu_ps(dst + c + 16, _mm256_mul_ps(_mm256_sub_ps(f2, vz), vs));
                _mm256_storeu_ps(dst + c + 24, _mm256_mul_ps(_mm256_sub_ps(f3, vz), vs));
            }
            for (; c + 8 <= c1; c += 8) {
                const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + c));
                const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_sub_ps(f, vz), vs));
            }
            for (; c < c1; ++c) {
                const float t = static_cast<float>(codes[c]) - z;
                dst[c] = t * s;
            }
        }
    }
}
#endif

void run_dq(void* ctx, int64_t o0, int64_t o1) {
    const Dq& d = *static_cast<const Dq*>(ctx);
#ifdef LMP_X86
    if (d.isa >= ISA_AVX2) return rows_dq_avx2(d, o0, o1);
#endif
    rows_dq_scalar(d, o0, o1);
}

}  // namespace

void dequantize(const uint8_t* w, int64_t row_bytes, int64_t O, int64_t I, int bits, const void* scales,
                const void* zeros, bool sf16, int64_t group, float* out, int isa, int threads) {
    Dq d{w, row_bytes, O, I, 0, 1, bits, scales, zeros, sf16, out, isa};
    d.ng = group > 0 && group < I ? (I + group - 1) / group : 1;
    d.group = d.ng == 1 ? I : group;
    // chunks of about 64 KiB of output, a few per thread at least
    const int64_t by_size = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));
    const int64_t per_thread = std::max<int64_t>(1, (O + 4 * threads - 1) / (4 * threads));
    parallel_for(O, std::min(by_size, per_thread), threads, run_dq, &d);
}

}  // namespace lmp
