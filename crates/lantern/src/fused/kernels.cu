// Fused inference kernels of lantern's transformer blocks (see mod.rs for what each computes
// and cpu.rs for the same algorithms on the CPU). Compiled to PTX by build.rs (`cuda` feature).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float tof(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half fromf<__half>(float x) { return __float2half(x); }

// x rounded to T and back
template <typename T> __device__ __forceinline__ float rnd(float x) { return tof(fromf<T>(x)); }

// Row of HD elements (16-byte aligned) to f32 registers, 16 bytes per load.
template <typename T, int HD> __device__ __forceinline__ void load_row(const T *p, float *r) {
    constexpr int VEC = 16 / sizeof(T);
    const uint4 *p4 = reinterpret_cast<const uint4 *>(p);
#pragma unroll
    for (int i = 0; i < HD / VEC; ++i) {
        const uint4 u = p4[i];
        const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int e = 0; e < VEC; ++e) r[i * VEC + e] = tof(t[e]);
    }
}

// Sum over the block; every thread gets the total. `red` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = l < nw ? red[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// One block per row. h = x (+ res, rounded); y = round(round(h * rsqrt(mean(h^2) + eps)) * w).
// With a residual, out holds [h; y] (h first, rows * cols each), else y.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *res, const T *w, T *out, int rows, int cols,
                             float eps) {
    extern __shared__ float buf[];
    __shared__ float red[32];
    const size_t r0 = (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = tof(x[r0 + i]);
        if (res) {
            const T h = fromf<T>(v + tof(res[r0 + i]));
            out[r0 + i] = h;
            v = tof(h);
        }
        buf[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / cols + eps);
    T *y = out + (res ? (size_t)rows * cols : 0) + r0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        y[i] = fromf<T>(rnd<T>(buf[i] * inv) * tof(w[i]));
}

// gu rows [gate | up] of 2f each -> round(round(silu(gate)) * up)
template <typename T> __device__ void silu_mul(const T *gu, T *out, int rows, int f) {
    const size_t n = (size_t)rows * f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, j = i % f;
        const float g = tof(gu[r * 2 * f + j]);
        const float sg = rnd<T>(g / (1.f + __expf(-g)));
        out[i] = fromf<T>(sg * tof(gu[r * 2 * f + f + j]));
    }
}

// Grid (s, b). Rotates the K heads of qkv [b, s, (h + 2kvh) hd] with the packed table
// rope [rope_rows, s, hd/2, 2] (cos, sin) and writes K and V into the cache
// kv [2, n_layer, b, kvh, max_len, hd] (from element `base`) at slot at + s_i of `layer`.
template <typename T>
__device__ void write_kv(T *kv, size_t base, const T *qkv, const float *rope, int b, int s,
                         int h, int kvh, int hd, int layer, int n_layer, int max_len, int at,
                         int rope_rows) {
    const int si = blockIdx.x, bb = blockIdx.y;
    const int pairs = hd / 2, w = (h + 2 * kvh) * hd;
    const T *src = qkv + ((size_t)bb * s + si) * w;
    const float *cs = rope + ((size_t)(rope_rows == 1 ? 0 : bb) * s + si) * pairs * 2;
    const size_t plane = (size_t)n_layer * b * kvh * max_len * hd;
    for (int i = threadIdx.x; i < kvh * pairs; i += blockDim.x) {
        const int kh = i / pairs, p = i % pairs;
        const size_t o =
            base + ((((size_t)layer * b + bb) * kvh + kh) * max_len + at + si) * hd + 2 * p;
        const float k0 = tof(src[(h + kh) * hd + 2 * p]), k1 = tof(src[(h + kh) * hd + 2 * p + 1]);
        const float c = cs[2 * p], sn = cs[2 * p + 1];
        kv[o] = fromf<T>(k0 * c - k1 * sn);
        kv[o + 1] = fromf<T>(k1 * c + k0 * sn);
        kv[plane + o] = src[(h + kvh + kh) * hd + 2 * p];
        kv[plane + o + 1] = src[(h + kvh + kh) * hd + 2 * p + 1];
    }
}

// Masked attention. Grid (ceil(s / QT), h, b); each block serves QT queries of one head and
// reads each key/value row once for all of them. Queries come from qkv (rotated on load and
// rounded to T like the reference), keys and values from the cache layer; scores, softmax
// and the weighted sum stay in f32. mask: additive f32 (element [bb * mask_b + q * mask_s + j],
// -inf hides a key) or null; causal_past >= 0 hides keys j > causal_past + q.
// Shared memory: scores [QT][keys], queries [QT][HD], partial sums [warps][QT][HD].
template <typename T, int HD, int QT>
__device__ void attention(const T *qkv, const float *rope, const T *kv, size_t base,
                          const float *mask, T *out, int b, int s, int h, int kvh, int layer,
                          int n_layer, int max_len, int keys, int rope_rows, long long mask_b,
                          long long mask_s, int causal_past) {
    extern __shared__ float sm[];
    float *sc = sm;                      // [QT][keys]
    float *qs = sc + (size_t)QT * keys;  // [QT][HD]
    float *part = qs + QT * HD;          // [warps][QT][HD]
    __shared__ float inv_sum[QT];
    const int tile = blockIdx.x, hh = blockIdx.y, bb = blockIdx.z;
    const int q0 = tile * QT, nq = min(QT, s - q0);
    const int w = (h + 2 * kvh) * HD, pairs = HD / 2, kh = hh / (h / kvh);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const float scale = rsqrtf((float)HD);
    // queries: rotate, round, scale
    for (int i = threadIdx.x; i < QT * pairs; i += blockDim.x) {
        const int qq = i / pairs, p = i % pairs;
        float o0 = 0.f, o1 = 0.f;
        if (qq < nq) {
            const int si = q0 + qq;
            const T *src = qkv + ((size_t)bb * s + si) * w + hh * HD;
            const float *cs = rope + ((size_t)(rope_rows == 1 ? 0 : bb) * s + si) * pairs * 2;
            const float x0 = tof(src[2 * p]), x1 = tof(src[2 * p + 1]);
            o0 = rnd<T>(x0 * cs[2 * p] - x1 * cs[2 * p + 1]) * scale;
            o1 = rnd<T>(x1 * cs[2 * p] + x0 * cs[2 * p + 1]) * scale;
        }
        qs[qq * HD + 2 * p] = o0;
        qs[qq * HD + 2 * p + 1] = o1;
    }
    __syncthreads();
    const size_t head = base + (((size_t)layer * b + bb) * kvh + kh) * max_len * HD;
    const size_t plane = (size_t)n_layer * b * kvh * max_len * HD;
    const T *kp = kv + head, *vp = kv + plane + head;
    // scores: one key row per thread, reused for the tile's queries
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        float m[QT];
        bool any = false;
        for (int qq = 0; qq < QT; ++qq) {
            float mv = 0.f;
            bool vis = qq < nq;
            if (vis && mask) {
                mv = mask[bb * mask_b + (q0 + qq) * mask_s + j];
                vis = !(isinf(mv) && mv < 0.f);
            }
            if (vis && causal_past >= 0 && j > causal_past + q0 + qq) vis = false;
            m[qq] = vis ? mv : -INFINITY;
            any |= vis;
        }
        if (!any) {
            for (int qq = 0; qq < QT; ++qq) sc[qq * keys + j] = -INFINITY;
            continue;
        }
        float kr[HD];
        load_row<T, HD>(kp + (size_t)j * HD, kr);
        for (int qq = 0; qq < QT; ++qq) {
            float acc = -INFINITY;
            if (m[qq] != -INFINITY) {
                acc = 0.f;
#pragma unroll
                for (int e = 0; e < HD; ++e) acc += qs[qq * HD + e] * kr[e];
                acc += m[qq];
            }
            sc[qq * keys + j] = acc;
        }
    }
    __syncthreads();
    // softmax per query row (one warp per row), probabilities left unnormalised
    for (int qq = warp; qq < QT; qq += nw) {
        float mx = -INFINITY;
        for (int j = lane; j < keys; j += 32) mx = fmaxf(mx, sc[qq * keys + j]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
        float sum = 0.f;
        for (int j = lane; j < keys; j += 32) {
            const float v = sc[qq * keys + j];
            const float e = (v == -INFINITY) ? 0.f : __expf(v - mx);
            sc[qq * keys + j] = e;
            sum += e;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
        if (lane == 0) inv_sum[qq] = sum > 0.f ? 1.f / sum : 0.f;
    }
    __syncthreads();
    // weighted values: a key row is read by LPK lanes, 16 bytes each, so a warp covers KPW
    // keys per load and keeps UNR loads in flight; partial sums meet in shared memory
    constexpr int VEC = 16 / sizeof(T), LPK = HD / VEC, KPW = 32 / LPK, UNR = 4;
    const int sub = lane / LPK, col = (lane % LPK) * VEC;
    float acc[QT][VEC];
#pragma unroll
    for (int qq = 0; qq < QT; ++qq)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[qq][e] = 0.f;
    const int stride = nw * KPW;
    for (int j0 = warp * KPW + sub; j0 < keys; j0 += UNR * stride) {
        uint4 u[UNR];
        float p[UNR][QT];
#pragma unroll
        for (int r = 0; r < UNR; ++r) {
            const int j = j0 + r * stride;
            bool any = false;
#pragma unroll
            for (int qq = 0; qq < QT; ++qq) {
                p[r][qq] = j < keys ? sc[qq * keys + j] : 0.f;
                any |= p[r][qq] != 0.f;
            }
            u[r] = any ? *reinterpret_cast<const uint4 *>(vp + (size_t)j * HD + col)
                       : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int r = 0; r < UNR; ++r) {
            const T *t = reinterpret_cast<const T *>(&u[r]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float v = tof(t[e]);
#pragma unroll
                for (int qq = 0; qq < QT; ++qq) acc[qq][e] += p[r][qq] * v;
            }
        }
    }
    // lanes with the same columns hold different keys: sum them
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1)
#pragma unroll
        for (int qq = 0; qq < QT; ++qq)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[qq][e] += __shfl_xor_sync(0xffffffff, acc[qq][e], o);
    if (sub == 0) {
#pragma unroll
        for (int qq = 0; qq < QT; ++qq)
#pragma unroll
            for (int e = 0; e < VEC; ++e) part[(warp * QT + qq) * HD + col + e] = acc[qq][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nq * HD; i += blockDim.x) {
        const int qq = i / HD, e = i % HD;
        float v = 0.f;
        for (int ww = 0; ww < nw; ++ww) v += part[(ww * QT + qq) * HD + e];
        out[(((size_t)bb * s + q0 + qq) * h + hh) * HD + e] = fromf<T>(v * inv_sum[qq]);
    }
}

#define NORM(T, NAME)                                                                           \
    extern "C" __global__ void NAME(const T *x, const T *res, const T *w, T *out, int rows,    \
                                    int cols, float eps) {                                      \
        add_rms_norm<T>(x, res, w, out, rows, cols, eps);                                       \
    }
#define SILU(T, NAME)                                                                           \
    extern "C" __global__ void NAME(const T *gu, T *out, int rows, int f) {                     \
        silu_mul<T>(gu, out, rows, f);                                                          \
    }
#define WRITE(T, NAME)                                                                          \
    extern "C" __global__ void NAME(T *kv, unsigned long long base, const T *qkv,              \
                                    const float *rope, int b, int s, int h, int kvh, int hd,    \
                                    int layer, int n_layer, int max_len, int at,                \
                                    int rope_rows) {                                            \
        write_kv<T>(kv, base, qkv, rope, b, s, h, kvh, hd, layer, n_layer, max_len, at,         \
                    rope_rows);                                                                 \
    }
#define ATTN(T, HD, QT, NAME)                                                                   \
    extern "C" __global__ void NAME(const T *qkv, const float *rope, const T *kv,              \
                                    unsigned long long base, const float *mask, T *out, int b, \
                                    int s, int h, int kvh, int layer, int n_layer,              \
                                    int max_len, int keys, int rope_rows, long long mask_b,     \
                                    long long mask_s, int causal_past) {                        \
        attention<T, HD, QT>(qkv, rope, kv, base, mask, out, b, s, h, kvh, layer, n_layer,      \
                             max_len, keys, rope_rows, mask_b, mask_s, causal_past);            \
    }
#define ALL(T, SUF)                                                                             \
    NORM(T, rms_norm_##SUF)                                                                     \
    SILU(T, silu_mul_##SUF)                                                                     \
    WRITE(T, write_kv_##SUF)                                                                    \
    ATTN(T, 32, 1, attention_32_1_##SUF)                                                        \
    ATTN(T, 32, 4, attention_32_4_##SUF)                                                        \
    ATTN(T, 32, 8, attention_32_8_##SUF)                                                        \
    ATTN(T, 64, 1, attention_64_1_##SUF)                                                        \
    ATTN(T, 64, 4, attention_64_4_##SUF)                                                        \
    ATTN(T, 64, 8, attention_64_8_##SUF)                                                        \
    ATTN(T, 128, 1, attention_128_1_##SUF)                                                      \
    ATTN(T, 128, 4, attention_128_4_##SUF)                                                      \
    ATTN(T, 128, 8, attention_128_8_##SUF)

ALL(float, f32)
ALL(__nv_bfloat16, bf16)
ALL(__half, f16)

// y = x w^T for a few rows (M <= 8: decode steps), weight-bandwidth bound: one warp per output
// row (or gate/up row pair), 16-byte weight loads, x staged in shared memory as f32.
// Prologue: with norm_w, x rows are first RMS-normalised exactly like add_rms_norm's output.
// Epilogue: mode 0 y = round(acc); mode 1 y = round(res + round(acc)) (residual add);
// mode 2 (SwiGLU, w has 2N rows: gate then up) y = round(round(silu(round(g))) * round(u)).
template <typename T, int M>
__device__ void small_linear(const T *x, const T *w, const T *norm_w, float eps, const T *res,
                             T *y, int K, int N, int mode) {
    extern __shared__ float xs[];  // [M][K]
    __shared__ float red[32];
    for (int i = threadIdx.x; i < M * K; i += blockDim.x) xs[i] = tof(x[i]);
    __syncthreads();
    if (norm_w) {
        for (int m = 0; m < M; ++m) {
            float ss = 0.f;
            for (int k = threadIdx.x; k < K; k += blockDim.x) ss += xs[m * K + k] * xs[m * K + k];
            ss = block_sum(ss, red);
            const float inv = rsqrtf(ss / K + eps);
            for (int k = threadIdx.x; k < K; k += blockDim.x)
                xs[m * K + k] = rnd<T>(rnd<T>(xs[m * K + k] * inv) * tof(norm_w[k]));
        }
        __syncthreads();
    }
    constexpr int VEC = 16 / sizeof(T);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const bool glu = mode == 2;
    for (int n = blockIdx.x * nw + warp; n < N; n += gridDim.x * nw) {
        float acc[M], acc2[M];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = acc2[m] = 0.f;
        const T *wr = w + (size_t)n * K;
        const T *wr2 = w + (size_t)(n + N) * K;
#pragma unroll 4
        for (int k = lane * VEC; k < K; k += 32 * VEC) {
            const uint4 u = *reinterpret_cast<const uint4 *>(wr + k);
            uint4 u2 = make_uint4(0, 0, 0, 0);
            if (glu) u2 = *reinterpret_cast<const uint4 *>(wr2 + k);
            const T *t = reinterpret_cast<const T *>(&u);
            const T *t2 = reinterpret_cast<const T *>(&u2);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                // 16-byte shared loads (K is a multiple of 8)
                float xv[VEC];
                const float4 *x4 = reinterpret_cast<const float4 *>(xs + m * K + k);
#pragma unroll
                for (int q = 0; q < VEC / 4; ++q) {
                    const float4 f = x4[q];
                    xv[4 * q] = f.x; xv[4 * q + 1] = f.y; xv[4 * q + 2] = f.z; xv[4 * q + 3] = f.w;
                }
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    acc[m] += xv[e] * tof(t[e]);
                    if (glu) acc2[m] += xv[e] * tof(t2[e]);
                }
            }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            for (int o = 16; o > 0; o >>= 1) {
                acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
                acc2[m] += __shfl_xor_sync(0xffffffff, acc2[m], o);
            }
        }
        if (lane < M) {
            float a = 0.f, a2 = 0.f;
#pragma unroll
            for (int m = 0; m < M; ++m)
                if (m == lane) { a = acc[m]; a2 = acc2[m]; }
            const size_t o = (size_t)lane * N + n;
            if (mode == 1) {
                y[o] = fromf<T>(tof(res[o]) + rnd<T>(a));
            } else if (glu) {
                const float g = rnd<T>(a);
                y[o] = fromf<T>(rnd<T>(g / (1.f + __expf(-g))) * rnd<T>(a2));
            } else {
                y[o] = fromf<T>(a);
            }
        }
    }
}

#define SMALL(T, M, NAME)                                                                       \
    extern "C" __global__ void NAME(const T *x, const T *w, const T *norm_w, float eps,        \
                                    const T *res, T *y, int K, int N, int mode) {               \
        small_linear<T, M>(x, w, norm_w, eps, res, y, K, N, mode);                              \
    }
#define SMALLS(T, SUF)                                                                          \
    SMALL(T, 1, small_linear_1_##SUF)                                                           \
    SMALL(T, 2, small_linear_2_##SUF)                                                           \
    SMALL(T, 3, small_linear_3_##SUF)                                                           \
    SMALL(T, 4, small_linear_4_##SUF)                                                           \
    SMALL(T, 5, small_linear_5_##SUF)                                                           \
    SMALL(T, 6, small_linear_6_##SUF)                                                           \
    SMALL(T, 7, small_linear_7_##SUF)                                                           \
    SMALL(T, 8, small_linear_8_##SUF)
SMALLS(float, f32)
SMALLS(__nv_bfloat16, bf16)
SMALLS(__half, f16)
