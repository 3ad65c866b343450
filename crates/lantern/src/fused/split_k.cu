// Projections of many rows (tree verification, prefill) whose sum over k is
// split into slices, and the residual add + RMSNorm that sums the slices (fused/split_k.rs).
// Bands of 16 MT rows (MT = 1, 2, 4 or 8 m16 tiles).
// Compiled to PTX by build.rs (`cuda` feature).
#include "common.cuh"

// Warps per block; each computes 16 output columns for every row of its band.
constexpr int SK_WARPS = 4;
// Output columns per block.
constexpr int SK_BN = 16 * SK_WARPS;
// Most k per slice: a warp keeps its two weight rows of the slice in registers.
constexpr int SK_KS = 256;
// Elements of padding after each staged row: a row (of 128 or 256 elements) then
// starts 64 bytes (mod 128) after the previous one, so the 8 lanes of a 16-byte fragment load
// (rows g, g + 1; chunks t = 0..3) hit distinct bank groups.
constexpr int SK_PAD = 32;

// d += a b on tensor cores (f32 accumulation). Not volatile: the compiler may interleave the
// products with the fragment loads.
__device__ __forceinline__ void sk_mma(float *d, unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1, __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void sk_mma(float *d, unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// part[s][m][n] = sum over k in slice s (k in [s ks, s ks + ks)) of a[m][k] w[n][k], in f32.
// Grid (N / SK_BN, slices, bands of 16 MT rows); a [M, K], w [N, K], part [slices, M, N].
//
// Register layouts (lane = 4 g + t): the sum over k may run in any order, so a thread takes
// 16-byte chunks (8 consecutive k, 32 c + 8 t) of a weight row and of a staged row, and a
// chunk's four words serve directly as the B (weights) and A (rows) fragments of two k16
// steps: step 0 words x, y, step 1 words z, w. Warp w's n8 tiles j = 0, 1 are the columns
// n0 + 8 j + g, n0 = 64 blockIdx.x + 16 w; the weight loads are issued before the PDL wait (the
// previous kernel never writes weights), the band's rows are staged in shared memory after it
// (asynchronous copies, all in flight at once; rows past the last are zero-filled). The
// products of a chunk run m-tile group by group (SK_G tiles), step 0 of every tile before step
// 1, so that consecutive mma.sync never depend on each other. Slices of 128 or 256 (the
// padding's bank arithmetic).
constexpr int SK_G = 4;
template <typename T, int MT>
__device__ void split_k_linear(const T *a, const T *w, float *part, int M, int K, int N, int ks) {
    extern __shared__ __align__(16) unsigned char sk_smem[];
    T *as = reinterpret_cast<T *>(sk_smem);  // [16 MT][ks + SK_PAD]
    constexpr int VEC = 16 / sizeof(T);      // 8
    constexpr int G = MT < SK_G ? MT : SK_G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * SK_BN + warp * 16;
    const int k0 = blockIdx.y * ks;
    const int nch = (min(ks, K - k0)) / 32;
    const int m0 = blockIdx.z * 16 * MT;
    const int rows = min(M - m0, 16 * MT);
    const int stride = ks + SK_PAD;
    uint4 wr[2][SK_KS / 32];
#pragma unroll
    for (int c = 0; c < SK_KS / 32; ++c) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wr[j][c] = make_uint4(0, 0, 0, 0);
            if (c < nch)
                wr[j][c] = *reinterpret_cast<const uint4 *>(w + (size_t)(n0 + 8 * j + g) * K + k0 +
                                                            32 * c + 8 * t);
        }
    }
    pdl_wait();
    // thread i copies chunk i % cpr of rows i / cpr, + per, + 2 per, ... (one division)
    const int cpr = nch * 32 / VEC;  // 16-byte chunks per staged row
    const int per = blockDim.x / cpr, cc = threadIdx.x % cpr;
    if ((int)threadIdx.x < per * cpr) {
        const T *src0 = a + (size_t)m0 * K + k0 + cc * VEC;
        for (int r = threadIdx.x / cpr; r < 16 * MT; r += per) {
            const bool live = r < rows;
            const T *src = live ? src0 + (size_t)r * K : a;
            const unsigned dst = (unsigned)__cvta_generic_to_shared(as + r * stride + cc * VEC);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                         "r"(live ? 16 : 0)
                         : "memory");
        }
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    float acc[MT][2][4] = {};
#pragma unroll
    for (int c = 0; c < SK_KS / 32; ++c) {
        if (c < nch) {
#pragma unroll
            for (int i0 = 0; i0 < MT; i0 += G) {
                uint4 lo[G], hi[G];
#pragma unroll
                for (int i = 0; i < G; ++i) {
                    const T *ra = as + (16 * (i0 + i) + g) * stride + 32 * c + 8 * t;
                    lo[i] = *reinterpret_cast<const uint4 *>(ra);
                    hi[i] = *reinterpret_cast<const uint4 *>(ra + 8 * stride);
                }
#pragma unroll
                for (int i = 0; i < G; ++i)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        sk_mma(acc[i0 + i][j], lo[i].x, hi[i].x, lo[i].y, hi[i].y, wr[j][c].x,
                               wr[j][c].y, T());
#pragma unroll
                for (int i = 0; i < G; ++i)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        sk_mma(acc[i0 + i][j], lo[i].z, hi[i].z, lo[i].w, hi[i].w, wr[j][c].z,
                               wr[j][c].w, T());
            }
        }
    }
    float *p = part + (size_t)blockIdx.y * M * N;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int ra = m0 + 16 * i + g, rb = ra + 8;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = n0 + 8 * j + 2 * t;
            if (ra < M)
                *reinterpret_cast<float2 *>(p + (size_t)ra * N + n) =
                    make_float2(acc[i][j][0], acc[i][j][1]);
            if (rb < M)
                *reinterpret_cast<float2 *>(p + (size_t)rb * N + n) =
                    make_float2(acc[i][j][2], acc[i][j][3]);
        }
    }
}

// One block per row: x = round(sum of the row's slices, in slice order), h = round(x + res)
// and y = round(round(h * rsqrt(mean(h^2) + eps)) * w), as add_rms_norm of the rounded product;
// out [2, rows, cols] holds h then y. cols a multiple of 4, res, w and out 8-byte aligned (4
// elements per thread); shared memory: cols floats.
template <typename T>
__device__ void add_norm_parts(const float *part, int slices, const T *res, const T *w, T *out,
                               int rows, int cols, float eps) {
    extern __shared__ float buf[];
    __shared__ float red[32];
    pdl_wait();
    const size_t r0 = (size_t)blockIdx.x * cols, plane = (size_t)rows * cols;
    float ss = 0.f;
    for (int i = threadIdx.x * 4; i < cols; i += blockDim.x * 4) {
        float4 s = *reinterpret_cast<const float4 *>(part + r0 + i);
        // unrolled so that several slices' loads are in flight (the sum stays in slice order)
#pragma unroll 8
        for (int q = 1; q < slices; ++q) {
            const float4 v = *reinterpret_cast<const float4 *>(part + q * plane + r0 + i);
            s.x += v.x;
            s.y += v.y;
            s.z += v.z;
            s.w += v.w;
        }
        const float sv[4] = {s.x, s.y, s.z, s.w};
        const uint2 rv = *reinterpret_cast<const uint2 *>(res + r0 + i);
        const T *rt = reinterpret_cast<const T *>(&rv);
        uint2 hv;
        T *ht = reinterpret_cast<T *>(&hv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            ht[e] = fromf<T>(rnd<T>(sv[e]) + tof(rt[e]));
            const float v = tof(ht[e]);
            buf[i + e] = v;
            ss += v * v;
        }
        *reinterpret_cast<uint2 *>(out + r0 + i) = hv;
    }
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / cols + eps);
    T *y = out + plane + r0;
    for (int i = threadIdx.x * 4; i < cols; i += blockDim.x * 4) {
        const uint2 wv = *reinterpret_cast<const uint2 *>(w + i);
        const T *wt = reinterpret_cast<const T *>(&wv);
        uint2 yv;
        T *yt = reinterpret_cast<T *>(&yv);
#pragma unroll
        for (int e = 0; e < 4; ++e) yt[e] = norm_scale<T>(buf[i + e], inv, tof(wt[e]));
        *reinterpret_cast<uint2 *>(y + i) = yv;
    }
}

#define SPLIT_K_MT(T, SUF, MT)                                                                   \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32) split_k_linear_##MT##_##SUF(     \
        const T *a, const T *w, float *part, int M, int K, int N, int ks) {                      \
        pdl_trigger();                                                                           \
        split_k_linear<T, MT>(a, w, part, M, K, N, ks);                                          \
    }
#define SPLIT_K(T, SUF)                                                                          \
    SPLIT_K_MT(T, SUF, 1)                                                                        \
    SPLIT_K_MT(T, SUF, 2)                                                                        \
    SPLIT_K_MT(T, SUF, 4)                                                                        \
    SPLIT_K_MT(T, SUF, 8)                                                                        \
    extern "C" __global__ void add_norm_parts_##SUF(const float *part, int slices, const T *res, \
                                                    const T *w, T *out, int rows, int cols,      \
                                                    float eps) {                                 \
        pdl_trigger();                                                                           \
        add_norm_parts<T>(part, slices, res, w, out, rows, cols, eps);                           \
    }
SPLIT_K(__nv_bfloat16, bf16)
SPLIT_K(__half, f16)
