// Portable kernels: the same arithmetic as simd_body.h in plain loops (any CPU; the compiler may vectorise
// with the baseline instruction set only).
#include <cmath>

#include "kernels.h"

namespace lmp {

// Code of column c (0-based) of a row as a signed value (uint8 int8 codes shifted by −128, as the SIMD path).
static inline int code_at(const Problem& p, const uint8_t* wr, int64_t c) {
    if (p.bits == 4) return (wr[c >> 1] >> ((c & 1) * 4)) & 15;
    return p.w_unsigned ? static_cast<int>(wr[c]) - 128 : static_cast<int>(static_cast<int8_t>(wr[c]));
}

static inline int64_t pos(const Problem& p, int64_t c) {  // column c's index in a prepared activation row
    if (p.act != ACT_F32) return q8_pos(p.bits, c);
    return (c & ~int64_t(BLK - 1)) + (p.bits == 4 ? perm4(static_cast<int>(c & (BLK - 1))) : (c & (BLK - 1)));
}

void rows_scalar(const Problem& p, int64_t o0, int64_t o1) {
    const int64_t P = p.nblk * BLK, gcols = p.ng == 1 ? p.I : p.group;
    const float zshift = p.bits == 8 && p.w_unsigned ? 128.f : 0.f;
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* wr = p.w + o * p.row_bytes;
        const float bias = p.bias ? p.bias[o] : 0.f;
        for (int64_t m = 0; m < p.M; ++m) {
            float tot = 0.f;
            int64_t iacc = 0;
            for (int64_t g = 0; g < p.ng; ++g) {
                const int64_t c0 = g * gcols, c1 = c0 + gcols < p.I ? c0 + gcols : p.I;
                float d = 0.f;
                if (p.act == ACT_F32) {
                    const float* xr = p.xf + m * P;
                    for (int64_t c = c0; c < c1; ++c) d += static_cast<float>(code_at(p, wr, c)) * xr[pos(p, c)];
                } else {
                    const int8_t* xr = p.xq + m * p.xq_stride;
                    for (int64_t c = c0; c < c1;) {  // one block at a time: int32 inside, float across blocks
                        const int64_t blk = c / BLK, end = (blk + 1) * BLK < c1 ? (blk + 1) * BLK : c1;
                        int32_t i = 0;
                        for (; c < end; ++c) i += code_at(p, wr, c) * xr[pos(p, c)];
                        if (p.act == ACT_Q8T) iacc += i;
                        else d += static_cast<float>(i) * p.xd[m * p.nblk + blk];
                    }
                }
                if (p.act == ACT_Q8T) continue;
                const float s = load_param(p.scales, p.sf16, g * p.O + o);
                const float z = (p.zeros ? load_param(p.zeros, p.sf16, g * p.O + o) : 0.f) - zshift;
                tot += s * (d - z * p.xsum[m * p.ng + g]);
            }
            p.y[m * p.O + o] = p.act == ACT_Q8T
                ? std::fmaf(static_cast<float>(iacc), p.xd[m] * load_param(p.scales, p.sf16, o), bias)
                : tot + bias;
        }
    }
}

// ACT_Q8 activations (kernels.h) in plain C++: max |x|, then x·(127/max) rounded ties to even.
void quantize_q8_scalar(const Problem& p, const float* x, int8_t* xq, float* xd, float* xdv, int32_t* xc, float* xsum) {
    const int64_t gcols = p.ng == 1 ? p.I : p.group, units = q8_units(p.bits, p.nblk);
    for (int64_t m = 0; m < p.M; ++m) {
        const float* xr = x + m * p.I;
        int8_t* q = xq + m * p.xq_stride;
        for (int64_t i = 0; i < p.xq_stride; ++i) q[i] = 0;
        for (int64_t g = 0; g < p.ng; ++g) xsum[m * p.ng + g] = 0.f;
        for (int64_t b = 0; b < p.nblk; ++b) {
            const int64_t c0 = b * BLK, c1 = c0 + BLK < p.I ? c0 + BLK : p.I;
            float amax = 0.f;
            for (int64_t c = c0; c < c1; ++c) amax = std::fmax(amax, std::fabs(xr[c]));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            int32_t qs = 0;
            for (int64_t c = c0; c < c1; ++c) {
                const int v = static_cast<int>(std::nearbyintf(xr[c] * id));
                q[q8_pos(p.bits, c)] = static_cast<int8_t>(v);
                qs += v;
            }
            xd[m * p.nblk + b] = amax / 127.f;
            xc[m * p.nblk + b] = -128 * qs;
            xsum[m * p.ng + c0 / gcols] += xd[m * p.nblk + b] * static_cast<float>(qs);
        }
        for (int64_t u = 0; u < units; ++u)
            for (int l = 0; l < 8; ++l) {
                const int64_t b = p.bits == 4 ? 2 * u + (l >> 2) : u;
                xdv[(m * units + u) * 8 + l] = b < p.nblk ? xd[m * p.nblk + b] : 0.f;
            }
    }
}

}  // namespace lmp
