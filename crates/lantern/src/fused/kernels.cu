// Fused inference kernels of lantern's transformer blocks (see mod.rs for what each computes
// and cpu.rs for the same algorithms on the CPU). Compiled to PTX by build.rs (`cuda` feature).
#include "common.cuh"
#include <cooperative_groups.h>

// One block per row. h = x (+ res, rounded); y = round(round(h * rsqrt(mean(h^2) + eps)) * w).
// With a residual, out holds [h; y] (h first, rows * cols each), else y.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *res, const T *w, T *out, int rows, int cols,
                             float eps) {
    extern __shared__ float buf[];
    __shared__ float red[32];
    const size_t r0 = (size_t)blockIdx.x * cols;
    float ss = 0.f;
    constexpr int VEC = 16 / sizeof(T);
    if (cols % VEC == 0 && cols / VEC <= (int)blockDim.x) {
        // one 16-byte load of x (and of res) per thread, all in flight at once
        const int i = threadIdx.x * VEC;
        if (i < cols) {
            const uint4 xv = *reinterpret_cast<const uint4 *>(x + r0 + i);
            uint4 rv = make_uint4(0, 0, 0, 0);
            if (res) rv = *reinterpret_cast<const uint4 *>(res + r0 + i);
            const T *xt = reinterpret_cast<const T *>(&xv);
            const T *rt = reinterpret_cast<const T *>(&rv);
            uint4 hv;
            T *ht = reinterpret_cast<T *>(&hv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float v = tof(xt[e]);
                if (res) {
                    ht[e] = fromf<T>(v + tof(rt[e]));
                    v = tof(ht[e]);
                }
                buf[i + e] = v;
                ss += v * v;
            }
            if (res) *reinterpret_cast<uint4 *>(out + r0 + i) = hv;
        }
    } else {
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
    }
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / cols + eps);
    T *y = out + (res ? (size_t)rows * cols : 0) + r0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        y[i] = norm_scale<T>(buf[i], inv, tof(w[i]));
}

// add_rms_norm with one warp per row and the row in registers (rows of at most 256 16-byte
// chunks, as add_rms_norm's vector path). The same bits as add_rms_norm's 256-thread block:
// chunk c of lane l is thread 32c + l there, each chunk's squares are summed in the same order,
// a chunk's total is that warp's butterfly, and the eight totals meet in the order of the
// block's second butterfly (lanes 8-31 hold zeros there, and adding a zero is exact). The norm
// weight is read before waiting for the previous kernel (it is never written by one).
template <typename T>
__device__ void add_rms_norm_warp(const T *x, const T *res, const T *w, T *out, int rows,
                                  int cols, float eps) {
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int nch = cols / VEC;
    uint4 wv[8], xv[8], rv[8];
#pragma unroll
    for (int c = 0; c < 8; ++c)
        if (c * 32 + lane < nch) wv[c] = reinterpret_cast<const uint4 *>(w)[c * 32 + lane];
    pdl_wait();
    if (row >= rows) return;
    const size_t r0 = (size_t)row * cols;
    const uint4 *x4 = reinterpret_cast<const uint4 *>(x + r0);
    const uint4 *r4 = reinterpret_cast<const uint4 *>(res + r0);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        if (c * 32 + lane < nch) {
            xv[c] = x4[c * 32 + lane];
            if (res) rv[c] = r4[c * 32 + lane];
        }
    }
    float tot[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        float ss = 0.f;
        const int i = c * 32 + lane;
        if (i < nch) {
            T *xt = reinterpret_cast<T *>(&xv[c]);
            const T *rt = reinterpret_cast<const T *>(&rv[c]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float v = tof(xt[e]);
                if (res) {
                    xt[e] = fromf<T>(v + tof(rt[e]));
                    v = tof(xt[e]);
                }
                ss += v * v;
            }
            if (res) reinterpret_cast<uint4 *>(out + r0)[i] = xv[c];
        }
        tot[c] = ss;
    }
#pragma unroll
    for (int c = 0; c < 8; ++c)
        for (int o = 16; o > 0; o >>= 1) tot[c] += __shfl_xor_sync(0xffffffff, tot[c], o);
    const float ss = ((tot[0] + tot[4]) + (tot[2] + tot[6])) + ((tot[1] + tot[5]) + (tot[3] + tot[7]));
    const float inv = rsqrtf(ss / cols + eps);
    uint4 *y4 = reinterpret_cast<uint4 *>(out + (res ? (size_t)rows * cols : 0) + r0);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int i = c * 32 + lane;
        if (i < nch) {
            const T *xt = reinterpret_cast<const T *>(&xv[c]);
            const T *wt = reinterpret_cast<const T *>(&wv[c]);
            uint4 yv;
            T *yt = reinterpret_cast<T *>(&yv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) yt[e] = norm_scale<T>(tof(xt[e]), inv, tof(wt[e]));
            y4[i] = yv;
        }
    }
}

// silu_mul for rows whose f is a multiple of a 16-byte chunk: a chunk of gate and of up per
// thread, 32-bit index arithmetic (the same arithmetic per element, so the same bits).
template <typename T> __device__ void silu_mul_vec(const T *gu, T *out, int rows, int f) {
    constexpr int VEC = 16 / sizeof(T);
    const int fv = f / VEC;
    const int n = rows * fv;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int r = i / fv, j = i - r * fv;
        const uint4 *g4 = reinterpret_cast<const uint4 *>(gu + (size_t)r * 2 * f);
        const uint4 gv = g4[j], uv = g4[fv + j];
        const T *gt = reinterpret_cast<const T *>(&gv);
        const T *ut = reinterpret_cast<const T *>(&uv);
        uint4 ov;
        T *ot = reinterpret_cast<T *>(&ov);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ot[e] = swiglu<T>(tof(gt[e]), tof(ut[e]));
        reinterpret_cast<uint4 *>(out + (size_t)r * f)[j] = ov;
    }
}

// gu rows [gate | up] of 2f each -> round(round(silu(gate)) * up)
template <typename T> __device__ void silu_mul(const T *gu, T *out, int rows, int f) {
    const size_t n = (size_t)rows * f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, j = i % f;
        out[i] = swiglu<T>(tof(gu[r * 2 * f + j]), tof(gu[r * 2 * f + f + j]));
    }
}

// out [n, 2d]: row r = [table[ids[r]] | feats[r]] (a drafter's fc input: the next token's
// embedding next to the target feature); an id past the table reads its last row.
template <typename T>
__device__ void embed_cat(const T *table, const unsigned *ids, const T *feats, T *out, int n,
                          int d, int v) {
    const size_t total = (size_t)n * 2 * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / (2 * d);
        const int j = (int)(i % (2 * d));
        if (j < d) {
            const unsigned t = min(ids[r], (unsigned)(v - 1));
            out[i] = table[(size_t)t * d + j];
        } else {
            out[i] = feats[r * d + (j - d)];
        }
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
    const size_t plane = cache_plane(n_layer, b, kvh, max_len, hd);
    for (int i = threadIdx.x; i < kvh * pairs; i += blockDim.x) {
        const int kh = i / pairs, p = i % pairs;
        const size_t o = base + cache_head(layer, b, bb, kvh, kh, max_len, hd) +
                         (size_t)(at + si) * hd + 2 * p;
        const float k0 = tof(src[(h + kh) * hd + 2 * p]), k1 = tof(src[(h + kh) * hd + 2 * p + 1]);
        float r0, r1;
        rope_pair(k0, k1, cs[2 * p], cs[2 * p + 1], r0, r1);
        kv[o] = fromf<T>(r0);
        kv[o + 1] = fromf<T>(r1);
        kv[plane + o] = src[(h + kvh + kh) * hd + 2 * p];
        kv[plane + o + 1] = src[(h + kvh + kh) * hd + 2 * p + 1];
    }
}

// Masked attention. Grid (ceil(s / QT), h, b); each block serves QT queries of one head and
// reads each key/value row once for all of them. Queries come from qkv (rotated on load and
// rounded to T like the reference), keys and values from the cache layer; scores, softmax
// and the weighted sum stay in f32. mask: additive f32 (element [bb * mask_b + q * mask_s + j],
// -inf hides a key) or null; causal_past >= 0 hides keys j > causal_past + q. live / live_at:
// the empty slots a fixed-shape step skips (KeyRange; LIVE instances only: without LIVE every
// slot is visited in order, with no index mapping).
// Shared memory: scores [QT][keys], queries [QT][HD], partial sums [warps][QT][HD].
template <typename T, int HD, int QT, bool LIVE>
__device__ void attention(const T *qkv, const float *rope, const T *kv, size_t base,
                          const float *mask, T *out, int b, int s, int h, int kvh, int layer,
                          int n_layer, int max_len, int keys, int rope_rows, long long mask_b,
                          long long mask_s, int causal_past, const int *live, int live_at) {
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
    const size_t head = base + cache_head(layer, b, bb, kvh, kh, max_len, HD);
    const size_t plane = cache_plane(n_layer, b, kvh, max_len, HD);
    const T *kp = kv + head, *vp = kv + plane + head;
    // the older keys and values are in memory already: start moving this block's rows towards
    // L2 while the previous kernel (the wqkv product) finishes; a decode step's cache does not
    // stay in L2 from one step to the next (L2 is coherent with the new slots' writes). Every
    // key row (the scores read them all) and the value rows the tile's first query does not
    // hide (read before the wait, a mask entry or the filled length only decides a prefetch)
    {
        constexpr int LINE = 128 / sizeof(T), LPR = (HD + LINE - 1) / LINE; // lines per row
        const float *mrow = mask ? mask + bb * mask_b + (long long)q0 * mask_s : nullptr;
        const KeyRange pre = key_range(LIVE, LIVE ? filled_of(live) : 0, live_at, keys);
        for (int i = threadIdx.x; i < pre.n * LPR; i += blockDim.x) {
            const int row = LIVE ? pre.slot(i / LPR) : i / LPR, l = i % LPR;
            const size_t off = (size_t)row * HD + l * LINE;
            prefetch_l2(kp + off);
            if (!mrow || mrow[row] != -INFINITY) prefetch_l2(vp + off);
        }
    }
    pdl_wait();
    // the filled length, used after the queries are staged (its load overlaps theirs)
    const int filled = LIVE ? filled_of(live) : 0;
    // queries: rotate, round, scale
    for (int i = threadIdx.x; i < QT * pairs; i += blockDim.x) {
        const int qq = i / pairs, p = i % pairs;
        float o0 = 0.f, o1 = 0.f;
        if (qq < nq) {
            const int si = q0 + qq;
            const T *src = qkv + ((size_t)bb * s + si) * w + hh * HD;
            const float *cs = rope + ((size_t)(rope_rows == 1 ? 0 : bb) * s + si) * pairs * 2;
            rope_pair(tof(src[2 * p]), tof(src[2 * p + 1]), cs[2 * p], cs[2 * p + 1], o0, o1);
            o0 = rnd<T>(o0) * scale;
            o1 = rnd<T>(o1) * scale;
        }
        qs[qq * HD + 2 * p] = o0;
        qs[qq * HD + 2 * p + 1] = o1;
    }
    __syncthreads();
    // the visited keys (scores are stored by visited index v, slot range.slot(v))
    const KeyRange range = key_range(LIVE, filled, live_at, keys);
    const int nk = LIVE ? range.n : keys;
    auto slot = [&](int v) { return LIVE ? range.slot(v) : v; };
    // scores: one key row per thread, reused for the tile's queries
    for (int v = threadIdx.x; v < nk; v += blockDim.x) {
        const int j = slot(v);
        // the key row and the mask entries are loaded together (no load waits on another)
        float kr[HD];
        load_row<T, HD>(kp + (size_t)j * HD, kr);
        float m[QT];
        bool any = false;
#pragma unroll
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
            for (int qq = 0; qq < QT; ++qq) sc[qq * keys + v] = -INFINITY;
            continue;
        }
        for (int qq = 0; qq < QT; ++qq) {
            float acc = -INFINITY;
            if (m[qq] != -INFINITY) {
                acc = 0.f;
#pragma unroll
                for (int e = 0; e < HD; ++e) acc += qs[qq * HD + e] * kr[e];
                acc += m[qq];
            }
            sc[qq * keys + v] = acc;
        }
    }
    __syncthreads();
    // softmax, probabilities left unnormalised: one query uses the whole block, a tile one
    // warp per query row
    if (QT == 1) {
        __shared__ float red[32];
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < nk; j += blockDim.x) mx = fmaxf(mx, sc[j]);
        mx = block_max(mx, red);
        float sum = 0.f;
        for (int j = threadIdx.x; j < nk; j += blockDim.x) {
            const float v = sc[j];
            const float e = (v == -INFINITY) ? 0.f : __expf(v - mx);
            sc[j] = e;
            sum += e;
        }
        sum = block_sum(sum, red);
        if (threadIdx.x == 0) inv_sum[0] = sum > 0.f ? 1.f / sum : 0.f;
    } else {
        for (int qq = warp; qq < QT; qq += nw) {
            float mx = -INFINITY;
            for (int j = lane; j < nk; j += 32) mx = fmaxf(mx, sc[qq * keys + j]);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            float sum = 0.f;
            for (int j = lane; j < nk; j += 32) {
                const float v = sc[qq * keys + j];
                const float e = (v == -INFINITY) ? 0.f : __expf(v - mx);
                sc[qq * keys + j] = e;
                sum += e;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            if (lane == 0) inv_sum[qq] = sum > 0.f ? 1.f / sum : 0.f;
        }
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
    for (int j0 = warp * KPW + sub; j0 < nk; j0 += UNR * stride) {
        uint4 u[UNR];
        float p[UNR][QT];
#pragma unroll
        for (int r = 0; r < UNR; ++r) {
            const int j = j0 + r * stride;
            bool any = false;
#pragma unroll
            for (int qq = 0; qq < QT; ++qq) {
                p[r][qq] = j < nk ? sc[qq * keys + j] : 0.f;
                any |= p[r][qq] != 0.f;
            }
            u[r] = any ? *reinterpret_cast<const uint4 *>(vp + (size_t)slot(j) * HD + col)
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
        pdl_trigger(); pdl_wait();                                                              \
        add_rms_norm<T>(x, res, w, out, rows, cols, eps);                                       \
    }
#define NORM_WARP(T, NAME)                                                                      \
    extern "C" __global__ void NAME(const T *x, const T *res, const T *w, T *out, int rows,    \
                                    int cols, float eps) {                                      \
        pdl_trigger();                                                                          \
        add_rms_norm_warp<T>(x, res, w, out, rows, cols, eps);                                  \
    }
#define SILU(T, NAME)                                                                           \
    extern "C" __global__ void NAME(const T *gu, T *out, int rows, int f) {                     \
        pdl_trigger(); pdl_wait();                                                              \
        silu_mul<T>(gu, out, rows, f);                                                          \
    }                                                                                           \
    extern "C" __global__ void NAME##_vec(const T *gu, T *out, int rows, int f) {               \
        pdl_trigger(); pdl_wait();                                                              \
        silu_mul_vec<T>(gu, out, rows, f);                                                      \
    }
#define EMBED(T, NAME)                                                                          \
    extern "C" __global__ void NAME(const T *table, const unsigned *ids, const T *feats, T *out, \
                                    int n, int d, int v) {                                      \
        pdl_trigger(); pdl_wait();                                                              \
        embed_cat<T>(table, ids, feats, out, n, d, v);                                          \
    }
#define WRITE(T, NAME)                                                                          \
    extern "C" __global__ void NAME(T *kv, unsigned long long base, const T *qkv,              \
                                    const float *rope, int b, int s, int h, int kvh, int hd,    \
                                    int layer, int n_layer, int max_len, int at,                \
                                    int rope_rows) {                                            \
        pdl_trigger(); pdl_wait();                                                              \
        write_kv<T>(kv, base, qkv, rope, b, s, h, kvh, hd, layer, n_layer, max_len, at,         \
                    rope_rows);                                                                 \
    }
#define ATTN1(T, HD, QT, LIVE, NAME)                                                             \
    extern "C" __global__ void NAME(const T *qkv, const float *rope, const T *kv,              \
                                    unsigned long long base, const float *mask, T *out, int b, \
                                    int s, int h, int kvh, int layer, int n_layer,              \
                                    int max_len, int keys, int rope_rows, long long mask_b,     \
                                    long long mask_s, int causal_past, const int *live,         \
                                    int live_at) {                                              \
        pdl_trigger();                                                                          \
        attention<T, HD, QT, LIVE>(qkv, rope, kv, base, mask, out, b, s, h, kvh, layer,         \
                                   n_layer, max_len, keys, rope_rows, mask_b, mask_s,           \
                                   causal_past, live, live_at);                                 \
    }
// each shape twice: visiting every slot, and skipping a fixed-shape step's empty ones (_live)
#define ATTN(T, HD, QT, NAME) ATTN1(T, HD, QT, false, NAME) ATTN1(T, HD, QT, true, NAME##_live)
#define ALL(T, SUF)                                                                             \
    NORM(T, rms_norm_##SUF)                                                                     \
    NORM_WARP(T, rms_norm_warp_##SUF)                                                           \
    SILU(T, silu_mul_##SUF)                                                                     \
    EMBED(T, embed_cat_##SUF)                                                                   \
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
// row (ROWS 0), gate/up row pair (ROWS 1: w has 2N rows, gate then up) or pair of adjacent
// rows (ROWS 2: rows 2u and 2u + 1, N even, mode 0 only: the wqkv product of a decode step,
// so that both halves of a RoPE pair meet in one warp). A warp first
// issues all 16-byte loads of its weight row(s) into registers (K <= 32 * VEC * CH), then the
// block stages x in shared memory as f32 while they are in flight. Prologue: with norm_w, x
// rows are first RMS-normalised exactly like add_rms_norm's output. Epilogue: mode 0
// y = round(acc); mode 1 y = round(res + round(acc)) (residual add); mode 2 (SwiGLU)
// y = round(round(silu(round(g))) * round(u)). With ROWS 2 and kv set, the epilogue also does
// write_kv's work: keys rotated with `rope` and values
// into cache layer `kc.layer` at slot `kc.at`, from the rounded outputs, as write_kv reads them.
struct KvArgs {
    unsigned long long base;
    const float *rope;
    int rope_rows, h, kvh, hd, layer, n_layer, max_len, at;
};

template <typename T, int M, int ROWS, int SMALL_CH>
__device__ void small_linear(const T *x, const T *w, const T *norm_w, float eps, const T *res,
                             T *y, int K, int N, int mode, T *kv, KvArgs kc) {
    extern __shared__ float xs[];  // [M][K]
    __shared__ float red[32];
    constexpr int VEC = 16 / sizeof(T);
    constexpr bool two = ROWS != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int nch = K / (32 * VEC) + ((lane * VEC) < (K % (32 * VEC)) ? 1 : 0);
    const int units = ROWS == 2 ? N / 2 : N;
    uint4 wa[SMALL_CH], wb[two ? SMALL_CH : 1];
    int n = blockIdx.x * nw + warp;
    auto fetch = [&](int u) {
        const int ra = ROWS == 2 ? 2 * u : u, rb = ROWS == 2 ? 2 * u + 1 : u + N;
#pragma unroll
        for (int c = 0; c < SMALL_CH; ++c) {
            const size_t k = (size_t)c * 32 * VEC + lane * VEC;
            wa[c] = make_uint4(0, 0, 0, 0);
            if (two) wb[two ? c : 0] = make_uint4(0, 0, 0, 0);
            if (u < units && c < nch) {
                wa[c] = *reinterpret_cast<const uint4 *>(w + (size_t)ra * K + k);
                if (two)
                    wb[two ? c : 0] = *reinterpret_cast<const uint4 *>(w + (size_t)rb * K + k);
            }
        }
    };
    fetch(n);
    // the weight loads above do not depend on the previous kernel; x and res do
    pdl_wait();
    // stage x and the norm weight (16-byte loads, all issued before any is used), then
    // normalise
    const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
    const uint4 *n4 = reinterpret_cast<const uint4 *>(norm_w);
    float *ns = xs + M * K;  // [K] norm weight
    const int rows = norm_w ? M + 1 : M;
    for (int i0 = threadIdx.x; i0 < rows * K / VEC; i0 += 4 * blockDim.x) {
        uint4 u[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = i0 + r * blockDim.x;
            if (i < M * K / VEC) u[r] = x4[i];
            else if (i < rows * K / VEC) u[r] = n4[i - M * K / VEC];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = i0 + r * blockDim.x;
            if (i < rows * K / VEC) {
                const T *t = reinterpret_cast<const T *>(&u[r]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) xs[i * VEC + e] = tof(t[e]);
            }
        }
    }
    __syncthreads();
    if (norm_w) rms_norm_rows<T>(xs, M, K, ns, eps, red);
    while (n < units) {
        float acc[M], acc2[M];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = acc2[m] = 0.f;
#pragma unroll
        for (int c = 0; c < SMALL_CH; ++c) {
            if (c < nch) {
                const int k = c * 32 * VEC + lane * VEC;
                const T *t = reinterpret_cast<const T *>(&wa[c]);
                const T *t2 = reinterpret_cast<const T *>(&wb[two ? c : 0]);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xv[VEC];
                    const float4 *xf = reinterpret_cast<const float4 *>(xs + m * K + k);
#pragma unroll
                    for (int q = 0; q < VEC / 4; ++q) {
                        const float4 f = xf[q];
                        xv[4 * q] = f.x; xv[4 * q + 1] = f.y; xv[4 * q + 2] = f.z; xv[4 * q + 3] = f.w;
                    }
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        acc[m] += xv[e] * tof(t[e]);
                        if (two) acc2[m] += xv[e] * tof(t2[e]);
                    }
                }
            }
        }
        const int unit = n;
        n += gridDim.x * nw;
        fetch(n);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            for (int o = 16; o > 0; o >>= 1) {
                acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
                if (two) acc2[m] += __shfl_xor_sync(0xffffffff, acc2[m], o);
            }
        }
        if (lane < M) {
            float a = 0.f, a2 = 0.f;
#pragma unroll
            for (int m = 0; m < M; ++m)
                if (m == lane) { a = acc[m]; a2 = acc2[m]; }
            if (ROWS == 2) {
                const int row = 2 * unit;
                const size_t o = (size_t)lane * N + row;
                y[o] = fromf<T>(a);
                y[o + 1] = fromf<T>(a2);
                const int qa = kc.h * kc.hd, ka = qa + kc.kvh * kc.hd;
                if (kv && row >= qa) {
                    // a key pair (rotated) or a value pair of head kh, batch row `lane`
                    const bool key = row < ka;
                    const int kh = (row - (key ? qa : ka)) / kc.hd, p = (row % kc.hd) / 2;
                    const size_t ko = kc.base + cache_head(kc.layer, M, lane, kc.kvh, kh, kc.max_len, kc.hd) +
                                      (size_t)kc.at * kc.hd + 2 * p;
                    const float a0 = rnd<T>(a), a1 = rnd<T>(a2);
                    if (key) {
                        const float *cs = kc.rope + (size_t)(kc.rope_rows == 1 ? 0 : lane) * kc.hd;
                        float r0, r1;
                        rope_pair(a0, a1, cs[2 * p], cs[2 * p + 1], r0, r1);
                        kv[ko] = fromf<T>(r0);
                        kv[ko + 1] = fromf<T>(r1);
                    } else {
                        const size_t plane = cache_plane(kc.n_layer, M, kc.kvh, kc.max_len, kc.hd);
                        kv[plane + ko] = fromf<T>(a0);
                        kv[plane + ko + 1] = fromf<T>(a1);
                    }
                }
            } else {
                const size_t o = (size_t)lane * N + unit;
                if (mode == 1) {
                    y[o] = fromf<T>(tof(res[o]) + rnd<T>(a));
                } else if (ROWS == 1) {
                    y[o] = swiglu<T>(rnd<T>(a), rnd<T>(a2));
                } else {
                    y[o] = fromf<T>(a);
                }
            }
        }
    }
}

#define SMALL(T, M, R, CH, NAME)                                                                \
    extern "C" __global__ void NAME(const T *x, const T *w, const T *norm_w, float eps,        \
                                    const T *res, T *y, int K, int N, int mode, T *kv,          \
                                    unsigned long long kv_base, const float *rope,              \
                                    int rope_rows, int h, int kvh, int hd, int layer,           \
                                    int n_layer, int max_len, int at) {                         \
        pdl_trigger();                                                                          \
        const KvArgs kc = {kv_base, rope, rope_rows, h, kvh, hd, layer, n_layer, max_len, at};  \
        small_linear<T, M, R, CH>(x, w, norm_w, eps, res, y, K, N, mode, kv, kc);               \
    }
#define SMALL2(T, M, SUF)                                                                       \
    SMALL(T, M, 0, 8, small_linear_##M##_p_8_##SUF)                                             \
    SMALL(T, M, 1, 8, small_linear_##M##_g_8_##SUF)                                             \
    SMALL(T, M, 2, 8, small_linear_##M##_q_8_##SUF)                                             \
    SMALL(T, M, 0, 16, small_linear_##M##_p_16_##SUF)                                           \
    SMALL(T, M, 1, 16, small_linear_##M##_g_16_##SUF)                                           \
    SMALL(T, M, 2, 16, small_linear_##M##_q_16_##SUF)
#define SMALLS(T, SUF)                                                                          \
    SMALL2(T, 1, SUF)                                                                           \
    SMALL2(T, 2, SUF)                                                                           \
    SMALL2(T, 3, SUF)                                                                           \
    SMALL2(T, 4, SUF)                                                                           \
    SMALL2(T, 5, SUF)                                                                           \
    SMALL2(T, 6, SUF)                                                                           \
    SMALL2(T, 7, SUF)                                                                           \
    SMALL2(T, 8, SUF)
SMALLS(float, f32)
SMALLS(__nv_bfloat16, bf16)
SMALLS(__half, f16)

// Attention on tensor cores with the keys split over the warps of a block (bf16/f16): a block
// serves 16 queries (rows past the last query are padding) of one head; warp w takes key tiles
// w, w + NW, ... of 16 keys and keeps scores, probabilities and its share of the output in
// registers (mma.sync m16n8k16), with a running maximum per row (online softmax); the warps'
// shares meet once in shared memory at the end. Probabilities are rounded to T before P V and
// summed as rounded, like the reference path's bf16 matmul.
//
// Register layouts (lane = 4 g + t): a thread loads 16-byte chunks of a query / key / value row
// (row g or g + 8 of a tile, head dims 32 c + 8 t .. + 8 for each 32-dim chunk c). Q Kᵀ sums over
// the head dims in any order, so a chunk's four words serve directly as the A (queries) and B
// (keys) fragments of two k16 steps. For P V, word m of a value chunk is one element pair of an
// 8x8 block whose transpose (movmatrix) is the B fragment of the output columns
// {32 c + 8 t' + 2 m, +1 : t' = 0..3}; the accumulator then holds each thread's 8 contiguous
// dims 32 c + 8 t .. + 8 of rows g and g + 8 over m = 0..3.
__device__ __forceinline__ void mma_16816(float *d, const unsigned *a, unsigned b0, unsigned b1,
                                          __nv_bfloat16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float *d, const unsigned *a, unsigned b0, unsigned b1,
                                          __half) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned trans_8x8(unsigned x) {
    unsigned y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    const T l = fromf<T>(lo), h = fromf<T>(hi);
    return (unsigned)*reinterpret_cast<const unsigned short *>(&l) |
           ((unsigned)*reinterpret_cast<const unsigned short *>(&h) << 16);
}

// 8 consecutive elements of a qkv row (4 RoPE pairs, 16-byte aligned) rotated with their packed
// (cos, sin) table entries cs (16-byte aligned) and rounded to T: one 16-byte word, as the
// tensor-core fragments take it.
template <typename T> __device__ __forceinline__ uint4 rope8(const T *src, const float *cs) {
    const uint4 u = *reinterpret_cast<const uint4 *>(src);
    const T *x = reinterpret_cast<const T *>(&u);
    const float4 c0 = reinterpret_cast<const float4 *>(cs)[0];
    const float4 c1 = reinterpret_cast<const float4 *>(cs)[1];
    const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    uint4 out;
    unsigned *o = reinterpret_cast<unsigned *>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float r0, r1;
        rope_pair(tof(x[2 * i]), tof(x[2 * i + 1]), cv[2 * i], cv[2 * i + 1], r0, r1);
        o[i] = pack2<T>(r0, r1);
    }
    return out;
}

// write_at >= 0: the keys and values of the s new positions are at slots write_at.. of the
// cache only after this kernel: every block reads those rows from qkv instead (keys rotated on
// load, rounded to T exactly as write_kv rounds them), and the first query tile's block of each
// key head's first query head also writes them into the cache (what write_kv would write).
// live / live_at: the empty slots of a fixed-shape step (KeyRange); the warps then share only
// the tiles that hold a visited key (visited tile v: tile v below the filled length's, else the
// staging block's tiles); LIVE instances only (without LIVE every tile, in order).
template <typename T, int HD, int NW, bool LIVE>
__device__ void attention_tc(const T *qkv, const float *rope, T *kv, size_t base,
                             const float *mask, T *out, int b, int s, int h, int kvh, int layer,
                             int n_layer, int max_len, int keys, int rope_rows, long long mask_b,
                             long long mask_s, int causal_past, int write_at, const int *live,
                             int live_at) {
    constexpr int NC = HD / 32; // 32-dim chunks of a row
    extern __shared__ __align__(128) unsigned char smraw[];
    float *os = reinterpret_cast<float *>(smraw);     // [NW][16][HD] output shares
    float *wmax = os + NW * 16 * HD, *wsum = wmax + NW * 16; // [NW][16] each
    const int q0 = blockIdx.x * 16, hh = blockIdx.y, bb = blockIdx.z;
    const int w = (h + 2 * kvh) * HD, kh = hh / (h / kvh);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int nt = (keys + 15) / 16;
    // visited tiles: [0, tlo) then [tat, nt); tile(v) is the v-th of them
    auto tiles = [&](int filled, int &tlo, int &tat) {
        const KeyRange r = key_range(LIVE, filled, live_at, keys);
        tlo = (r.lo + 15) / 16;
        tat = max(r.at / 16, tlo);
    };
    // the filled length as read before the PDL wait (prefetches and the first tile; checked
    // against the value after the wait before any tile is used)
    const int filled_pre = LIVE ? filled_of(live) : 0;
    int tlo, tat;
    tiles(filled_pre, tlo, tat);
    auto tile_of = [&](int v) { return !LIVE || v < tlo ? v : tat + (v - tlo); };
    const size_t head = base + cache_head(layer, b, bb, kvh, kh, max_len, HD);
    T *kp = kv + head, *vp = kv + cache_plane(n_layer, b, kvh, max_len, HD) + head;
    // this block writes the new keys and values into the cache (write_at >= 0)
    const bool writer = write_at >= 0 && blockIdx.x == 0 && hh % (h / kvh) == 0;
    pdl_trigger();
    // the older keys are in memory already: start moving this warp's tiles towards L2 while
    // the previous kernel finishes (L2 is coherent with its writes; the filled length read
    // before the wait only decides prefetches)
    constexpr int LINE = 128 / sizeof(T), LPR = (HD + LINE - 1) / LINE; // 128-byte lines a row
    int nv = tlo + nt - tat;
    for (int tt = warp; tt < nv; tt += NW) {
        for (int i = lane; i < 2 * 16 * LPR; i += 32) {
            const int k = i % (16 * LPR), row = min(tile_of(tt) * 16 + k / LPR, keys - 1);
            prefetch_l2((i < 16 * LPR ? kp : vp) + (size_t)row * HD + (k % LPR) * LINE);
        }
    }
    pdl_wait();
    const int filled = LIVE ? filled_of(live) : 0;
    // a tile's keys and values (rows g and g + 8 of it, clamped to the last key: the copies'
    // scores are hidden, so their probabilities are 0) and mask entries, all loads issued
    // before the first use; the first tile's before the queries are rotated
    struct Tile {
        uint4 k[2][NC], v[2][NC];
        float m[2][4];
    };
    // mask rows g and g + 8 (padding queries read the last row; their outputs are dropped)
    const float *mrow[2] = {nullptr, nullptr};
    if (mask) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            mrow[r] = mask + bb * mask_b + (long long)min(q0 + g + 8 * r, s - 1) * mask_s;
    }
    auto load = [&](Tile &x, int tt) {
        const int k0 = tt * 16;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int j = min(k0 + 8 * n + g, keys - 1);
            if (write_at >= 0 && j >= write_at && j - write_at < s) {
                // a new position: its key rotated like write_kv's, its value as it is
                const int si = j - write_at;
                const T *src = qkv + ((size_t)bb * s + si) * w + (h + kh) * HD + 8 * t;
                const float *cs = rope + ((size_t)(rope_rows == 1 ? 0 : bb) * s + si) * HD + 8 * t;
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    x.k[n][c] = rope8<T>(src + c * 32, cs + c * 32);
                    x.v[n][c] = *reinterpret_cast<const uint4 *>(src + kvh * HD + c * 32);
                    if (writer) {
                        const size_t off = (size_t)j * HD + c * 32 + 8 * t;
                        *reinterpret_cast<uint4 *>(kp + off) = x.k[n][c];
                        *reinterpret_cast<uint4 *>(vp + off) = x.v[n][c];
                    }
                }
                continue;
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const size_t off = (size_t)j * HD + c * 32 + 8 * t;
                x.k[n][c] = *reinterpret_cast<const uint4 *>(kp + off);
                x.v[n][c] = *reinterpret_cast<const uint4 *>(vp + off);
            }
        }
        if (!mask) {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) x.m[n][e] = 0.f;
        } else if (k0 + 16 <= keys) {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) x.m[n][e] = mrow[e >> 1][k0 + 8 * n + 2 * t + (e & 1)];
        } else {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    x.m[n][e] = mrow[e >> 1][min(k0 + 8 * n + 2 * t + (e & 1), keys - 1)];
        }
    };
    Tile cur;
    load(cur, tile_of(min(warp, nv - 1)));
    const float scale = rsqrtf((float)HD);
    // queries, rotated and rounded to T: qa[row half][chunk][word]
    unsigned qa[2][NC][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int si = q0 + g + 8 * r;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (si < s) {
                const uint4 q = rope8<T>(
                    qkv + ((size_t)bb * s + si) * w + hh * HD + c * 32 + 8 * t,
                    rope + ((size_t)(rope_rows == 1 ? 0 : bb) * s + si) * HD + c * 32 + 8 * t);
                qa[r][c][0] = q.x, qa[r][c][1] = q.y, qa[r][c][2] = q.z, qa[r][c][3] = q.w;
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) qa[r][c][i] = 0u;
            }
        }
    }
    if (LIVE && filled != filled_pre) {
        // the filled length changed at the wait (not in a graph replay, where it is written
        // before the launch): the tiles of the value the kernel must use
        tiles(filled, tlo, tat);
        nv = tlo + nt - tat;
        load(cur, tile_of(min(warp, nv - 1)));
    }
    float acc[NC][4][4];
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[c][m][e] = 0.f;
    float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
    for (int tt = warp; tt < nv; tt += NW) {
        const int k0 = tile_of(tt) * 16;
        // scores of rows g, g + 8 at keys k0 + 8 n + 2 t + {0, 1}
        float sc[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = 0.f;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const unsigned *kc = reinterpret_cast<const unsigned *>(&cur.k[n][c]);
#pragma unroll
                for (int st = 0; st < 2; ++st) {
                    const unsigned a[4] = {qa[0][c][2 * st], qa[1][c][2 * st],
                                           qa[0][c][2 * st + 1], qa[1][c][2 * st + 1]};
                    mma_16816(sc[n], a, kc[2 * st], kc[2 * st + 1], T());
                }
            }
        }
        // scale and mask (a hidden key's -inf carries through), causal limit, keys past the
        // end (last tile only); the tile's row maxima
        float tmx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = fmaf(sc[n][e], scale, cur.m[n][e]);
        if (causal_past >= 0 || k0 + 16 > keys) {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = q0 + g + 8 * (e >> 1), j = k0 + 8 * n + 2 * t + (e & 1);
                    if (j >= keys || (causal_past >= 0 && j > causal_past + qi))
                        sc[n][e] = -INFINITY;
                }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) tmx[e >> 1] = fmaxf(tmx[e >> 1], sc[n][e]);
        float corr[2], mxl[2]; // mxl: the maxima, 0 for a row hidden so far
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tmx[r] = fmaxf(tmx[r], __shfl_xor_sync(0xffffffff, tmx[r], 1));
            tmx[r] = fmaxf(tmx[r], __shfl_xor_sync(0xffffffff, tmx[r], 2));
            const float nm = fmaxf(mx[r], tmx[r]);
            corr[r] = nm == -INFINITY ? 1.f : __expf(mx[r] - nm);
            mx[r] = nm;
            // exp(v - max) as 2^((v - max) log2 e); a row hidden so far (max -inf) gives 0
            mxl[r] = nm == -INFINITY ? 0.f : nm;
            sum[r] *= corr[r];
        }
        // the running maxima rarely move after the first tiles: skip the rescale then
        if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
            for (int c = 0; c < NC; ++c)
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    acc[c][m][0] *= corr[0];
                    acc[c][m][1] *= corr[0];
                    acc[c][m][2] *= corr[1];
                    acc[c][m][3] *= corr[1];
                }
        }
        // probabilities (rounded to T) as the A fragment of P V
        unsigned pa[4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float p[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    // (not fma(v, log2 e, -max log2 e): with a finite mask like -1e30 the
                    // product's rounding error alone is ~1e23, so the row maximum's own key
                    // would get 2^(+-1e23) instead of 1)
                    p[e] = rnd<T>(ex2((sc[n][2 * r + e] - mxl[r]) * 1.4426950408889634f));
                    sum[r] += p[e];
                }
                pa[2 * n + r] = pack2<T>(p[0], p[1]);
            }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const unsigned *v0 = reinterpret_cast<const unsigned *>(&cur.v[0][c]);
            const unsigned *v1 = reinterpret_cast<const unsigned *>(&cur.v[1][c]);
#pragma unroll
            for (int m = 0; m < 4; ++m)
                mma_16816(acc[c][m], pa, trans_8x8(v0[m]), trans_8x8(v1[m]), T());
        }
        if (tt + NW < nv) load(cur, tile_of(tt + NW));
    }
    // the warps' shares: row maxima and sums, then outputs rescaled to the block's maxima
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 2);
        if (t == 0) {
            wmax[warp * 16 + g + 8 * r] = mx[r];
            wsum[warp * 16 + g + 8 * r] = sum[r];
        }
    }
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float *o = os + (warp * 16 + g + 8 * r) * HD + c * 32 + 8 * t + 2 * m;
                *reinterpret_cast<float2 *>(o) = make_float2(acc[c][m][2 * r], acc[c][m][2 * r + 1]);
            }
    __syncthreads();
    const int nq = min(16, s - q0);
    for (int i = threadIdx.x; i < nq * HD / 8; i += blockDim.x) {
        const int row = i / (HD / 8), d0 = (i % (HD / 8)) * 8;
        float gm = -INFINITY;
#pragma unroll
        for (int ww = 0; ww < NW; ++ww) gm = fmaxf(gm, wmax[ww * 16 + row]);
        float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ww = 0; ww < NW; ++ww) {
            const float wm = wmax[ww * 16 + row];
            if (wm == -INFINITY) continue;
            const float f = __expf(wm - gm);
            l += wsum[ww * 16 + row] * f;
            const float4 *src = reinterpret_cast<const float4 *>(os + (ww * 16 + row) * HD + d0);
            const float4 a = src[0], c = src[1];
            o[0] += a.x * f, o[1] += a.y * f, o[2] += a.z * f, o[3] += a.w * f;
            o[4] += c.x * f, o[5] += c.y * f, o[6] += c.z * f, o[7] += c.w * f;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        uint4 res;
        unsigned *rw = reinterpret_cast<unsigned *>(&res);
#pragma unroll
        for (int k = 0; k < 4; ++k) rw[k] = pack2<T>(o[2 * k] * inv, o[2 * k + 1] * inv);
        *reinterpret_cast<uint4 *>(out + (((size_t)bb * s + q0 + row) * h + hh) * HD + d0) = res;
    }
}

#define ATTN_TC1(T, HD, NW, LIVE, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                      \
        NAME(const T *qkv, const float *rope, T *kv, unsigned long long base,                   \
             const float *mask, T *out, int b, int s, int h, int kvh, int layer, int n_layer,   \
             int max_len, int keys, int rope_rows, long long mask_b, long long mask_s,          \
             int causal_past, int write_at, const int *live, int live_at) {                     \
        attention_tc<T, HD, NW, LIVE>(qkv, rope, kv, base, mask, out, b, s, h, kvh, layer,     \
                                      n_layer, max_len, keys, rope_rows, mask_b, mask_s,        \
                                      causal_past, write_at, live, live_at);                    \
    }
#define ATTN_TC(T, HD, NW, NAME)                                                                \
    ATTN_TC1(T, HD, NW, false, NAME) ATTN_TC1(T, HD, NW, true, NAME##_live)
#define ATTN_TCS(T, SUF)                                                                        \
    ATTN_TC(T, 32, 4, attention_tc_32_4_##SUF)                                                  \
    ATTN_TC(T, 32, 8, attention_tc_32_8_##SUF)                                                  \
    ATTN_TC(T, 32, 16, attention_tc_32_16_##SUF)                                                \
    ATTN_TC(T, 64, 4, attention_tc_64_4_##SUF)                                                  \
    ATTN_TC(T, 64, 8, attention_tc_64_8_##SUF)                                                  \
    ATTN_TC(T, 64, 16, attention_tc_64_16_##SUF)                                                \
    ATTN_TC(T, 128, 4, attention_tc_128_4_##SUF)                                                \
    ATTN_TC(T, 128, 8, attention_tc_128_8_##SUF)
ATTN_TCS(__nv_bfloat16, bf16)
ATTN_TCS(__half, f16)

// ---------------------------------------------------------------------------------------------
// Drafting picks (fused/picks.rs, launched from fused/picks_cuda.rs): the drafter's probability
// rows, then per row its top-k or k draws without replacement, one block per row. The
// probabilities keep a row in registers (up to PK_PER per thread, PK_PROBS_THREADS threads);
// the draws keep each thread's chunk in registers (up to PK_CHUNK) with its remaining mass and
// walk a chunk again only where a draw lands.
// They are launched plainly (picks_cuda.rs) but keep the PDL protocol: trigger, then wait
// before the first read.
// ---------------------------------------------------------------------------------------------
#define PK_THREADS 512
#define PK_MAX 64

// Unsigned key with the order of f32 total_cmp (larger float, larger key).
__device__ __forceinline__ unsigned pk_key(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Whether (ka, ia) precedes (kb, ib) in the pick order: larger value first, then lower index;
// index -1 = no candidate (last).
__device__ __forceinline__ bool pk_before(unsigned ka, int ia, unsigned kb, int ib) {
    if (ia < 0) return false;
    if (ib < 0) return true;
    return ka > kb || (ka == kb && ia < ib);
}

// First candidate over the block in the pick order; every thread gets it.
__device__ __forceinline__ void pk_block_first(unsigned &k, int &i, unsigned *rk, int *ri) {
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned k2 = __shfl_xor_sync(0xffffffff, k, o);
        const int i2 = __shfl_xor_sync(0xffffffff, i, o);
        if (pk_before(k2, i2, k, i)) { k = k2; i = i2; }
    }
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) { rk[w] = k; ri[w] = i; }
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    k = l < nw ? rk[l] : 0u;
    i = l < nw ? ri[l] : -1;
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned k2 = __shfl_xor_sync(0xffffffff, k, o);
        const int i2 = __shfl_xor_sync(0xffffffff, i, o);
        if (pk_before(k2, i2, k, i)) { k = k2; i = i2; }
    }
}

// Logit i of a row (f32, bf16 or f16), CFG-combined with the unconditional row when there is
// one (in f32, rounded after each operation, like the separate tensor ops it replaces, on the
// exact f32 values of the inputs), over the temperature.
template <typename T>
__device__ __forceinline__ float pk_logit(const T *row, const T *urow, float scale, int i,
                                          float temp) {
    float x = tof(row[i]);
    if (urow) {
        const float u = tof(urow[i]);
        x = __fadd_rn(u, __fmul_rn(__fsub_rn(x, u), scale));
    }
    return temp == 1.f ? x : x / temp; // x / 1 is x: no division when there is nothing to do
}

// A row's probabilities from its logits, as the host computes them: with 0 < top_k < v the
// logits below the top_k-th largest are dropped (ties with it kept); softmax (all dropped:
// uniform). The block holds n_loc elements of the row (a cluster's block a slice of it, a lone
// block all v): l(j) is the thread's element threadIdx.x + j * blockDim.x of them, from
// registers or read on demand, and o the block's first output. rsum / rmax reduce over every
// block of the row (every thread gets the result). PER: a bound on the thread's elements known
// at compile time (0: as many as there are). The sum pass hands every kept element's
// exponential (0: dropped) to save(j, e), and the last pass divides ex(j), that element's
// exponential again, by the sum: registers keep it, a re-read row computes it again.
template <int PER, typename L, typename S, typename E, typename RS, typename RM>
__device__ __forceinline__ void pk_softmax(const L &l, const S &save, const E &ex, int n_loc,
                                           int v, int top_k, float *o, const RS &rsum,
                                           const RM &rmax) {
    const int bd = blockDim.x;
    const int n = PER > 0 ? PER : (n_loc - (int)threadIdx.x + bd - 1) / bd;
    const bool filter = top_k > 0 && top_k < v;
    // key of the top_k-th largest: the largest t with count(key >= t) >= top_k, bit by bit
    unsigned kth = 0u;
    if (filter) {
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned cand = kth | (1u << bit);
            float c = 0.f;
#pragma unroll
            for (int j = 0; j < n; ++j)
                if (threadIdx.x + j * bd < n_loc) c += pk_key(l(j)) >= cand ? 1.f : 0.f;
            if (rsum(c) >= (float)top_k) kth = cand;
        }
    }
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < n; ++j)
        if (threadIdx.x + j * bd < n_loc && (!filter || pk_key(l(j)) >= kth)) m = fmaxf(m, l(j));
    m = rmax(m);
    if (m == -INFINITY) {
        for (int i = threadIdx.x; i < n_loc; i += bd) o[i] = 1.f / (float)v;
        return;
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < n; ++j) {
        if (threadIdx.x + j * bd >= n_loc) continue;
        const float e = (!filter || pk_key(l(j)) >= kth) ? expf(l(j) - m) : 0.f;
        save(j, e);
        s += e;
    }
    s = rsum(s);
#pragma unroll
    for (int j = 0; j < n; ++j) {
        const int i = threadIdx.x + j * bd;
        if (i < n_loc) o[i] = ex(j, kth, m) / s;
    }
}

// Part `rank` of n elements split into `parts` contiguous parts of ceil(n / parts) (the last
// ones shorter or empty): its first element and length.
__device__ __forceinline__ void pk_part(int n, int parts, int rank, int &first, int &len) {
    const int size = (n + parts - 1) / parts;
    first = min(n, rank * size);
    len = min(n, first + size) - first;
}

// Probabilities of the n_loc logits at row (CFG-combined with urow when given) → o, over every
// block of the row (rsum / rmax): pk_softmax of x / temp, the logits in registers when the
// block's part fits in PER per thread, else read again in every pass.
template <int PER, typename T, typename RS, typename RM>
__device__ __forceinline__ void pk_probs_part(const T *row, const T *urow, float *o, int n_loc,
                                              int v, float temp, int top_k, float scale,
                                              const RS &rsum, const RM &rmax) {
    const int bd = blockDim.x;
    if (n_loc <= PER * bd) {
        float r[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + j * bd;
            r[j] = i < n_loc ? pk_logit(row, urow, scale, i, temp) : 0.f;
        }
        pk_softmax<PER>([&](int j) { return r[j]; }, [&](int j, float e) { r[j] = e; },
                        [&](int j, unsigned, float) { return r[j]; }, n_loc, v, top_k, o, rsum,
                        rmax);
    } else {
        const bool filter = top_k > 0 && top_k < v;
        auto l = [&](int j) { return pk_logit(row, urow, scale, threadIdx.x + j * bd, temp); };
        pk_softmax<0>(l, [](int, float) {},
                      [&](int j, unsigned kth, float m) {
                          const float y = l(j);
                          return (!filter || pk_key(y) >= kth) ? expf(y - m) : 0.f;
                      },
                      n_loc, v, top_k, o, rsum, rmax);
    }
}

// Threads of the one-block probabilities kernel, and the logits each keeps in registers: rows
// up to PK_PROBS_THREADS * PK_PER (16,384) are read from global memory once, all of a thread's
// loads in flight together; longer rows are read again in every pass.
#define PK_PROBS_THREADS 1024
#define PK_PER 16

// Probabilities of logit rows [n, v] of T (with xu, the unconditional rows [n, v]: of
// u + (x - u) * scale) → f32 rows, one block per row.
template <typename T>
__device__ __forceinline__ void draft_probs(const T *x, float *out, int v, float temp, int top_k,
                                            const T *xu, float scale) {
    pdl_trigger();
    pdl_wait();
    __shared__ float red[32];
    const size_t at = (size_t)blockIdx.x * v;
    pk_probs_part<PK_PER>(x + at, xu ? xu + at : nullptr, out + at, v, v, temp, top_k, scale,
                          [&](float a) { return block_sum(a, red); },
                          [&](float a) { return block_max(a, red); });
}
#define DRAFT_PROBS(T, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(PK_PROBS_THREADS)                              \
        NAME(const T *x, float *out, int v, float temp, int top_k, const T *xu, float scale) {  \
        draft_probs<T>(x, out, v, temp, top_k, xu, scale);                                      \
    }
DRAFT_PROBS(float, draft_probs_f32)
DRAFT_PROBS(__nv_bfloat16, draft_probs_bf16)
DRAFT_PROBS(__half, draft_probs_f16)

#if __CUDA_ARCH__ >= 900
// Cluster versions (Hopper and later; picks_cuda.rs uses them for rows of PK_CL_MIN codes and
// more): a row is split over the PK_CL blocks of a thread-block cluster, one per SM, so a
// single row no longer waits on one SM's latency. Blocks meet through their shared memory
// (distributed shared memory) at cluster barriers. Grid (PK_CL, rows).
#define PK_CL 8
#define PK_CL_THREADS 256
// Logits per thread kept in registers: rows up to PK_CL * PK_CL_THREADS * PK_CL_PER (16,384).
#define PK_CL_PER 8

// Sum (MAX false) or max of x over the cluster: a block reduction, the block's value into one
// of its two slots (alternating between calls, so a call's write never meets the previous
// call's reads), a cluster barrier, then every block combines all blocks' slots in rank order:
// the same value everywhere.
template <bool MAX>
__device__ __forceinline__ float cl_reduce(float x, float *red, float *slots, int &turn) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cl = cg::this_cluster();
    x = MAX ? block_max(x, red) : block_sum(x, red);
    float *s = slots + (turn++ & 1);
    if (threadIdx.x == 0) *s = x;
    cl.sync();
    float r = MAX ? -INFINITY : 0.f;
    for (unsigned q = 0; q < cl.num_blocks(); ++q) {
        const float y = *cl.map_shared_rank(s, q);
        r = MAX ? fmaxf(r, y) : r + y;
    }
    return r;
}

template <typename T>
__device__ __forceinline__ void draft_probs_cl(const T *x, float *out, int v, float temp,
                                               int top_k, const T *xu, float scale) {
    pdl_trigger();
    pdl_wait();
    __shared__ float red[32];
    __shared__ float slots[2];
    int turn = 0, base, n_loc;
    pk_part(v, PK_CL, blockIdx.x, base, n_loc);
    const size_t at = (size_t)blockIdx.y * v + base;
    pk_probs_part<PK_CL_PER>(x + at, xu ? xu + at : nullptr, out + at, n_loc, v, temp, top_k,
                             scale, [&](float a) { return cl_reduce<false>(a, red, slots, turn); },
                             [&](float a) { return cl_reduce<true>(a, red, slots, turn); });
    // no block leaves while another may still read its slots
    cooperative_groups::this_cluster().sync();
}
#define DRAFT_PROBS_CL(T, NAME)                                                                 \
    extern "C" __global__ void __cluster_dims__(PK_CL, 1, 1) __launch_bounds__(PK_CL_THREADS, 1) \
        NAME(const T *x, float *out, int v, float temp, int top_k, const T *xu, float scale) {  \
        draft_probs_cl<T>(x, out, v, temp, top_k, xu, scale);                                   \
    }
DRAFT_PROBS_CL(float, draft_probs_cl_f32)
DRAFT_PROBS_CL(__nv_bfloat16, draft_probs_cl_bf16)
DRAFT_PROBS_CL(__half, draft_probs_cl_f16)
#endif

// Top k of rows [n, v] → out [n, k, 2] (index, value; -1 past the row's end): k passes, each
// taking the first element after the previous pick in the pick order. A thread's elements
// (tid + jj * blockDim.x) stay in registers for all passes when the row fits PER per thread
// (PER > 0), else every pass reads them again.
#define PK_TOPK_PER 32
template <int PER>
__device__ __forceinline__ void draft_top_k(const float *p, float *out, int v, int k) {
    __shared__ unsigned rk[32];
    __shared__ int ri[32];
    const int bd = blockDim.x;
    const float *row = p + (size_t)blockIdx.x * v;
    float *o = out + (size_t)blockIdx.x * k * 2;
    const int n = PER > 0 ? PER : (v - (int)threadIdx.x + bd - 1) / bd;
    float c[PER > 0 ? PER : 1];
    if (PER > 0) {
#pragma unroll
        for (int jj = 0; jj < (PER > 0 ? PER : 1); ++jj) {
            const int i = threadIdx.x + jj * bd;
            c[jj] = i < v ? row[i] : 0.f;
        }
    }
    unsigned lk = 0u;
    int li = -1;
    for (int j = 0; j < k; ++j) {
        unsigned bk = 0u;
        int bi = -1;
#pragma unroll
        for (int jj = 0; jj < n; ++jj) {
            const int i = threadIdx.x + jj * bd;
            if (i >= v) continue;
            const unsigned key = pk_key(PER > 0 ? c[jj] : row[i]);
            if ((li < 0 || pk_before(lk, li, key, i)) && pk_before(key, i, bk, bi)) {
                bk = key;
                bi = i;
            }
        }
        pk_block_first(bk, bi, rk, ri);
        if (threadIdx.x == 0) {
            o[2 * j] = bi < 0 ? -1.f : (float)bi;
            o[2 * j + 1] = bi < 0 ? 0.f : row[bi];
        }
        lk = bk;
        li = bi;
    }
}
extern "C" __global__ void __launch_bounds__(PK_THREADS)
    draft_top_k_f32(const float *p, float *out, int v, int k) {
    pdl_trigger();
    pdl_wait();
    if (v <= PK_TOPK_PER * (int)blockDim.x)
        draft_top_k<PK_TOPK_PER>(p, out, v, k);
    else
        draft_top_k<0>(p, out, v, k);
}

// Mass and last positive index of a thread's chunk (element jj at lo + jj, val(jj) its
// remaining mass: 0 once drawn), summed in index order in f64. PER: the chunk's length when
// known at compile time (registers), else n.
template <int PER, typename V>
__device__ __forceinline__ void pk_chunk_mass(const V &val, int lo, int n, double &part,
                                              int &last) {
    part = 0.0;
    last = -1;
#pragma unroll
    for (int jj = 0; jj < (PER > 0 ? PER : n); ++jj) {
        const float y = val(jj);
        if (y > 0.f) {
            part += (double)y;
            last = lo + jj;
        }
    }
}

// Elements of a chunk the one-block draws keep in registers: rows up to PK_THREADS * PK_CHUNK
// (16,384).
#define PK_CHUNK 32

// The blocks that draw from one row: a lone block (Team = PkBlock) or a thread-block cluster
// (PkCluster, Hopper and later). rank / size: the block's place among them; sync(): a barrier
// over all their threads; peer(p, q): p in block q's shared memory.
struct PkBlock {
    __device__ static int rank() { return 0; }
    __device__ static int size() { return 1; }
    __device__ static void sync() { __syncthreads(); }
    template <typename X> __device__ static X *peer(X *p, int) { return p; }
};

// Draws without replacement from rows [n, v] with uniforms us [n, k] (a negative one ends the
// row) → out [n, k, 2] (index, conditional probability; -1 past the last draw). Draw j: the
// first index whose cumulative remaining mass exceeds us[j] * total (contiguous slices per
// block, contiguous chunks per thread, scanned in f64), the last positive index when rounding
// leaves none. `row`: the row's index.
//
// Each thread keeps its chunk (in registers up to PER elements, drawn ones zeroed; else read
// again, drawn ones skipped) and the chunk's remaining mass; after a draw only the thread
// holding the drawn index walks its chunk again. A draw scans the masses with warp shuffles,
// exchanges warp totals in the block and block totals across the team (their shared memory),
// then the team agrees on the drawn index: a block barrier and two team barriers. The
// exchange buffers alternate between draws, so a draw's writes never meet the previous draw's
// reads.
template <int PER, typename Team>
__device__ __forceinline__ void draft_draw(const float *p, const double *us, float *out, int v,
                                           int k, int row) {
    __shared__ double wsum[2][32];
    __shared__ int wlast[2][32];
    __shared__ double btot[2];
    __shared__ int blast[2];
    __shared__ int found[2];
    __shared__ int drawn[PK_MAX];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    int blo, bn, off, n;
    pk_part(v, Team::size(), Team::rank(), blo, bn);
    pk_part(bn, blockDim.x, tid, off, n);
    const int bhi = blo + bn, lo = blo + off, hi = lo + n;
    const double *u = us + (size_t)row * k;
    float *o = out + (size_t)row * k * 2;
    const float *src = p + (size_t)row * v;
    float c[PER > 0 ? PER : 1];
    int nd = 0; // draws so far (the re-read chunk skips drawn[0..nd))
    if (PER > 0) {
#pragma unroll
        for (int jj = 0; jj < (PER > 0 ? PER : 1); ++jj) c[jj] = jj < n ? src[lo + jj] : 0.f;
    }
    auto val = [&](int jj) -> float {
        if (PER > 0) return c[jj];
        float y = src[lo + jj];
        for (int d = 0; d < nd; ++d) y = drawn[d] == lo + jj ? 0.f : y;
        return y;
    };
    double part;
    int last;
    pk_chunk_mass<PER>(val, lo, n, part, last);
    int j = 0;
    for (; j < k && j < PK_MAX; ++j) {
        const double uj = u[j];
        if (uj < 0.0) break;
        const int b = j & 1;
        // inclusive scan of the masses over the warp, the warp's last positive index
        double incl = part;
        int wl = last;
        for (int off = 1; off < 32; off <<= 1) {
            const double y = __shfl_up_sync(0xffffffff, incl, off);
            if (lane >= off) incl += y;
        }
        for (int off = 16; off > 0; off >>= 1) wl = max(wl, __shfl_xor_sync(0xffffffff, wl, off));
        if (lane == 31) wsum[b][w] = incl;
        if (lane == 0) wlast[b][w] = wl;
        __syncthreads();
        // every thread adds the warp totals in the same order: one block total for all
        double before = 0.0, block = 0.0;
        int last_b = -1;
        for (int q = 0; q < nw; ++q) {
            if (q == w) before = block;
            block += wsum[b][q];
            last_b = max(last_b, wlast[b][q]);
        }
        if (tid == 0) {
            btot[b] = block;
            blast[b] = last_b;
            if (Team::rank() == 0) found[b] = 0x7fffffff;
        }
        Team::sync();
        // and the block totals in rank order: one total for the team
        double bbefore = 0.0, total = 0.0;
        int last_all = -1;
        for (int q = 0; q < Team::size(); ++q) {
            if (q == Team::rank()) bbefore = total;
            total += *Team::peer(&btot[b], q);
            last_all = max(last_all, *Team::peer(&blast[b], q));
        }
        if (!(total > 0.0)) break;
        const double excl = bbefore + before + (incl - part);
        const double t = uj * total;
        if (part > 0.0 && t >= excl && t < excl + part) {
            double r = t - excl;
            int hit = -1;
#pragma unroll
            for (int jj = 0; jj < (PER > 0 ? PER : n); ++jj) {
                const float y = val(jj);
                if (hit < 0 && y > 0.f) {
                    r -= (double)y;
                    if (r < 0.0) hit = lo + jj;
                }
            }
            atomicMin(Team::peer(&found[b], 0), hit < 0 ? last : hit);
        }
        Team::sync();
        const int f = *Team::peer(&found[b], 0);
        const int x = f == 0x7fffffff ? last_all : f;
        if (tid == 0 && (x < blo || x >= bhi)) drawn[j] = -1;
        if (x >= lo && x < hi) {
            // the owner: writes the draw, takes it out of its chunk, sums the chunk again
            float px = 0.f;
            if (PER > 0) {
#pragma unroll
                for (int jj = 0; jj < (PER > 0 ? PER : 1); ++jj)
                    if (lo + jj == x) {
                        px = c[jj];
                        c[jj] = 0.f;
                    }
            } else {
                px = src[x];
            }
            drawn[j] = x;
            o[2 * j] = (float)x;
            o[2 * j + 1] = fminf(fmaxf(px / (float)total, 0.f), 1.f);
            nd = j + 1;
            pk_chunk_mass<PER>(val, lo, n, part, last);
        }
        nd = j + 1;
    }
    // the rest of the row's outputs: no draw
    if (Team::rank() == 0)
        for (int q = j + tid; q < k; q += blockDim.x) {
            o[2 * q] = -1.f;
            o[2 * q + 1] = 0.f;
        }
    // no block leaves while another may still read its shared memory
    if (Team::size() > 1) Team::sync();
}
extern "C" __global__ void __launch_bounds__(PK_THREADS)
    draft_draw_f32(const float *p, const double *us, float *out, int v, int k) {
    pdl_trigger();
    pdl_wait();
    if (v <= PK_CHUNK * (int)blockDim.x)
        draft_draw<PK_CHUNK, PkBlock>(p, us, out, v, k, blockIdx.x);
    else
        draft_draw<0, PkBlock>(p, us, out, v, k, blockIdx.x);
}

#if __CUDA_ARCH__ >= 900
// Elements of a chunk the cluster draws keep in registers: rows up to PK_CL * PK_CL_THREADS *
// PK_CL_CHUNK (16,384).
#define PK_CL_CHUNK 8

struct PkCluster {
    __device__ static int rank() { return (int)cooperative_groups::this_cluster().block_rank(); }
    __device__ static int size() { return PK_CL; }
    __device__ static void sync() { cooperative_groups::this_cluster().sync(); }
    template <typename X> __device__ static X *peer(X *p, int q) {
        return cooperative_groups::this_cluster().map_shared_rank(p, q);
    }
};

// draft_draw_f32 over a cluster per row: grid (PK_CL, rows).
extern "C" __global__ void __cluster_dims__(PK_CL, 1, 1) __launch_bounds__(PK_CL_THREADS, 1)
    draft_draw_cl_f32(const float *p, const double *us, float *out, int v, int k) {
    pdl_trigger();
    pdl_wait();
    if (v <= PK_CL * PK_CL_CHUNK * (int)blockDim.x)
        draft_draw<PK_CL_CHUNK, PkCluster>(p, us, out, v, k, blockIdx.y);
    else
        draft_draw<0, PkCluster>(p, us, out, v, k, blockIdx.y);
}
#endif

// The tokens at indices at[m] of n picks (f32 token or -1 → token max(x, 0)), reps times over →
// out[reps * m] (picks.rs pick_tokens; an index past the picks reads token 0).
extern "C" __global__ void pick_tokens_f32(const float *p, int n, const unsigned *at,
                                           unsigned *out, int m, int reps) {
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * reps) return;
    const unsigned j = at[i % m];
    out[i] = j < (unsigned)n ? (unsigned)fmaxf(p[j], 0.f) : 0u;
}

// One level of EAGLE-2's dynamic tree (picks.rs frontier; the CPU version is the reference):
// block g = image g. Candidate c (row c / k, pick c % k) scores base[row] + ln p; the keep best
// (pk_before's order: larger first, then earlier) are written in creation order with their
// scores, tokens (every drafter row r = g mod n_img) and parents' feature rows. Output sections
// as FrontierLayout: scores [n_img, C], chosen [n_img, keep], chosen scores, tokens [rows,
// keep], gather [rows * keep], every candidate's token [n_img, C]. Shared memory: keys [C],
// then kept flags / positions [C].
extern "C" __global__ void frontier_f32(const float *picks, const unsigned *base, unsigned *out,
                                        int n_img, int rpi, int k, int keep, int rows,
                                        int stride, int slot_base) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ unsigned fr_sm[];
    const int g = blockIdx.x, nc = rpi * k;
    unsigned *keys = fr_sm;
    int *pos = reinterpret_cast<int *>(fr_sm + nc);
    unsigned *scores = out, *chosen = out + n_img * nc, *cscores = chosen + n_img * keep;
    unsigned *tokens = cscores + n_img * keep, *gather = tokens + rows * keep;
    unsigned *ctokens = gather + rows * keep;
    for (int c = threadIdx.x; c < nc; c += blockDim.x) {
        const float *p = picks + ((size_t)(g * rpi + c / k) * k + c % k) * 2;
        const float ln = p[0] >= 0.f && p[1] > 0.f ? logf(p[1]) : -INFINITY;
        const float sc = __uint_as_float(base[g * rpi + c / k]) + ln;
        scores[(size_t)g * nc + c] = __float_as_uint(sc);
        ctokens[(size_t)g * nc + c] = (unsigned)fmaxf(p[0], 0.f);
        keys[c] = pk_key(sc);
    }
    __syncthreads();
    // kept: fewer than keep candidates precede it
    for (int c = threadIdx.x; c < nc; c += blockDim.x) {
        int rank = 0;
        for (int o = 0; o < nc && rank < keep; ++o) rank += pk_before(keys[o], o, keys[c], c);
        pos[c] = rank < keep ? 1 : 0;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < nc; c += blockDim.x) {
        if (!pos[c]) continue;
        int q = 0;
        for (int o = 0; o < c; ++o) q += pos[o];
        const float *p = picks + ((size_t)(g * rpi + c / k) * k + c % k) * 2;
        chosen[g * keep + q] = (unsigned)c;
        cscores[g * keep + q] = scores[(size_t)g * nc + c];
        const unsigned slot = slot_base < 0 ? 0u : (unsigned)(1 + slot_base + c / k);
        for (int r = g; r < rows; r += n_img) {
            tokens[r * keep + q] = (unsigned)fmaxf(p[0], 0.f);
            gather[r * keep + q] = (unsigned)(r * stride) + slot;
        }
    }
}

// Kept cache entries from a deferred staging block (mod.rs gather_slots): for every plane, layer,
// batch row r and head, slot from + idx[r, i] -> to + i, in 16-byte chunks (base: the cache's
// start in chunks). The source slots lie past the destination ones.
extern "C" __global__ void gather_slots_u4(uint4 *kv, unsigned long long base,
                                           const unsigned *idx, int from, int to, int m, int b,
                                           int kvh, int max_len, int chunks,
                                           unsigned long long total) {
    pdl_trigger();
    pdl_wait();
    uint4 *c = kv + base;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         t < total; t += stride) {
        const int ch = (int)(t % chunks);
        unsigned long long u = t / chunks;
        const int i = (int)(u % m);
        u /= m;
        const int r = (int)((u / kvh) % b);
        const unsigned long long row = u * (unsigned long long)max_len * chunks;
        c[row + (unsigned long long)(to + i) * chunks + ch] =
            c[row + (unsigned long long)(from + idx[r * m + i]) * chunks + ch];
    }
}

// Words of one level's frontier output (FrontierLayout::len with keep = k).
__device__ __forceinline__ int st_level_len(int n_img, int nc, int k, int rows) {
    return 2 * n_img * nc + 2 * n_img * k + 2 * rows * k;
}

// The verification tree of EAGLE-2's dynamic drafting (picks.rs select_tree; the CPU version,
// on dynamic.rs select_columns, is the reference): block g = image g, over every level's
// frontier output. Candidates in creation order (the root's k, then k * k per level); the n - 1
// best (pk_before's order on the scores) are the columns after the root, in creation order.
// Output per image [3 + n, n] f32: tokens, positions (root's + depth), parent columns (-1:
// parent not selected), then the tree mask. Shared memory: keys [N], columns [N], parent
// columns [n]. 256 threads.
extern "C" __global__ void select_tree_f32(const unsigned *fronts, const unsigned *roots,
                                           float *out, int n_img, int k, int depth, int rows,
                                           int n) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ unsigned st_sm[];
    __shared__ int part[256];
    const int g = blockIdx.x, N = k + depth * k * k, bd = blockDim.x, tid = threadIdx.x;
    const int len0 = st_level_len(n_img, k, k, rows), len1 = st_level_len(n_img, k * k, k, rows);
    unsigned *keys = st_sm;
    int *col = reinterpret_cast<int *>(st_sm + N);
    int *pcol = col + N;
    // candidate c: its level, index within the level, the level's start and candidates
    auto locate = [&](int c, int &l, int &lc, int &at, int &nc) {
        if (c < k) {
            l = 0; lc = c; at = 0; nc = k;
        } else {
            l = 1 + (c - k) / (k * k); lc = (c - k) % (k * k);
            at = len0 + (l - 1) * len1; nc = k * k;
        }
    };
    for (int c = tid; c < N; c += bd) {
        int l, lc, at, nc;
        locate(c, l, lc, at, nc);
        keys[c] = pk_key(__uint_as_float(fronts[at + g * nc + lc]));
    }
    __syncthreads();
    // selected: fewer than n - 1 candidates precede it
    for (int c = tid; c < N; c += bd) {
        int rank = 0;
        for (int o = 0; o < N && rank < n - 1; ++o) rank += pk_before(keys[o], o, keys[c], c);
        col[c] = rank < n - 1 ? 1 : 0;
    }
    __syncthreads();
    // columns: 1 + the selected candidates created before it (a scan over contiguous chunks)
    const int per = (N + bd - 1) / bd, lo = min(N, tid * per), hi = min(N, lo + per);
    int cnt = 0;
    for (int c = lo; c < hi; ++c) cnt += col[c];
    part[tid] = cnt;
    __syncthreads();
    if (tid == 0) {
        int sum = 0;
        for (int t = 0; t < bd; ++t) {
            const int x = part[t];
            part[t] = sum;
            sum += x;
        }
    }
    __syncthreads();
    int q = 1 + part[tid];
    for (int c = lo; c < hi; ++c) col[c] = col[c] ? q++ : -1;
    __syncthreads();
    float *o = out + (size_t)g * (3 + n) * n;
    const unsigned root_at = roots[2 * g + 1];
    if (tid == 0) {
        o[0] = (float)roots[2 * g];
        o[n] = (float)root_at;
        o[2 * n] = 0.f;
        pcol[0] = 0;
    }
    for (int c = tid; c < N; c += bd) {
        const int i = col[c];
        if (i < 0) continue;
        int l, lc, at, nc;
        locate(c, l, lc, at, nc);
        // FrontierLayout sections: chosen after the scores, the candidates' tokens last
        const unsigned token = fronts[at + nc * n_img + 2 * k * n_img + 2 * rows * k + g * nc + lc];
        int pc = 0;
        if (l > 0) {
            // the parent: the previous level's kept candidate lc / k
            const int pat = l == 1 ? 0 : len0 + (l - 2) * len1, pnc = l == 1 ? k : k * k;
            const int pl = (int)fronts[pat + n_img * pnc + g * k + lc / k];
            pc = col[(l == 1 ? 0 : k + (l - 2) * k * k) + pl];
        }
        o[i] = (float)token;
        o[n + i] = (float)(root_at + l + 1);
        o[2 * n + i] = (float)pc;
        pcol[i] = pc;
    }
    __syncthreads();
    // mask rows: a column sees its ancestors and itself
    for (int i = tid; i < n; i += bd) {
        float *row = o + (size_t)(3 + i) * n;
        for (int j = 0; j < n; ++j) row[j] = -INFINITY;
        int a = i;
        for (int s = 0; s <= depth + 1 && a >= 0; ++s) {
            row[a] = 0.f;
            if (a == 0) break;
            a = pcol[a];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Read-bandwidth probes (bench only, fused/probe.rs): how fast one kernel streams a buffer of a
// weight matrix's size, with ordinary 16-byte loads (U per thread in flight) or with bulk
// asynchronous copies (cp.async.bulk, Hopper's TMA engine) into a ring of shared-memory stages.
// A block writes one word only if its checksum hits a magic value, so the reads stay.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void *p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(uint64_t *b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count));
}
// Arrives on the barrier and tells it that `bytes` more bytes will land in this phase.
__device__ __forceinline__ void mbar_expect(uint64_t *b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)),
                 "r"(bytes)
                 : "memory");
}
// Waits until the barrier's phase `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t *b, unsigned parity) {
    unsigned ok = 0;
    do {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
            "selp.u32 %0, 1, 0, p; }"
            : "=r"(ok)
            : "r"(smem_u32(b)), "r"(parity)
            : "memory");
    } while (!ok);
}
// Bulk copy of `bytes` (a multiple of 16, both ends 16-byte aligned) from global to shared
// memory, completing on barrier `b`.
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, unsigned bytes,
                                         uint64_t *b) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
        "[%3];" ::"r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(b))
        : "memory");
#endif
}
__device__ __forceinline__ void mbar_fence_init() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

template <int U>
__device__ void probe_loads(const uint4 *p, unsigned long long n, unsigned *out) {
    unsigned acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += U * stride) {
        uint4 u[U];
#pragma unroll
        for (int r = 0; r < U; ++r) {
            const unsigned long long j = i + r * stride;
            u[r] = j < n ? p[j] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int r = 0; r < U; ++r) acc ^= u[r].x ^ u[r].y ^ u[r].z ^ u[r].w;
    }
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}
#define PROBE_LOADS(U)                                                                          \
    extern "C" __global__ void probe_loads_##U(const uint4 *p, unsigned long long n,           \
                                               unsigned *out) {                                 \
        pdl_trigger(); pdl_wait();                                                              \
        probe_loads<U>(p, n, out);                                                              \
    }
PROBE_LOADS(1)
PROBE_LOADS(4)
PROBE_LOADS(8)

// Block b streams bytes [b * per, (b + 1) * per) (per a multiple of 16) in chunks of `chunk`
// bytes through `stages` shared-memory stages; thread 0 issues, every thread reads its part
// of each landed chunk.
extern "C" __global__ void probe_bulk(const char *p, unsigned long long bytes,
                                      unsigned long long per, unsigned *out, int chunk,
                                      int stages) {
    pdl_trigger();
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) uint64_t bar[32];
    const unsigned long long lo = (unsigned long long)blockIdx.x * per;
    const unsigned long long hi = min(bytes, lo + per);
    const int nch = lo < hi ? (int)((hi - lo + chunk - 1) / chunk) : 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) mbar_init(&bar[s], 1);
        mbar_fence_init();
    }
    __syncthreads();
    pdl_wait();
    auto issue = [&](int c) {
        const int s = c % stages;
        const unsigned long long at = lo + (unsigned long long)c * chunk;
        const unsigned len = (unsigned)min((unsigned long long)chunk, hi - at);
        mbar_expect(&bar[s], len);
        bulk_g2s(ring + (size_t)s * chunk, p + at, len, &bar[s]);
    };
    if (threadIdx.x == 0)
        for (int c = 0; c < min(stages, nch); ++c) issue(c);
    unsigned acc = 0;
    for (int c = 0; c < nch; ++c) {
        const int s = c % stages;
        mbar_wait(&bar[s], (c / stages) & 1);
        const unsigned long long at = lo + (unsigned long long)c * chunk;
        const int len = (int)min((unsigned long long)chunk, hi - at);
        const uint4 *r4 = reinterpret_cast<const uint4 *>(ring + (size_t)s * chunk);
        for (int i = threadIdx.x; i < len / 16; i += blockDim.x) {
            const uint4 u = r4[i];
            acc ^= u.x ^ u.y ^ u.z ^ u.w;
        }
        __syncthreads();
        if (threadIdx.x == 0 && c + stages < nch) issue(c + stages);
    }
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

// ---------------------------------------------------------------------------------------------
// A fixed-shape step's mask (mod.rs place_mask): the additive mask src [rows, len + s] of the
// usual layout (filled keys, then the block) placed into dst [rows, max_len]: the filled keys
// first, -inf up to the staging slots at max_len - s, then the block's keys; `filled` (if set)
// receives len, the length the step's attention reads to skip the empty slots (KeyRange).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void place_mask_f32(const float *src, float *dst, int rows, int len, int s,
                                          int max_len, unsigned *filled) {
    pdl_trigger();
    pdl_wait();
    if (filled && blockIdx.x == 0 && threadIdx.x == 0) *filled = (unsigned)len;
    const int at = max_len - s, w = len + s;
    const size_t n = (size_t)rows * max_len;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / max_len;
        const int j = (int)(i % max_len);
        float v;
        if (j < len) v = src[r * w + j];
        else if (j < at) v = -INFINITY;
        else v = src[r * w + len + (j - at)];
        dst[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE table rows of positions (u32): a position past the table (>= rows) reads row `zero`, a
// zero-rotation row.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void clamp_rows_u32(const unsigned *pos, unsigned *out, int n, int rows,
                                          int zero) {
    pdl_trigger();
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned p = pos[i];
        out[i] = p >= (unsigned)rows ? (unsigned)zero : p;
    }
}
