// lmpress native kernels: shared declarations.
//
// y[M, O] = x[M, I] · W[O, I]ᵀ + bias for quantized W, read in the stored layouts of lmpress.nn:
//   int4  PackedLinear "packed-int4": codes uint8 [O, ceil(I/2)] (column 2j in the low nibble of byte j,
//         2j+1 in the high one), scales and zeros fp16 [n_groups, O] (group-major), w = (code − zero)·scale
//   int8  codes [O, I], either uint8 with fp16 zeros (PackedLinear "packed-int8") or int8 without zeros
//         (Int8WeightLinear, symmetric), scales fp16 [n_groups, O] or fp32 [O]
// Columns are walked in blocks of 32 (one AVX2 register of int8 codes). A group spans a whole number of blocks
// (group % 32 == 0) or the whole row (one group); only the row's last block may be partial.
//
// The activations arrive prepared by module.cpp (once per call, shared by every row):
//   ACT_F32   xf   float [M, nblk·32]  x itself, zero padded; for int4 permuted within each block so that the
//                                       low nibbles (even columns) come first, then the high ones (odd columns)
//   ACT_Q8    xq   int8  [M, xq_stride] x / d[b] rounded, per block b of 32 columns, d[b] = max|x_b| / 127, laid
//                                       out in "units" (q8_pos): int4 64 columns per unit, the even columns of its
//                                       two blocks first ([block 2u even | block 2u+1 even | 2u odd | 2u+1 odd],
//                                       16 each), so one 32-byte load of codes masked / shifted by 4 meets them;
//                                       int8 32 columns per unit, in order
//             xd   float [M, nblk]     d[b]; xdv float [M, units·8] the same per int32 lane of a unit's dot
//                                       product (int4: lanes 0-3 block 2u, 4-7 block 2u+1; int8: all 8 block u)
//             xc   int32 [M, nblk]     −128·Σ q of each block (int8 weights on VNNI: u8 codes then give Σ (c−128)·q)
//   ACT_Q8T   xq, xd[m]                one scale per row and int32 over the whole row (the fbgemm-compatible
//                                       W8A8 path of Int8WeightLinear; int8 weights only, no zeros)
//   xsum  float [M, n_groups]  Σ of the (dequantized) activations of each group, for the zero-point term
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lmp {

enum Act { ACT_F32 = 0, ACT_Q8 = 1, ACT_Q8T = 2 };
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
constexpr int BLK = 32;

struct Problem {
    int64_t M, I, O;
    int64_t group;      // columns per group (== I when there is one group)
    int64_t ng, nblk;   // groups, blocks of 32 per (padded) row
    int bits;           // 4 or 8
    int act;            // Act
    // weights
    const uint8_t* w;   // [O, row_bytes]
    int64_t row_bytes;
    bool w_unsigned;    // int8 only: uint8 codes (zero-point 128 shifted into the zeros) vs int8
    const void* scales; // [ng, O]
    const void* zeros;  // [ng, O] or null (then 0)
    bool sf16;          // scales/zeros fp16 (else fp32)
    const float* bias;  // [O] or null
    // prepared activations
    const float* xf;    // ACT_F32: [M, nblk*32]
    const int8_t* xq;   // ACT_Q8*: [M, nblk*32]
    const float* xd;    // ACT_Q8: [M, nblk]; ACT_Q8T: [M]
    const float* xsum;  // [M, ng]
    int64_t xq_stride;  // bytes per activation row of xq
    const float* xdv;   // ACT_Q8: [M, units*8]
    const int32_t* xc;  // ACT_Q8: [M, nblk]
    float* y;           // [M, O]
    // ACT_Q8 with M = 1, fp16 scales, several groups: the same scales and zeros regrouped per tile of 8 rows,
    // [O / 8][ng][8 scales | 8 zeros] (tile_params), or null. A tile's parameters are then one sequential run
    // instead of 2·ng lines O·2 bytes apart (scattered reads the prefetchers cannot follow: twice the time of
    // the codes themselves at group 32).
    const uint16_t* tiles;
};

// One call computes rows [o0, o1) of y for every m (threads split the rows).
void rows_scalar(const Problem& p, int64_t o0, int64_t o1);
#if defined(__x86_64__) || defined(__i386__)
#define LMP_X86 1
void rows_avx2(const Problem& p, int64_t o0, int64_t o1);
void rows_vnni(const Problem& p, int64_t o0, int64_t o1);
#endif

// Position of column c (0..31) inside its prepared block: int4 splits even/odd columns (ACT_F32).
inline int perm4(int c) { return (c & 1) ? 16 + (c >> 1) : (c >> 1); }

// Position of column c inside a prepared ACT_Q8 activation row (see above).
inline int64_t q8_pos(int bits, int64_t c) {
    if (bits != 4) return c;
    const int64_t u = c >> 6, w = c & 63;
    return u * 64 + ((w & 1) ? 32 : 0) + (w >> 5) * 16 + ((w & 31) >> 1);
}
inline int64_t q8_units(int bits, int64_t nblk) { return bits == 4 ? (nblk + 1) / 2 : nblk; }

// ACT_Q8 activations of x [M, I], into p.xq/xd/xdv/xc/xsum (buffers sized by the caller; xq zeroed past I).
void quantize_q8_scalar(const Problem& p, const float* x, int8_t* xq, float* xd, float* xdv, int32_t* xc, float* xsum);
#if defined(__x86_64__) || defined(__i386__)
void quantize_q8_avx2(const Problem& p, const float* x, int8_t* xq, float* xd, float* xdv, int32_t* xc, float* xsum);
#endif

inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  // subnormal: normalise
            int e = -1;
            do { ++e; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

inline float load_param(const void* base, bool f16, int64_t idx) {
    return f16 ? half_to_float(static_cast<const uint16_t*>(base)[idx]) : static_cast<const float*>(base)[idx];
}

// Float32 weight [O, I] of packed codes (any width 2..8, any group size): (code − zero) · scale, two rounded
// float32 steps as quant.primitives.dequantize (dequant.cpp). zeros may be null (0).
void dequantize(const uint8_t* w, int64_t row_bytes, int64_t O, int64_t I, int bits, const void* scales,
                const void* zeros, bool sf16, int64_t group, float* out, int isa, int threads);

// The prepared activations of one call (above), in buffers reused from call to call.
struct Acts {
    std::vector<float> xf, xd, xdv, xsum, xs;  // xs: w8a8 per-token scaled input (module.cpp)
    std::vector<int8_t> xq;
    std::vector<int32_t> xc;
};

// module.cpp: the instruction path to take (want < 0 or above this CPU's best: the best); x [M, I] → p's
// activations (ACT_F32 or ACT_Q8) in s; rows [o0, o1) of p on that path.
int clamp_isa(int want);
void prepare(Problem& p, const float* x, int isa, Acts& s);
void rows(const Problem& p, int isa, int64_t o0, int64_t o1);
// ACT_Q8T activations of x [M, I] for w8a8 (p.ng = 1, p.nblk set): mode 0 one dynamic uint8 grid for the whole
// input, 1 the same after dividing each row by its max |x| (divisors into r), 2 the static grid (in_scale,
// in_zero); fbgemm's rounding (module.cpp)
void prepare_w8a8(Problem& p, const float* x, int mode, double in_scale, int in_zero, Acts& s,
                  std::vector<float>& r);

// p's scales and zeros (fp16 [ng, O], zeros may be null: 0) regrouped as Problem::tiles, into out
// [(O / 8)·ng·16] (module.cpp).
void tile_params(const Problem& p, uint16_t* out);
inline bool wants_tiles(const Problem& p) { return p.act == ACT_Q8 && p.sf16 && p.ng > 1 && p.O >= 8; }

// PackedLinear's 2- and 3-bit codes (lowbit.cpp): y [M, O] = x [M, I] · Wᵀ + bias, activations float32, codes as
// quant.primitives.pack lays them out (8 codes per `bits` bytes), fp16 scales and zeros (zeros may be null: 0)
// [ng, O]; group % 8 == 0 or one group (group == I).
struct LowBit {
    const float* x;
    int64_t M, I, O;
    const uint8_t* w;
    int64_t row_bytes;
    int bits;
    const void *scales, *zeros;
    int64_t group, ng;
    const float* bias;
    float* y;
};
void lowbit_rows(const LowBit& p, int isa, int64_t o0, int64_t o1);

// Threads: run fn(ctx, begin, end) over [0, n) split in chunks, on up to `threads` threads (caller included).
void parallel_for(int64_t n, int64_t chunk, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx);

// The chunk for splitting n rows of a GEMV or small GEMM: one chunk per thread, a multiple of `align` rows. More
// chunks than threads cost more than they balance here: every claim and completion is a cache line moving
// between cores (on this machine's 2 vCPUs, 8 chunks instead of 2 made a SmolLM2 W4 decode step 15% slower at
// 2 threads, busy machine or quiet), and a helper that is late simply leaves its chunk to the caller.
inline int64_t thread_chunk(int64_t n, int threads, int64_t align) {
    const int64_t t = threads > 0 ? threads : 1, c = (n + t - 1) / t;
    return c < align ? align : (c + align - 1) / align * align;
}

}  // namespace lmp
