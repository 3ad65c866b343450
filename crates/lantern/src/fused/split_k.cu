// Projections of many rows (tree verification, prefill, drafter levels) whose sum over k is
// split into slices, and the residual add + RMSNorm that sums the slices (fused/split_k.rs).
// Compiled to PTX by build.rs (`cuda` feature).
#include "common.cuh"

// Warps per block; each computes 16 output columns for every row of its band.
constexpr int SK_WARPS = 4;
// Output columns per block.
constexpr int SK_BN = 16 * SK_WARPS;
// m16 tiles per band (128 rows).
constexpr int SK_MT = 8;
// Most k per slice: a warp keeps its two weight rows of the slice in registers.
constexpr int SK_KS = 256;
// Elements of padding after each staged row: a row then starts 64 bytes (mod 128) after the
// previous one, so the 8 lanes of a 16-byte fragment load (rows g, g + 1; chunks t = 0..3) hit
// distinct bank groups.
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
// Grid (N / SK_BN, slices, bands of 128 rows); a [M, K] (SWIGLU: gate/up rows gu [M, 2K], gate
// first, and a = swiglu(gate, up) as silu_mul rounds it), w [N, K], part [slices, M, N].
//
// Register layouts (lane = 4 g + t): the sum over k may run in any order, so a thread takes
// 16-byte chunks (8 consecutive k, 32 c + 8 t) of a weight row and of a staged row, and a
// chunk's four words serve directly as the B (weights) and A (rows) fragments of two k16
// steps: step 0 words x, y, step 1 words z, w. Warp w's n8 tiles j = 0, 1 are the columns
// n0 + 8 j + g, n0 = 64 blockIdx.x + 16 w; the weight loads are issued before the PDL wait (the
// previous kernel never writes weights), the rows are staged in shared memory after it.
template <typename T, bool SWIGLU>
__device__ void split_k_linear(const T *a, const T *w, float *part, int M, int K, int N,
                               int ks) {
    extern __shared__ __align__(16) unsigned char sk_smem[];
    T *as = reinterpret_cast<T *>(sk_smem);  // [band rows][ks + SK_PAD]
    constexpr int VEC = 16 / sizeof(T);      // 8
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * SK_BN + warp * 16;
    const int k0 = blockIdx.y * ks;
    const int nch = (min(ks, K - k0)) / 32;
    const int m0 = blockIdx.z * 16 * SK_MT;
    const int rows = min(M - m0, 16 * SK_MT);
    const int mt = (rows + 15) / 16;
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
    const int cpr = nch * 32 / VEC;  // 16-byte chunks per staged row
    for (int i = threadIdx.x; i < 16 * mt * cpr; i += blockDim.x) {
        const int r = i / cpr, c = i - r * cpr;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const size_t m = m0 + r;
            if (SWIGLU) {
                const T *gr = a + m * 2 * K + k0 + c * VEC;
                const uint4 gv = *reinterpret_cast<const uint4 *>(gr);
                const uint4 uv = *reinterpret_cast<const uint4 *>(gr + K);
                const T *gt = reinterpret_cast<const T *>(&gv);
                const T *ut = reinterpret_cast<const T *>(&uv);
                T *vt = reinterpret_cast<T *>(&v);
#pragma unroll
                for (int e = 0; e < VEC; ++e) vt[e] = swiglu<T>(tof(gt[e]), tof(ut[e]));
            } else {
                v = *reinterpret_cast<const uint4 *>(a + m * K + k0 + c * VEC);
            }
        }
        *reinterpret_cast<uint4 *>(as + r * stride + c * VEC) = v;
    }
    __syncthreads();
    float acc[SK_MT][2][4];
#pragma unroll
    for (int i = 0; i < SK_MT; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
#pragma unroll
    for (int c = 0; c < SK_KS / 32; ++c) {
        if (c < nch) {
#pragma unroll
            for (int i = 0; i < SK_MT; ++i) {
                if (i < mt) {
                    const T *ra = as + (16 * i + g) * stride + 32 * c + 8 * t;
                    const uint4 lo = *reinterpret_cast<const uint4 *>(ra);
                    const uint4 hi = *reinterpret_cast<const uint4 *>(ra + 8 * stride);
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        sk_mma(acc[i][j], lo.x, hi.x, lo.y, hi.y, wr[j][c].x, wr[j][c].y, T());
                        sk_mma(acc[i][j], lo.z, hi.z, lo.w, hi.w, wr[j][c].z, wr[j][c].w, T());
                    }
                }
            }
        }
    }
    float *p = part + (size_t)blockIdx.y * M * N;
#pragma unroll
    for (int i = 0; i < SK_MT; ++i) {
        if (i < mt) {
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
}

// One block per row: x = round(sum of the row's slices, in slice order), h = round(x + res)
// and y = round(round(h * rsqrt(mean(h^2) + eps)) * w), as add_rms_norm of the rounded product;
// out [2, rows, cols] holds h then y. cols a multiple of 4; shared memory: cols floats.
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
        for (int q = 1; q < slices; ++q) {
            const float4 v = *reinterpret_cast<const float4 *>(part + q * plane + r0 + i);
            s.x += v.x;
            s.y += v.y;
            s.z += v.z;
            s.w += v.w;
        }
        const float sv[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const T h = fromf<T>(rnd<T>(sv[e]) + tof(res[r0 + i + e]));
            out[r0 + i + e] = h;
            const float v = tof(h);
            buf[i + e] = v;
            ss += v * v;
        }
    }
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / cols + eps);
    T *y = out + plane + r0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        y[i] = norm_scale<T>(buf[i], inv, tof(w[i]));
}

#define SPLIT_K(T, SUF)                                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)                                  \
        split_k_linear_##SUF(const T *a, const T *w, float *part, int M, int K, int N, int ks) { \
        pdl_trigger();                                                                           \
        split_k_linear<T, false>(a, w, part, M, K, N, ks);                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32) split_k_swiglu_linear_##SUF(     \
        const T *a, const T *w, float *part, int M, int K, int N, int ks) {                      \
        pdl_trigger();                                                                           \
        split_k_linear<T, true>(a, w, part, M, K, N, ks);                                        \
    }                                                                                            \
    extern "C" __global__ void add_norm_parts_##SUF(const float *part, int slices, const T *res, \
                                                    const T *w, T *out, int rows, int cols,      \
                                                    float eps) {                                 \
        pdl_trigger();                                                                           \
        add_norm_parts<T>(part, slices, res, w, out, rows, cols, eps);                           \
    }
SPLIT_K(__nv_bfloat16, bf16)
SPLIT_K(__half, f16)
