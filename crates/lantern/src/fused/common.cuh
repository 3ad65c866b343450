// Helpers shared by lantern's CUDA kernels (kernels.cu, decode_layer.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Programmatic dependent launch (launch.rs): let the next kernel on the stream be scheduled
// now, and wait until the previous kernel has finished and its writes are visible. Both are
// no-ops for a plain launch. Every kernel triggers first and waits before its first read of
// another kernel's output and before any write.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

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
// SwiGLU's element as the reference rounds it: round(round(silu(g)) * u), g and u already in T.
template <typename T> __device__ __forceinline__ T swiglu(float g, float u) {
    return fromf<T>(rnd<T>(g / (1.f + __expf(-g))) * u);
}
// RMSNorm's element as the reference rounds it: round(round(v * inv) * w).
template <typename T> __device__ __forceinline__ T norm_scale(float v, float inv, float w) {
    return fromf<T>(rnd<T>(v * inv) * w);
}

// RoPE of one pair (x0, x1) with (cos, sin) = (c, s), in f32. Every kernel rotates through
// this one expression, so that a key rotated by one kernel equals the same key rotated by
// another bit for bit (the compiler contracts the same expression the same way).
__device__ __forceinline__ void rope_pair(float x0, float x1, float c, float s, float &r0,
                                          float &r1) {
    r0 = x0 * c - x1 * s;
    r1 = x1 * c + x0 * s;
}

// Asks the L2 cache for the 128-byte line at p (no data returned, no ordering: safe before a
// PDL wait, even on lines the previous kernel is still writing).
__device__ __forceinline__ void prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// The cache tensor is [2, n_layer, b, kvh, max_len, hd] (K plane, then V plane). Element
// offset of slot 0 of (layer, batch row, head) in the K plane, and the distance to the V plane.
__device__ __forceinline__ size_t cache_head(int layer, int b, int bb, int kvh, int kh,
                                             int max_len, int hd) {
    return (((size_t)layer * b + bb) * kvh + kh) * max_len * hd;
}
__device__ __forceinline__ size_t cache_plane(int n_layer, int b, int kvh, int max_len, int hd) {
    return (size_t)n_layer * b * kvh * max_len * hd;
}

// The keys a fixed-shape step visits. Its cache holds filled slots [0, filled), empty slots up
// to the staging block at `at`, then the block (the mask hides the empty ones). With `live` (a
// device copy of the filled length, written before each graph replay) attention skips the
// empty slots: visited key v is slot v below the filled length, else at + (v - filled);
// without it every slot [0, keys) is visited in order.
struct KeyRange {
    int lo, at, n; // slots [0, lo) then [at, keys): n keys
    __device__ __forceinline__ int slot(int v) const { return v < lo ? v : at + (v - lo); }
};
// The range for a filled length `filled` (on: a fixed-shape step's; off: every slot).
__device__ __forceinline__ KeyRange key_range(bool on, int filled, int at, int keys) {
    if (!on) return {keys, keys, keys};
    const int lo = min(max(filled, 0), keys), a = max(min(at, keys), lo);
    return {lo, a, lo + keys - a};
}
// The filled length behind `live` (0 without it). Read before a kernel's PDL wait it only
// guides prefetches; the value attention relies on is read after the wait.
__device__ __forceinline__ int filled_of(const int *live) { return live ? *live : 0; }

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

// Max over the block; every thread gets it. `red` holds 32 floats.
__device__ __forceinline__ float block_max(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = l < nw ? red[l] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Normalises M rows of K elements of xs (shared memory, f32 or the model dtype T) in place as
// add_rms_norm does: x <- round(round(x * rsqrt(mean(x^2) + eps)) * w), with w K elements (f32
// or T). All threads of the block call it; it ends with a block barrier.
template <typename T, typename S, typename W>
__device__ void rms_norm_rows(S *xs, int M, int K, const W *w, float eps, float *red) {
    for (int m = 0; m < M; ++m) {
        float ss = 0.f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float v = tof(xs[m * K + k]);
            ss += v * v;
        }
        ss = block_sum(ss, red);
        const float inv = rsqrtf(ss / K + eps);
        for (int k = threadIdx.x; k < K; k += blockDim.x)
            xs[m * K + k] = fromf<S>(rnd<T>(rnd<T>(tof(xs[m * K + k]) * inv) * tof(w[k])));
    }
    __syncthreads();
}
