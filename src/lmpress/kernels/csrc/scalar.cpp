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
                    const int8_t* xr = p.xq + m * P;
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

}  // namespace lmp
