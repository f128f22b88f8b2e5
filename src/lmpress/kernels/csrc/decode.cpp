// The fused decode step: one token through a whole Llama-family model (Llama, Qwen2, Mistral) in one native call,
// for NativeRunner.decode of a single row. The per-op path costs ~15 torch/native calls per block from Python
// (~200 µs of dispatch per block); here the whole step runs with the GIL released:
//
//   x = embed[token]                                                       x [D]
//   per block: h = rmsnorm(x)·w_attn; q, k, v = W_q h (+b), W_k h (+b), W_v h (+b)    q [H·Dh], k/v [KV·Dh]
//              RoPE on q and k at `pos` (rotate-half: out[j] = v[j]·cos[j] + v[(j + Dh/2) mod Dh]·sin_signed[j])
//              k, v → the caches at pos; a = softmax(q·Kᵀ·scale)·V over positions 0..pos, the G = H/KV query
//              heads of a kv head sharing it (float32 softmax)
//              x += W_o a; h = rmsnorm(x)·w_mlp; x += W_down (silu(W_gate h) · W_up h)
//   logits = W_head (rmsnorm(x)·w_final)                                   logits [V]
//
// Linear layers are descriptors over the torch tensors NativeRunner keeps alive (raw addresses, as module.cpp
// takes them): LIN_Q the weight-only int4/int8 kernels of module.cpp (a Problem, activations "f32" or "q8"
// exactly as the layer's own forward prepares them), LIN_W8A8 the fbgemm-compatible int8 kernel (one dynamic
// uint8 grid for the row, or the layer's static one), LIN_F32 a float32 weight [O, I] (nn.Linear; the GEMV
// below), LIN_LOW PackedLinear's int2/int3 codes (lowbit.cpp, float32 activations). The layers sharing an input (q/k/v, gate/up) run as one parallel_for over their rows together, and
// share prepared activations when their layouts agree. The numbers equal the per-op path's up to float summation
// order (norms, attention, float GEMVs); the quantized GEMVs see the same activations and run the same kernels.
//
//   decode_plan(dims..., head, layers) -> capsule      the model, once (NativeRunner builds it lazily)
//   decode_step(plan, token, pos, logits_addr, isa, threads)   one token; logits float32 [V] written there
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "avx2_util.h"
#include "kernels.h"
#ifdef LMP_X86
#include <immintrin.h>
#define LMP_AVX2_FN __attribute__((target("avx2,fma")))
#endif

namespace lmp {
namespace {

enum LinKind { LIN_Q = 0, LIN_W8A8 = 1, LIN_F32 = 2, LIN_LOW = 3 };

struct Lin {
    int kind = LIN_F32;
    Problem p{};            // LIN_Q, LIN_W8A8: weights, shapes and activation mode (M = 1)
    int mode = 0;           // LIN_W8A8: 0 dynamic grid, 2 static (in_scale, in_zero)
    double in_scale = 0.0;
    int in_zero = 0;
    const float* w = nullptr;     // LIN_F32: [O, I]
    const float* bias = nullptr;  // LIN_F32: [O] or null
    int64_t I = 0, O = 0;
    std::vector<uint16_t> tiles;  // LIN_Q: p.tiles, derived once here (the plan's tensors stay unchanged)
    LowBit lb{};                  // LIN_LOW: int2/int3 codes (lowbit.cpp); x and y set per call
};

struct Layer {
    const float *attn_norm, *mlp_norm;
    Lin q, k, v, o, gate, up, down;
};

// Phases of step() that decode_profile times: where a multi-threaded step spends its time.
enum Phase { PH_NORM, PH_PREP, PH_QKV, PH_ROPE, PH_ATTN, PH_O, PH_GATEUP, PH_SILU, PH_DOWN, PH_HEAD, PH_N };

struct Plan {
    int64_t D, H, KV, Dh, F, V, vocab_rows, max_len;
    float eps, scale;
    const float *embed, *final_norm, *cos, *sin;  // embed [vocab_rows, D]; cos, sin [max_len, Dh]
    float *kc, *vc;                               // [L, rows, KV, max_len, Dh]: row 0 at these strides
    int64_t layer_stride, head_stride;
    std::vector<Layer> layers;
    Lin head;
    std::vector<float> x, h, q, k, v, att, gate, up, tmp, scores;
    Acts acts[3];
    std::vector<float> r;  // prepare_w8a8's per-token divisors (mode 1 only: never filled here)
    std::mutex mu;         // one step at a time per plan (the scratch above is the plan's)
    bool profile = false;  // decode_profile: time each phase of step() (a clock read per phase when on)
    double prof[PH_N] = {};
};

// ---- float helpers (AVX2 + FMA where the instruction path allows it, plain loops otherwise) -------------------

float dot_scalar(const float* a, const float* b, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

void axpy_scalar(float a, const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void f32_rows_scalar(const Lin& L, const float* x, float* y, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) y[o] = dot_scalar(L.w + o * L.I, x, L.I) + (L.bias ? L.bias[o] : 0.f);
}

#ifdef LMP_X86
LMP_AVX2_FN float dot_avx2(const float* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// Rows [o0, o1) of y = W x + b, 4 rows per pass over x with two accumulators each (the loads, not the FMA
// latency, bound it; a large float head is bound by memory bandwidth). The weights are prefetched 8 KB ahead of
// the 4 rows' first byte, as the quantized GEMV does (simd_body.h gemv_tile): 4 short streams at a time are too
// many for the hardware prefetcher to follow.
LMP_AVX2_FN void f32_rows_avx2(const Lin& L, const float* x, float* y, int64_t o0, int64_t o1) {
    const int64_t I = L.I, I16 = I & ~int64_t(15);
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float* w[4] = {L.w + o * I, L.w + (o + 1) * I, L.w + (o + 2) * I, L.w + (o + 3) * I};
        const char* pf = reinterpret_cast<const char*>(w[0]) + 8192;
        __m256 a[4][2];
        for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < I16; i += 16) {
            const char* c = pf + i * 16;  // 4 rows × 64 bytes per step: 4 lines
            _mm_prefetch(c, _MM_HINT_T0), _mm_prefetch(c + 64, _MM_HINT_T0);
            _mm_prefetch(c + 128, _MM_HINT_T0), _mm_prefetch(c + 192, _MM_HINT_T0);
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int r = 0; r < 4; ++r) {
                a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + i), x0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + i + 8), x1, a[r][1]);
            }
        }
        for (int r = 0; r < 4; ++r) {
            float s = hsum8(_mm256_add_ps(a[r][0], a[r][1]));
            for (int64_t i = I16; i < I; ++i) s += w[r][i] * x[i];
            y[o + r] = s + (L.bias ? L.bias[o + r] : 0.f);
        }
    }
    for (; o < o1; ++o) y[o] = dot_avx2(L.w + o * I, x, I) + (L.bias ? L.bias[o] : 0.f);
}
#endif

// ---- the float linear of a few rows (prefill of a few tokens: speculative verification, batched decode) -------
// Y[M, O] = X[M, I] · Wᵀ + b. torch's float GEMM at M = 2..16 costs about M GEMVs here (a compute-bound blocking
// that suits large M). Here each pair of weight rows streams from memory once and meets up to 6 activation rows
// in the same pass (2 × 6 accumulators in registers; the activation rows are re-read from L1/L2 for every pair):
// the memory stream never waits for a compute-only pass over cached weights, so 5 rows cost little more than
// one (an earlier blocking — 4 weight rows, then activation rows two at a time over the cached tile — cost two
// GEMVs at 5 rows). More than 6 rows take further passes over the pair, from cache. Summation order per output:
// 8-lane partial sums, then the column tail.

struct GemmF32 {
    const float *x, *w, *bias;
    float* y;
    int64_t M, I, O;
    int isa;
};

void f32_gemm_scalar(const GemmF32& g, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
        for (int64_t m = 0; m < g.M; ++m)
            g.y[m * g.O + o] = dot_scalar(g.w + o * g.I, g.x + m * g.I, g.I) + (g.bias ? g.bias[o] : 0.f);
}

#ifdef LMP_X86
// Rows o (and o + 1 when R == 2) of Y for activation rows m0 .. m0 + MB − 1; `prefetch` on the first pass.
template <int R, int MB>
LMP_AVX2_FN inline void f32_gemm_block(const GemmF32& g, int64_t o, int64_t m0, bool prefetch) {
    const int64_t I = g.I, I8 = I & ~int64_t(7);
    const float* w0 = g.w + o * I;
    const float* w1 = w0 + (R == 2 ? I : 0);
    const float* x = g.x + m0 * I;
    __m256 a[R][MB];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) a[r][m] = _mm256_setzero_ps();
    // The R rows are one contiguous run of R·I floats: prefetch it 8 KB ahead at the rate it is read (R·32 bytes
    // per 8 columns), so the next pair's rows are on their way too (a pointer per row, 8 KB ahead of each,
    // fetched the second row twice and the next pair's second row never: half the copy bandwidth).
    // Into L2 (T1), not L1: an L1 prefetch holds one of L1's few miss buffers until its line arrives, which capped
    // the stream at ~10 GB/s with 5 rows (16.8 GB/s into L2; 8960×1536 weights, 1 thread).
    const char* pf = reinterpret_cast<const char*>(w0) + 8192;
    for (int64_t i = 0; i < I8; i += 8) {
        if (prefetch && (R == 2 || (i & 15) == 0)) _mm_prefetch(pf + i * 4 * R, _MM_HINT_T1);
        const __m256 v0 = _mm256_loadu_ps(w0 + i);
        const __m256 v1 = R == 2 ? _mm256_loadu_ps(w1 + i) : v0;
        for (int m = 0; m < MB; ++m) {
            const __m256 xm = _mm256_loadu_ps(x + m * I + i);
            a[0][m] = _mm256_fmadd_ps(v0, xm, a[0][m]);
            if (R == 2) a[R - 1][m] = _mm256_fmadd_ps(v1, xm, a[R - 1][m]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float* wr = r ? w1 : w0;
        const float b = g.bias ? g.bias[o + r] : 0.f;
        for (int m = 0; m < MB; ++m) {
            const float* xm = x + m * I;
            float s = hsum8(a[r][m]);
            for (int64_t i = I8; i < I; ++i) s += wr[i] * xm[i];
            g.y[(m0 + m) * g.O + o + r] = s + b;
        }
    }
}

template <int R>
LMP_AVX2_FN void f32_gemm_rows(const GemmF32& g, int64_t o) {
    for (int64_t m0 = 0; m0 < g.M; m0 += 6) {
        const bool pf = m0 == 0;
        switch (std::min<int64_t>(6, g.M - m0)) {
            case 1: f32_gemm_block<R, 1>(g, o, m0, pf); break;
            case 2: f32_gemm_block<R, 2>(g, o, m0, pf); break;
            case 3: f32_gemm_block<R, 3>(g, o, m0, pf); break;
            case 4: f32_gemm_block<R, 4>(g, o, m0, pf); break;
            case 5: f32_gemm_block<R, 5>(g, o, m0, pf); break;
            default: f32_gemm_block<R, 6>(g, o, m0, pf); break;
        }
    }
}

LMP_AVX2_FN void f32_gemm_avx2(const GemmF32& g, int64_t o0, int64_t o1) {
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2) f32_gemm_rows<2>(g, o);
    if (o < o1) f32_gemm_rows<1>(g, o);
}
#endif

void gemm_f32_rows(void* ctx, int64_t o0, int64_t o1) {
    const GemmF32& g = *static_cast<const GemmF32*>(ctx);
#ifdef LMP_X86
    if (g.isa >= ISA_AVX2) return f32_gemm_avx2(g, o0, o1);
#endif
    f32_gemm_scalar(g, o0, o1);
}

// e^x elementwise in place. AVX2: x = n·ln2 + r (|r| ≤ ln2/2, ln2 in two parts), e^r by its Taylor polynomial
// to degree 7 (truncation below 1e-8 relative: within an ulp or two of expf), times 2^n built in the exponent
// bits; x is clamped to [−87.3, 88.3] so 2^n stays a normal float (e^x below e^−87.3 ≈ 1e−38 reads as that,
// not 0: no overflow, no denormals); against double exp over [−80, 80] its relative error is at most 7.6e-8. Scalar:
// std::exp. Used for the decode step's SiLU and softmax (SmolLM2 w4g128+h8 at 1 thread: 4% faster per token).
void exp_scalar(float* v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

#ifdef LMP_X86
LMP_AVX2_FN inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2, high part (exact in n·hi)
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);       // ln2, low part
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

LMP_AVX2_FN void exp_avx2(float* v, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
    if (i < n) {  // the tail through a zero-padded register
        alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, v + i, (n - i) * sizeof(float));
        _mm256_store_ps(t, exp8(_mm256_load_ps(t)));
        std::memcpy(v + i, t, (n - i) * sizeof(float));
    }
}

// g = silu(g)·u = g / (1 + e^−g) · u
LMP_AVX2_FN void silu_mul_avx2(float* g, const float* u, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}
#endif

void silu_mul(float* g, const float* u, int64_t n, int isa) {
#ifdef LMP_X86
    if (isa >= ISA_AVX2) return silu_mul_avx2(g, u, n);
#endif
    (void)isa;
    for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// ---- linear layers ------------------------------------------------------------------------------------------

// Up to three layers reading one input, run as one range of rows (the concatenation of their outputs).
struct Batch {
    struct Job {
        const Lin* lin;
        Problem p;        // LIN_Q / LIN_W8A8: with its prepared activations and output
        const float* x;   // LIN_F32, LIN_LOW
        float* y;
        int64_t start;    // first row in the batch's range
    } jobs[3];
    int n = 0, isa = 0;
    int64_t total = 0;
};

void batch_rows(void* ctx, int64_t b, int64_t e) {
    const Batch& B = *static_cast<const Batch*>(ctx);
    for (int i = 0; i < B.n; ++i) {
        const Batch::Job& j = B.jobs[i];
        const int64_t lo = std::max(b, j.start) - j.start, hi = std::min(e, j.start + j.lin->O) - j.start;
        if (lo >= hi) continue;
        if (j.lin->kind == LIN_LOW) {
            LowBit q = j.lin->lb;
            q.x = j.x, q.y = j.y, q.M = 1;
            lowbit_rows(q, B.isa, lo, hi);
        } else if (j.lin->kind != LIN_F32) rows(j.p, B.isa, lo, hi);
#ifdef LMP_X86
        else if (B.isa >= ISA_AVX2) f32_rows_avx2(*j.lin, j.x, j.y, lo, hi);
#endif
        else f32_rows_scalar(*j.lin, j.x, j.y, lo, hi);
    }
}

// Whether two quantized layers read the same prepared activations of one input.
bool same_acts(const Lin& a, const Lin& b) {
    if (a.kind != b.kind || a.kind == LIN_F32 || a.kind == LIN_LOW || a.p.I != b.p.I) return false;
    if (a.kind == LIN_W8A8) return a.mode == b.mode && a.in_scale == b.in_scale && a.in_zero == b.in_zero;
    return a.p.bits == b.p.bits && a.p.act == b.p.act && a.p.ng == b.p.ng && a.p.group == b.p.group;
}

// Adds the time since the last lap to a phase of the plan's profile (decode_profile); absent when not profiling.
struct Clock {
    Plan& P;
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    void lap(int phase) {
        const auto now = std::chrono::steady_clock::now();
        P.prof[phase] += std::chrono::duration<double>(now - last).count();
        last = now;
    }
};

// y_i = L_i x for up to three layers (x [I], y_i [O_i]).
void linears(Plan& P, const float* x, std::initializer_list<std::pair<const Lin*, float*>> ls, int isa, int threads,
             Clock* clock = nullptr) {
    Batch B;
    B.isa = isa;
    for (const auto& [lin, y] : ls) {
        Batch::Job& j = B.jobs[B.n];
        j.lin = lin, j.x = x, j.y = y, j.start = B.total;
        if (lin->kind != LIN_F32 && lin->kind != LIN_LOW) {
            j.p = lin->p;
            j.p.y = y;
            const Batch::Job* prev = nullptr;
            for (int i = 0; i < B.n && !prev; ++i)
                if (same_acts(*B.jobs[i].lin, *lin)) prev = &B.jobs[i];
            if (prev) {  // the activations an earlier layer of this input prepared
                j.p.xf = prev->p.xf, j.p.xq = prev->p.xq, j.p.xd = prev->p.xd, j.p.xsum = prev->p.xsum;
                j.p.xq_stride = prev->p.xq_stride, j.p.xdv = prev->p.xdv, j.p.xc = prev->p.xc;
            } else if (lin->kind == LIN_W8A8) {
                prepare_w8a8(j.p, x, lin->mode, lin->in_scale, lin->in_zero, P.acts[B.n], P.r);
            } else {
                prepare(j.p, x, isa, P.acts[B.n]);
            }
        }
        B.total += lin->O;
        ++B.n;
    }
    if (clock) clock->lap(PH_PREP);
    parallel_for(B.total, thread_chunk(B.total, threads, 8), threads, batch_rows, &B);  // whole tiles of 8 rows
}

// ---- the other pieces ---------------------------------------------------------------------------------------

// out = w · x / sqrt(mean(x²) + eps), as NativeRunner._norm (float32; the sum of squares in double)
void rmsnorm_scalar(const float* x, const float* w, float* out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float r = 1.f / std::sqrt(eps + static_cast<float>(ss / static_cast<double>(n)));
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

#ifdef LMP_X86
LMP_AVX2_FN void rmsnorm_avx2(const float* x, const float* w, float* out, int64_t n, float eps) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(s0, s1));
    double ss = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float r = 1.f / std::sqrt(eps + static_cast<float>(ss / static_cast<double>(n)));
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
    for (; i < n; ++i) out[i] = w[i] * (x[i] * r);
}
#endif

void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps, int isa) {
#ifdef LMP_X86
    if (isa >= ISA_AVX2) return rmsnorm_avx2(x, w, out, n, eps);
#endif
    (void)isa;
    rmsnorm_scalar(x, w, out, n, eps);
}

// RoPE in place on nh heads of Dh values at one position (cos, sin: that position's rows of the tables, sin
// signed for the rotate-half layout): out[j] = v[j]·cos[j] + v[(j + Dh/2) mod Dh]·sin[j], both halves at once
// (plain loops the compiler vectorizes).
void rope(float* v, int64_t nh, int64_t Dh, const float* cos, const float* sin) {
    const int64_t half = Dh / 2;
    for (int64_t h = 0; h < nh; ++h) {
        float* __restrict a = v + h * Dh;
        float* __restrict b = a + half;
        for (int64_t j = 0; j < half; ++j) {
            const float x0 = a[j], x1 = b[j];
            a[j] = x0 * cos[j] + x1 * sin[j];
            b[j] = x1 * cos[j + half] + x0 * sin[j + half];
        }
    }
}

// One query head's attention over positions 0..len−1: s = softmax(q·Kᵀ·scale) (scratch [len]), o = s·V.
void attn_head_scalar(const float* q, const float* K, const float* V, int64_t len, int64_t Dh, float scale,
                      float* s, float* o) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) {
        s[t] = dot_scalar(q, K + t * Dh, Dh) * scale;
        mx = std::max(mx, s[t]);
    }
    for (int64_t t = 0; t < len; ++t) s[t] -= mx;
    exp_scalar(s, len);
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) sum += s[t];
    std::fill(o, o + Dh, 0.f);
    for (int64_t t = 0; t < len; ++t) axpy_scalar(s[t], V + t * Dh, o, Dh);
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < Dh; ++j) o[j] *= inv;
}

#ifdef LMP_X86
// The same for Dh a multiple of 8: scores 4 positions per pass over q (one horizontal reduction for the 4),
// then the weighted sum of V rows kept in registers, 32 (or 8) columns per pass over the positions.
LMP_AVX2_FN void attn_head_avx2(const float* q, const float* K, const float* V, int64_t len, int64_t Dh,
                                float scale, float* s, float* o) {
    const __m128 sc = _mm_set1_ps(scale);
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) {
        const float *k0 = K + t * Dh, *k1 = k0 + Dh, *k2 = k1 + Dh, *k3 = k2 + Dh;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < Dh; j += 8) {
            const __m256 qv = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + j), qv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + j), qv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k2 + j), qv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k3 + j), qv, a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        _mm_storeu_ps(s + t, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), sc));
    }
    for (; t < len; ++t) s[t] = dot_avx2(q, K + t * Dh, Dh) * scale;
    float mx = -INFINITY;
    for (t = 0; t < len; ++t) mx = std::max(mx, s[t]);
    for (t = 0; t < len; ++t) s[t] -= mx;
    exp_avx2(s, len);
    float sum = 0.f;
    for (t = 0; t < len; ++t) sum += s[t];
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    int64_t j = 0;
    for (; j + 32 <= Dh; j += 32) {
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        const float* v = V + j;
        for (t = 0; t < len; ++t, v += Dh) {
            const __m256 w = _mm256_set1_ps(s[t]);
            o0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), o0);
            o1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), o1);
            o2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), o2);
            o3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), o3);
        }
        _mm256_storeu_ps(o + j, _mm256_mul_ps(o0, inv));
        _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(o1, inv));
        _mm256_storeu_ps(o + j + 16, _mm256_mul_ps(o2, inv));
        _mm256_storeu_ps(o + j + 24, _mm256_mul_ps(o3, inv));
    }
    for (; j < Dh; j += 8) {
        __m256 o0 = _mm256_setzero_ps();
        const float* v = V + j;
        for (t = 0; t < len; ++t, v += Dh) o0 = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(v), o0);
        _mm256_storeu_ps(o + j, _mm256_mul_ps(o0, inv));
    }
}
#endif

struct AttnCtx {
    const Plan* P;
    const float *q, *K, *Vc;  // this layer's caches, row 0
    float* out;
    float* scores;            // [H, max_len]
    int64_t len;
    int isa;
};

// Query heads [h0, h1): softmax(q·kᵀ·scale) over positions 0..len−1 of the head's kv head, times V.
void attn_heads(void* ctx, int64_t h0, int64_t h1) {
    const AttnCtx& c = *static_cast<const AttnCtx*>(ctx);
    const Plan& P = *c.P;
    const int64_t Dh = P.Dh, G = P.H / P.KV;
    for (int64_t h = h0; h < h1; ++h) {
        const float *qh = c.q + h * Dh, *K = c.K + (h / G) * P.head_stride, *V = c.Vc + (h / G) * P.head_stride;
        float *s = c.scores + h * P.max_len, *o = c.out + h * Dh;
#ifdef LMP_X86
        if (c.isa >= ISA_AVX2 && Dh % 8 == 0) {
            attn_head_avx2(qh, K, V, c.len, Dh, P.scale, s, o);
            continue;
        }
#endif
        attn_head_scalar(qh, K, V, c.len, Dh, P.scale, s, o);
    }
}

void step(Plan& P, int64_t token, int64_t pos, float* logits, int isa, int threads) {
    const int64_t D = P.D, Dh = P.Dh, H = P.H, KV = P.KV;
    float *x = P.x.data(), *h = P.h.data(), *q = P.q.data(), *k = P.k.data(), *v = P.v.data();
    float *att = P.att.data(), *g = P.gate.data(), *u = P.up.data(), *t = P.tmp.data();
    std::optional<Clock> clk;
    if (P.profile) clk.emplace(Clock{P});
    Clock* c = clk ? &*clk : nullptr;
    auto lap = [c](int phase) {
        if (c) c->lap(phase);
    };
    std::memcpy(x, P.embed + token * D, D * sizeof(float));
    const float *cos = P.cos + pos * Dh, *sin = P.sin + pos * Dh;
    for (size_t i = 0; i < P.layers.size(); ++i) {
        const Layer& L = P.layers[i];
        rmsnorm(x, L.attn_norm, h, D, P.eps, isa);
        lap(PH_NORM);
        linears(P, h, {{&L.q, q}, {&L.k, k}, {&L.v, v}}, isa, threads, c);
        lap(PH_QKV);
        rope(q, H, Dh, cos, sin);
        rope(k, KV, Dh, cos, sin);
        float *K = P.kc + i * P.layer_stride, *V = P.vc + i * P.layer_stride;
        for (int64_t j = 0; j < KV; ++j) {
            std::memcpy(K + j * P.head_stride + pos * Dh, k + j * Dh, Dh * sizeof(float));
            std::memcpy(V + j * P.head_stride + pos * Dh, v + j * Dh, Dh * sizeof(float));
        }
        lap(PH_ROPE);
        AttnCtx ac{&P, q, K, V, att, P.scores.data(), pos + 1, isa};
        // one head's work is (pos + 1)·Dh·4 flops: split across threads only when that pays for the hand-off; in
        // contiguous runs of heads, so that a thread keeps reading the same kv heads' cache from token to token
        const int at = (pos + 1) * Dh * H >= (1 << 14) ? threads : 1;
        parallel_for(H, thread_chunk(H, at, 1), at, attn_heads, &ac);
        lap(PH_ATTN);
        linears(P, att, {{&L.o, t}}, isa, threads, c);
        lap(PH_O);
        for (int64_t j = 0; j < D; ++j) x[j] += t[j];
        rmsnorm(x, L.mlp_norm, h, D, P.eps, isa);
        lap(PH_NORM);
        linears(P, h, {{&L.gate, g}, {&L.up, u}}, isa, threads, c);
        lap(PH_GATEUP);
        const int64_t F = L.gate.O;
        silu_mul(g, u, F, isa);  // silu(gate)·up
        lap(PH_SILU);
        linears(P, g, {{&L.down, t}}, isa, threads, c);
        lap(PH_DOWN);
        for (int64_t j = 0; j < D; ++j) x[j] += t[j];
    }
    rmsnorm(x, P.final_norm, h, D, P.eps, isa);
    lap(PH_NORM);
    linears(P, h, {{&P.head, logits}}, isa, threads, c);
    lap(PH_HEAD);
}

// ---- Python glue ----------------------------------------------------------------------------------------------

template <typename T>
T* addr(unsigned long long v) { return reinterpret_cast<T*>(static_cast<uintptr_t>(v)); }

// A linear layer from its Python tuple (lmpress.kernels.decode_linear): (kind, I, O, weight, row_bytes, bits,
// w_unsigned, scales, zeros, scales_f16, group, bias, act, mode, in_scale, in_zero).
bool parse_lin(PyObject* t, Lin& L) {
    unsigned long long w, scales, zeros, bias;
    long long I, O, row_bytes, group;
    int kind, bits, w_unsigned, sf16, act, mode, in_zero;
    double in_scale;
    if (!PyArg_ParseTuple(t, "iLLKLiiKKiLKiidi", &kind, &I, &O, &w, &row_bytes, &bits, &w_unsigned, &scales, &zeros,
                          &sf16, &group, &bias, &act, &mode, &in_scale, &in_zero))
        return false;
    L.kind = kind, L.I = I, L.O = O, L.bias = bias ? addr<const float>(bias) : nullptr;
    if (I <= 0 || O <= 0 || !w || kind < LIN_Q || kind > LIN_LOW) {
        PyErr_SetString(PyExc_ValueError, "lmpress decode plan: bad linear layer descriptor");
        return false;
    }
    if (kind == LIN_F32) {
        L.w = addr<const float>(w);
        return true;
    }
    if (kind == LIN_LOW) {
        LowBit& q = L.lb;
        q.I = I, q.O = O, q.w = addr<const uint8_t>(w), q.row_bytes = row_bytes, q.bits = bits;
        q.scales = addr<const void>(scales), q.zeros = zeros ? addr<const void>(zeros) : nullptr, q.bias = L.bias;
        q.ng = group > 0 && group < I ? (I + group - 1) / group : 1;
        q.group = q.ng == 1 ? I : group;
        if ((bits != 2 && bits != 3) || (q.ng > 1 && q.group % 8) || !sf16) {
            PyErr_SetString(PyExc_ValueError, "lmpress decode plan: lowbit layers take bits 2 or 3, fp16 scales");
            return false;
        }
        return true;
    }
    Problem& p = L.p;
    p.M = 1, p.I = I, p.O = O, p.nblk = (I + BLK - 1) / BLK, p.w = addr<const uint8_t>(w), p.bias = L.bias;
    if (kind == LIN_W8A8) {
        p.bits = 8, p.act = ACT_Q8T, p.ng = 1, p.group = I, p.row_bytes = I, p.w_unsigned = false;
        p.scales = addr<const void>(scales), p.sf16 = false;
        L.mode = mode, L.in_scale = in_scale, L.in_zero = in_zero;
        if (mode != 0 && mode != 2) {
            PyErr_SetString(PyExc_ValueError, "lmpress decode plan: w8a8 mode must be 0 (dynamic) or 2 (static)");
            return false;
        }
        return true;
    }
    p.bits = bits, p.act = act, p.row_bytes = row_bytes, p.w_unsigned = w_unsigned != 0;
    p.ng = group > 0 && group < I ? (I + group - 1) / group : 1;
    p.group = p.ng == 1 ? I : group;
    p.scales = addr<const void>(scales), p.zeros = zeros ? addr<const void>(zeros) : nullptr, p.sf16 = sf16 != 0;
    if ((bits != 4 && bits != 8) || (act != ACT_F32 && act != ACT_Q8) || (p.ng > 1 && p.group % BLK)) {
        PyErr_SetString(PyExc_ValueError, "lmpress decode plan: unsupported bits, activation mode or group size");
        return false;
    }
    if (wants_tiles(p)) {
        L.tiles.resize(p.O / 8 * p.ng * 16);
        tile_params(p, L.tiles.data());
        p.tiles = L.tiles.data();
    }
    return true;
}

void free_plan(PyObject* cap) { delete static_cast<Plan*>(PyCapsule_GetPointer(cap, "lmpress.decode_plan")); }

bool bad(const char* msg) {
    PyErr_SetString(PyExc_ValueError, msg);
    return false;
}

// Shapes of a block's layers against the model's dims (a wrong plan would read past buffers).
bool check_layer(const Plan& P, const Layer& L) {
    const int64_t D = P.D, HD = P.H * P.Dh, KD = P.KV * P.Dh, F = L.gate.O;
    if (L.q.I != D || L.k.I != D || L.v.I != D || L.q.O != HD || L.k.O != KD || L.v.O != KD)
        return bad("lmpress decode plan: q/k/v shapes disagree with the model's dims");
    if (L.o.I != HD || L.o.O != D || L.gate.I != D || L.up.I != D || L.up.O != F || L.down.I != F || L.down.O != D)
        return bad("lmpress decode plan: o/gate/up/down shapes disagree with the model's dims");
    return true;
}

}  // namespace

PyObject* py_decode_plan(PyObject*, PyObject* args) {
    long long D, H, KV, Dh, vocab_rows, max_len, layer_stride, head_stride;
    double eps, scale;
    unsigned long long embed, final_norm, cos, sin, kc, vc;
    PyObject *head, *layers;
    if (!PyArg_ParseTuple(args, "LLLLLLddKKKKKKLLOO", &D, &H, &KV, &Dh, &vocab_rows, &max_len, &eps, &scale, &embed,
                          &final_norm, &cos, &sin, &kc, &vc, &layer_stride, &head_stride, &head, &layers))
        return nullptr;
    if (!PyList_Check(layers) || D <= 0 || H <= 0 || KV <= 0 || H % KV || Dh <= 0 || Dh % 2 || max_len <= 0) {
        PyErr_SetString(PyExc_ValueError, "lmpress decode plan: bad model dims or layer list");
        return nullptr;
    }
    std::unique_ptr<Plan> P(new Plan);
    P->D = D, P->H = H, P->KV = KV, P->Dh = Dh, P->vocab_rows = vocab_rows, P->max_len = max_len;
    P->eps = static_cast<float>(eps), P->scale = static_cast<float>(scale);
    P->embed = addr<const float>(embed), P->final_norm = addr<const float>(final_norm);
    P->cos = addr<const float>(cos), P->sin = addr<const float>(sin);
    P->kc = addr<float>(kc), P->vc = addr<float>(vc), P->layer_stride = layer_stride, P->head_stride = head_stride;
    if (!parse_lin(head, P->head)) return nullptr;
    if (P->head.I != D) return PyErr_Format(PyExc_ValueError, "lmpress decode plan: head takes %lld inputs", P->head.I);
    P->V = P->head.O;
    int64_t F = 0;
    const Py_ssize_t n = PyList_GET_SIZE(layers);
    P->layers.resize(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
        Layer& L = P->layers[i];
        unsigned long long an, mn;
        PyObject *q, *k, *v, *o, *g, *u, *d;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(layers, i), "KKOOOOOOO", &an, &mn, &q, &k, &v, &o, &g, &u, &d))
            return nullptr;
        L.attn_norm = addr<const float>(an), L.mlp_norm = addr<const float>(mn);
        if (!parse_lin(q, L.q) || !parse_lin(k, L.k) || !parse_lin(v, L.v) || !parse_lin(o, L.o) ||
            !parse_lin(g, L.gate) || !parse_lin(u, L.up) || !parse_lin(d, L.down) || !check_layer(*P, L))
            return nullptr;
        F = std::max(F, L.gate.O);
    }
    P->F = F;
    P->x.resize(D), P->h.resize(D), P->tmp.resize(D), P->q.resize(H * Dh), P->att.resize(H * Dh);
    P->k.resize(KV * Dh), P->v.resize(KV * Dh), P->gate.resize(F), P->up.resize(F);
    P->scores.resize(H * max_len);
    PyObject* cap = PyCapsule_New(P.get(), "lmpress.decode_plan", free_plan);
    if (cap) P.release();
    return cap;
}

// linear_f32(x, M, I, w, O, bias, y, isa, threads): y [M, O] = x [M, I] · w [O, I]ᵀ + bias (0: none), float32
PyObject* py_linear_f32(PyObject*, PyObject* args) {
    unsigned long long x, w, bias, y;
    long long M, I, O;
    int isa, threads;
    if (!PyArg_ParseTuple(args, "KLLKLKKii", &x, &M, &I, &w, &O, &bias, &y, &isa, &threads)) return nullptr;
    if (M < 0 || I <= 0 || O < 0) return PyErr_Format(PyExc_ValueError, "lmpress linear_f32: bad shape");
    GemmF32 g{addr<const float>(x), addr<const float>(w), bias ? addr<const float>(bias) : nullptr, addr<float>(y),
              M, I, O, clamp_isa(isa)};
    Py_BEGIN_ALLOW_THREADS
    const int t = std::max(threads, 1);
    parallel_for(O, thread_chunk(O, t, 2), t, gemm_f32_rows, &g);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_decode_step(PyObject*, PyObject* args) {
    PyObject* cap;
    long long token, pos;
    unsigned long long logits;
    int isa, threads;
    if (!PyArg_ParseTuple(args, "OLLKii", &cap, &token, &pos, &logits, &isa, &threads)) return nullptr;
    Plan* P = static_cast<Plan*>(PyCapsule_GetPointer(cap, "lmpress.decode_plan"));
    if (!P) return nullptr;
    if (token < 0 || token >= P->vocab_rows || pos < 0 || pos >= P->max_len)
        return PyErr_Format(PyExc_ValueError, "lmpress decode_step: token %lld or position %lld out of range", token,
                            pos);
    Py_BEGIN_ALLOW_THREADS
    std::lock_guard<std::mutex> lk(P->mu);
    step(*P, token, pos, addr<float>(logits), clamp_isa(isa), std::max(threads, 1));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// decode_profile(plan, on) -> tuple of seconds per phase (norm, prepare, qkv, rope, attn, o, gateup, silu, down,
// head) accumulated since the last call; `on` switches the timing for the steps that follow.
PyObject* py_decode_profile(PyObject*, PyObject* args) {
    PyObject* cap;
    int on;
    if (!PyArg_ParseTuple(args, "Op", &cap, &on)) return nullptr;
    Plan* P = static_cast<Plan*>(PyCapsule_GetPointer(cap, "lmpress.decode_plan"));
    if (!P) return nullptr;
    std::lock_guard<std::mutex> lk(P->mu);
    PyObject* out = PyTuple_New(PH_N);
    if (!out) return nullptr;
    for (int i = 0; i < PH_N; ++i) {
        PyTuple_SET_ITEM(out, i, PyFloat_FromDouble(P->prof[i]));
        P->prof[i] = 0.0;
    }
    P->profile = on != 0;
    return out;
}

}  // namespace lmp
