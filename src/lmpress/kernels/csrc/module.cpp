// CPython glue for the lmpress kernels: raw buffer addresses in (no libtorch), the GIL released around the work.
//
//   isa() -> int                      best instruction path of this CPU: 0 scalar, 1 AVX2+FMA+F16C, 2 + AVX512-VNNI
//   linear(...)                       weight-only int4/int8, activations fp32 or int8 per block of 32 (see kernels.h)
//   tile_params(...)                  scales and zeros regrouped per tile of 8 rows for linear (Problem::tiles)
//   w8a8(...)                         int8 weights × uint8 activations on one per-tensor grid, the arithmetic of
//                                     PyTorch's fbgemm dynamic/static quantized linear (nn/int8_dynamic.py)
//   lowbit(...)                       weight-only int2/int3 (PackedLinear codes), activations fp32 (lowbit.cpp)
//   dequant(...)                      packed codes of any width 2..8 → float32 [O, I], bit for bit
//                                     quant.primitives.dequantize (dequant.cpp)
//   decode_plan(...), decode_step(...) one whole decode step of a Llama-family model in one call (decode.cpp)
// Argument checking (shapes, dtypes, contiguity) is the Python wrapper's job (lmpress/kernels/__init__.py).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace lmp {
namespace {

int detect_isa() {
#ifdef LMP_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return ISA_SCALAR;
    // F16C comes with every AVX2 CPU made; VNNI on 256-bit registers needs AVX512VL as well
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
        return ISA_VNNI;
    return ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

void run_rows(void* ctx, int64_t o0, int64_t o1) {
    const auto& w = *static_cast<const std::pair<const Problem*, int>*>(ctx);
    rows(*w.first, w.second, o0, o1);
}

void run(const Problem& p, int isa, int threads) {
    std::pair<const Problem*, int> w{&p, isa};
    parallel_for(p.O, thread_chunk(p.O, threads, 8), threads, run_rows, &w);  // whole tiles of 8 rows (Problem::tiles)
}

// Scratch for the prepared activations and per-call Problem::tiles, reused across calls of one Python thread.
thread_local Acts scratch;
thread_local std::vector<uint16_t> tiles_scratch;

// ATen's quant_utils::ChooseQuantizationParams(min, max, 0, qmax, preserve_sparsity=false, pow2=false), as
// transcribed in nn/int8_dynamic.py kernel_qparams: double arithmetic, float32 roundings where ATen has them.
void choose_qparams(double x_min, double x_max, double qmax, float& scale_out, int& zp_out) {
    const double qmin = 0.0;
    double lo = std::min(x_min, 0.0), hi = std::max(x_max, 0.0);
    double scale = (hi - lo) / (qmax - qmin);
    if (static_cast<float>(scale) == 0.f || std::isinf(static_cast<float>(1.0 / static_cast<float>(scale)))) scale = 0.1;
    const double small = static_cast<float>(6.1e-5);
    if (scale < small) {
        const double org = scale;
        scale = small;
        if (lo == 0.0) hi = static_cast<float>(small * (qmax - qmin));
        else if (hi == 0.0) lo = static_cast<float>(-small * (qmax - qmin));
        else {
            const double amp = static_cast<float>(small / static_cast<float>(org));
            lo = static_cast<float>(lo * amp);
            hi = static_cast<float>(hi * amp);
        }
    }
    const double zp_min = qmin - lo / scale, zp_max = qmax - hi / scale;
    const double err_min = std::fabs(qmin) - std::fabs(lo / scale), err_max = std::fabs(qmax) - std::fabs(hi / scale);
    const double zp0 = err_min < err_max ? zp_min : zp_max;
    zp_out = zp0 < qmin ? int(qmin) : zp0 > qmax ? int(qmax) : int(std::nearbyint(zp0));
    scale_out = static_cast<float>(scale);
}

}  // namespace

int clamp_isa(int want) {
    static const int best = detect_isa();
    return want < 0 || want > best ? best : want;
}

void rows(const Problem& p, int isa, int64_t o0, int64_t o1) {
#ifdef LMP_X86
    if (isa == ISA_VNNI) return rows_vnni(p, o0, o1);
    if (isa == ISA_AVX2) return rows_avx2(p, o0, o1);
#endif
    (void)isa;
    rows_scalar(p, o0, o1);
}

void tile_params(const Problem& p, uint16_t* out) {
    const auto* sc = static_cast<const uint16_t*>(p.scales);
    const auto* zp = static_cast<const uint16_t*>(p.zeros);
    for (int64_t g = 0; g < p.ng; ++g)  // reading each group's run of O values in order
        for (int64_t t = 0; t < p.O / 8; ++t) {
            uint16_t* d = out + (t * p.ng + g) * 16;
            std::memcpy(d, sc + g * p.O + t * 8, 16);
            if (zp) std::memcpy(d + 8, zp + g * p.O + t * 8, 16);
            else std::memset(d + 8, 0, 16);
        }
}

// x [M, I] → the prepared activations of kernels.h for weight-only layers.
void prepare(Problem& p, const float* x, int isa, Acts& s) {
    const int64_t P = p.nblk * BLK, gcols = p.ng == 1 ? p.I : p.group;
    const bool perm = p.bits == 4;
    auto at = [&](int64_t c) { return (c & ~int64_t(BLK - 1)) + (perm ? perm4(int(c & (BLK - 1))) : (c & (BLK - 1))); };
    if (p.act == ACT_F32) {
        s.xsum.assign(p.M * p.ng, 0.f);
        s.xf.assign(p.M * P, 0.f);
        for (int64_t m = 0; m < p.M; ++m)
            for (int64_t c = 0; c < p.I; ++c) {
                const float v = x[m * p.I + c];
                s.xf[m * P + at(c)] = v;
                s.xsum[m * p.ng + c / gcols] += v;
            }
        p.xf = s.xf.data();
    } else {  // ACT_Q8: symmetric int8 per block of 32, d = max|x| / 127
        const int64_t units = q8_units(p.bits, p.nblk);
        p.xq_stride = p.bits == 4 ? units * 64 : P;
        if (s.xq.size() < size_t(p.M * p.xq_stride)) s.xq.resize(p.M * p.xq_stride);
        if (s.xd.size() < size_t(p.M * p.nblk)) s.xd.resize(p.M * p.nblk);
        if (s.xdv.size() < size_t(p.M * units * 8)) s.xdv.resize(p.M * units * 8);
        if (s.xc.size() < size_t(p.M * p.nblk)) s.xc.resize(p.M * p.nblk);
        if (s.xsum.size() < size_t(p.M * p.ng)) s.xsum.resize(p.M * p.ng);
#ifdef LMP_X86
        if (isa >= ISA_AVX2) quantize_q8_avx2(p, x, s.xq.data(), s.xd.data(), s.xdv.data(), s.xc.data(), s.xsum.data());
        else
#endif
            quantize_q8_scalar(p, x, s.xq.data(), s.xd.data(), s.xdv.data(), s.xc.data(), s.xsum.data());
        p.xq = s.xq.data();
        p.xd = s.xd.data();
        p.xdv = s.xdv.data();
        p.xc = s.xc.data();
    }
    p.xsum = s.xsum.data();
}


void prepare_w8a8(Problem& p, const float* xin, int mode, double in_scale, int in_zero, Acts& s, std::vector<float>& r) {
    const int64_t M = p.M, I = p.I, P = p.nblk * BLK;
    const float* xs = xin;
    if (mode == 1) {  // per-token divisors
        r.assign(M, 0.f);
        s.xs.resize(M * I);
        for (int64_t m = 0; m < M; ++m) {
            float a = 0.f;
            for (int64_t c = 0; c < I; ++c) a = std::max(a, std::fabs(xin[m * I + c]));
            r[m] = std::max(a, 1e-30f);
            for (int64_t c = 0; c < I; ++c) s.xs[m * I + c] = xin[m * I + c] / r[m];
        }
        xs = s.xs.data();
    }
    float scale;
    int zp;
    if (mode == 2) scale = static_cast<float>(in_scale), zp = in_zero;
    else {
        float lo = M > 0 && I > 0 ? xs[0] : 0.f, hi = lo;
        for (int64_t i = 0; i < M * I; ++i) lo = std::min(lo, xs[i]), hi = std::max(hi, xs[i]);
        choose_qparams(lo, hi, 127.0, scale, zp);
    }
    // quantize as fbgemm: fma(x, 1/scale, zp) in float32, ties to even, saturate; the kernel takes code − zp
    const double inv = 1.0f / scale;
    const int top = mode == 2 ? 127 : 255;
    s.xq.assign(M * P, 0);
    s.xd.assign(M, scale);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < I; ++c) {
            const float t = static_cast<float>(static_cast<double>(xs[m * I + c]) * inv + zp);
            const int q = std::min(std::max(static_cast<int>(std::nearbyintf(t)), 0), top) - zp;
            s.xq[m * P + c] = static_cast<int8_t>(std::min(std::max(q, -128), 127));
        }
    p.xq = s.xq.data(), p.xd = s.xd.data(), p.xq_stride = P;
}

// decode.cpp
PyObject* py_decode_plan(PyObject*, PyObject* args);
PyObject* py_decode_step(PyObject*, PyObject* args);
PyObject* py_decode_profile(PyObject*, PyObject* args);
PyObject* py_linear_f32(PyObject*, PyObject* args);

namespace {

template <typename T>
T* ptr(unsigned long long v) { return reinterpret_cast<T*>(static_cast<uintptr_t>(v)); }

PyObject* py_isa(PyObject*, PyObject*) { return PyLong_FromLong(clamp_isa(-1)); }

// tiles (optional, 0 for none): Problem::tiles of these scales and zeros (tile_params), which a caller may keep
// across calls; without it one activation row on several fp16 groups regroups them here first.
PyObject* py_linear(PyObject*, PyObject* args) {
    unsigned long long x, w, scales, zeros, bias, y, tiles = 0;
    long long M, I, O, row_bytes, group;
    int bits, w_unsigned, sf16, act, isa, threads;
    if (!PyArg_ParseTuple(args, "KLLKLLiiKKiLKKiii|K", &x, &M, &I, &w, &row_bytes, &O, &bits, &w_unsigned, &scales,
                          &zeros, &sf16, &group, &bias, &y, &act, &isa, &threads, &tiles))
        return nullptr;
    Problem p{};
    p.M = M, p.I = I, p.O = O, p.bits = bits, p.act = act;
    p.ng = group > 0 && group < I ? (I + group - 1) / group : 1;
    p.group = p.ng == 1 ? I : group;
    p.nblk = (I + BLK - 1) / BLK;
    p.w = ptr<const uint8_t>(w), p.row_bytes = row_bytes, p.w_unsigned = w_unsigned != 0;
    p.scales = ptr<const void>(scales), p.zeros = zeros ? ptr<const void>(zeros) : nullptr, p.sf16 = sf16 != 0;
    p.bias = bias ? ptr<const float>(bias) : nullptr, p.y = ptr<float>(y);
    if ((bits != 4 && bits != 8) || (act != ACT_F32 && act != ACT_Q8) || (p.ng > 1 && p.group % BLK)) {
        PyErr_SetString(PyExc_ValueError, "lmpress kernels: unsupported bits, activation mode or group size");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    const int use = clamp_isa(isa);
    if (p.M == 1 && wants_tiles(p) && use > ISA_SCALAR) {
        if (!tiles) {
            tiles_scratch.resize(p.O / 8 * p.ng * 16);
            tile_params(p, tiles_scratch.data());
        }
        p.tiles = tiles ? ptr<const uint16_t>(tiles) : tiles_scratch.data();
    }
    prepare(p, ptr<const float>(x), use, scratch);
    run(p, use, std::max(threads, 1));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

void lowbit_run(void* ctx, int64_t o0, int64_t o1) {
    const auto& w = *static_cast<const std::pair<const LowBit*, int>*>(ctx);
    lowbit_rows(*w.first, w.second, o0, o1);
}

PyObject* py_lowbit(PyObject*, PyObject* args) {
    unsigned long long x, w, scales, zeros, bias, y;
    long long M, I, O, row_bytes, group;
    int bits, isa, threads;
    if (!PyArg_ParseTuple(args, "KLLKLLiKKLKKii", &x, &M, &I, &w, &row_bytes, &O, &bits, &scales, &zeros, &group,
                          &bias, &y, &isa, &threads))
        return nullptr;
    LowBit p{};
    p.x = ptr<const float>(x), p.M = M, p.I = I, p.O = O, p.w = ptr<const uint8_t>(w), p.row_bytes = row_bytes;
    p.bits = bits, p.scales = ptr<const void>(scales), p.zeros = zeros ? ptr<const void>(zeros) : nullptr;
    p.ng = group > 0 && group < I ? (I + group - 1) / group : 1;
    p.group = p.ng == 1 ? I : group;
    p.bias = bias ? ptr<const float>(bias) : nullptr, p.y = ptr<float>(y);
    if ((bits != 2 && bits != 3) || (p.ng > 1 && p.group % 8) || I <= 0 || M < 0 || O < 0) {
        PyErr_SetString(PyExc_ValueError, "lmpress kernels: lowbit takes bits 2 or 3 and groups of a multiple of 8");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    std::pair<const LowBit*, int> ctx{&p, clamp_isa(isa)};
    const int t = std::max(threads, 1);
    parallel_for(O, thread_chunk(O, t, 4), t, lowbit_run, &ctx);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_tile_params(PyObject*, PyObject* args) {
    unsigned long long scales, zeros, out;
    long long ng, O;
    if (!PyArg_ParseTuple(args, "KKLLK", &scales, &zeros, &ng, &O, &out)) return nullptr;
    Problem p{};
    p.scales = ptr<const void>(scales), p.zeros = zeros ? ptr<const void>(zeros) : nullptr, p.ng = ng, p.O = O;
    Py_BEGIN_ALLOW_THREADS
    tile_params(p, ptr<uint16_t>(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// mode 0: dynamic, one grid for the whole input; 1: dynamic per token (each row divided by its max |x| first,
// the output scaled back: nn/int8_dynamic.py's wrapper); 2: static grid (in_scale, in_zero) given.
PyObject* py_w8a8(PyObject*, PyObject* args) {
    unsigned long long x, w, scales, bias, y;
    long long M, I, O;
    int mode, in_zero, isa, threads;
    double in_scale;
    if (!PyArg_ParseTuple(args, "KLLKLKKKidiii", &x, &M, &I, &w, &O, &scales, &bias, &y, &mode, &in_scale, &in_zero,
                          &isa, &threads))
        return nullptr;
    Problem p{};
    p.M = M, p.I = I, p.O = O, p.bits = 8, p.act = ACT_Q8T, p.ng = 1, p.group = I, p.nblk = (I + BLK - 1) / BLK;
    p.w = ptr<const uint8_t>(w), p.row_bytes = I, p.w_unsigned = false;
    p.scales = ptr<const void>(scales), p.sf16 = false;
    p.bias = bias ? ptr<const float>(bias) : nullptr, p.y = ptr<float>(y);
    Py_BEGIN_ALLOW_THREADS
    std::vector<float> r;  // per-token divisors (mode 1)
    prepare_w8a8(p, ptr<const float>(x), mode, in_scale, in_zero, scratch, r);
    run(p, clamp_isa(isa), std::max(threads, 1));
    if (mode == 1)  // y = W·(x/r) + b → (y − b)·r + b, float32 steps as the Python wrapper
        for (int64_t m = 0; m < M; ++m)
            for (int64_t o = 0; o < O; ++o) {
                const float b = p.bias ? p.bias[o] : 0.f;
                float& v = p.y[m * O + o];
                v = p.bias ? (v - b) * r[m] + b : v * r[m];
            }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_dequant(PyObject*, PyObject* args) {
    unsigned long long w, scales, zeros, out;
    long long O, I, row_bytes, group;
    int bits, sf16, isa, threads;
    if (!PyArg_ParseTuple(args, "KLLLiKKiLKii", &w, &row_bytes, &O, &I, &bits, &scales, &zeros, &sf16, &group, &out,
                          &isa, &threads))
        return nullptr;
    if (bits < 2 || bits > 8 || O < 0 || I < 0) {
        PyErr_SetString(PyExc_ValueError, "lmpress kernels: dequant takes bits 2..8 and non-negative shapes");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    dequantize(ptr<const uint8_t>(w), row_bytes, O, I, bits, ptr<const void>(scales),
               zeros ? ptr<const void>(zeros) : nullptr, sf16 != 0, group, ptr<float>(out), clamp_isa(isa),
               std::max(threads, 1));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"isa", py_isa, METH_NOARGS, "best instruction path: 0 scalar, 1 AVX2, 2 AVX2 + AVX512-VNNI"},
    {"linear", py_linear, METH_VARARGS, "weight-only int4/int8 linear on raw buffers (see lmpress.kernels)"},
    {"lowbit", py_lowbit, METH_VARARGS, "weight-only int2/int3 linear on raw buffers (see lmpress.kernels)"},
    {"tile_params", py_tile_params, METH_VARARGS, "fp16 scales and zeros [ng, O] regrouped per tile of 8 rows"},
    {"dequant", py_dequant, METH_VARARGS, "packed codes (bits 2..8) to a float32 weight on raw buffers"},
    {"w8a8", py_w8a8, METH_VARARGS, "fbgemm-compatible int8 linear on raw buffers (see lmpress.kernels)"},
    {"linear_f32", py_linear_f32, METH_VARARGS, "float32 linear of a few rows on raw buffers (see lmpress.kernels)"},
    {"decode_plan", py_decode_plan, METH_VARARGS, "a Llama-family model's fused decode plan (see lmpress.kernels)"},
    {"decode_step", py_decode_step, METH_VARARGS, "one fused decode step of one token (see lmpress.kernels)"},
    {"decode_profile", py_decode_profile, METH_VARARGS, "seconds per phase of the fused steps since the last call"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "lmpress native kernels", -1, methods};

}  // namespace
}  // namespace lmp

PyMODINIT_FUNC PyInit__native() { return PyModule_Create(&lmp::module); }
