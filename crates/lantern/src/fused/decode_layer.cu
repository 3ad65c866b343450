// One LlamaGen block of a decode step (one new token in each of M <= MM batch rows) as a
// single persistent kernel (launched by fused/cuda_layer.rs; opt-in, see fused/layer.rs for
// why: it measured slower than the separate kernels, docs/BENCHMARKS.md §0000000b). A decode step's block is weight-
// bandwidth bound, and as separate kernels each of its ~7 launches pays a ramp-up and a tail
// (docs/BENCHMARKS.md §0000: even a kernel that only streams a weight matrix reaches ~53% of
// the copy bound). Here one grid, as large as stays resident, runs five phases separated by
// grid-wide barriers:
//   A  RMSNorm(x), wqkv; queries rotated into qr, keys rotated and values written into the
//      cache at slot `at` (rows in pairs, so that a warp holds both halves of a RoPE pair)
//   B  attention of each (batch row, head) over chunks of keys; the last block of a head to
//      finish combines the chunks
//   C  wo + residual -> hm
//   D  RMSNorm(hm), [w1 | w3], SwiGLU -> f
//   E  w2 + residual (hm) -> out
// The weights stream through shared memory: every warp copies the rows of its units of all
// four matrix phases, in the order it multiplies them, into a private ring of stages that runs
// ahead of its arithmetic across the barriers (Stream below), so that DRAM keeps working while
// a barrier, the staging of x or the attention runs.
// Numerics follow the separate kernels: small_linear's per-lane chunk order and roundings,
// write_kv's rotation, the one-query attention's f32 softmax; only the attention's key sums
// are split into chunks, and the RMSNorm's sum of squares is ordered by this block size.
#include "common.cuh"

namespace {

constexpr int NW = 8;        // warps per block
constexpr int CK_MAX = 128;  // keys per attention chunk, at most

__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long *p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// Grid-wide barrier (every block resident) on one 64-bit word: generation in the high half,
// arrivals in the low half. The last block to arrive turns (g, G) into (g + 1, 0) with one
// atomic, so the word is ready for the next barrier and the next launch; the others wait for
// the generation to change. Thread 0 of each block keeps the generation it expects in `gen`
// (read once per launch: it cannot change before every block has arrived). One atomic round
// trip per block plus the wait, instead of a read, an arrival, a reset and an increment.
struct GridBarrier {
    unsigned long long *word;
    unsigned gen;
    __device__ void init(unsigned long long *w) {
        word = w;
        if (threadIdx.x == 0) gen = (unsigned)(ld_acquire(w) >> 32);
    }
    __device__ void sync() {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            const unsigned long long old = atomicAdd(word, 1ull);
            if ((unsigned)old == gridDim.x - 1) {
                atomicAdd(word, (1ull << 32) - gridDim.x);
            } else {
                while ((unsigned)(ld_acquire(word) >> 32) == gen) {
                }
            }
            ++gen;
            __threadfence();
        }
        __syncthreads();
    }
};

// Rows [M][K] of src (written by other blocks of this launch: loaded through L2) into xs in
// the model dtype; with norm_w each row RMS-normalised as add_rms_norm does (its result is
// rounded to T, so T holds it exactly; ns: K elements of scratch). Loads go out four per
// thread before any is used (a loop that waited for each would pay L2's latency per step).
template <typename T>
__device__ void stage(const T *src, int M, int K, const T *norm_w, float eps, T *xs, T *ns,
                      float *red) {
    constexpr int VEC = 16 / sizeof(T);
    const uint4 *s4 = reinterpret_cast<const uint4 *>(src);
    const uint4 *n4 = reinterpret_cast<const uint4 *>(norm_w);
    uint4 *x4 = reinterpret_cast<uint4 *>(xs);
    uint4 *w4 = reinterpret_cast<uint4 *>(ns);
    const int nx = M * K / VEC, n = norm_w ? nx + K / VEC : nx;
    for (int i0 = threadIdx.x; i0 < n; i0 += 4 * blockDim.x) {
        uint4 u[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = i0 + r * blockDim.x;
            if (i < nx) u[r] = __ldcg(s4 + i);
            else if (i < n) u[r] = __ldg(n4 + (i - nx));
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = i0 + r * blockDim.x;
            if (i < nx) x4[i] = u[r];
            else if (i < n) w4[i - nx] = u[r];
        }
    }
    __syncthreads();
    if (norm_w) rms_norm_rows<T>(xs, M, K, ns, eps, red);
}

// Weight streaming. Weights do not depend on anything this kernel computes, so each warp
// streams the weight rows of all its units of all four matrix phases, in the order it will
// multiply them, through a private ring of `stages` (at most NS) shared-memory stages with
// asynchronous copies (cp.async, 16 bytes per lane). Its copies run ahead of its arithmetic by
// that many stages across the grid barriers and the staging of x, so DRAM keeps streaming
// while a phase waits.
// A stage is SL 16-byte loads per lane: R rows (1 or 2) x SL / R loads of each. A lane copies,
// and later reads, only its own 16-byte pieces (chunks c0 + 32 c + lane of each row, the
// per-lane chunk order of small_linear), so no lane waits for another.
constexpr int NS = 5;  // stages per warp's ring (at most in flight: `stages`, 1..NS)
constexpr int SL = 8;  // 16-byte loads per lane per stage

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Waits until at most n (0..NS - 1, uniform over the warp) groups are in flight.
__device__ __forceinline__ void cp_wait_n(int n) {
    switch (n) {
    case 0: cp_wait<0>(); break;
    case 1: cp_wait<1>(); break;
    case 2: cp_wait<2>(); break;
    case 3: cp_wait<3>(); break;
    default: cp_wait<NS - 1>(); break;
    }
}

// This warp's first unit of a phase (its global warp index).
__device__ __forceinline__ int first_unit() { return blockIdx.x * NW + (threadIdx.x >> 5); }

// One matrix phase: units of R weight rows of K elements (row r of unit u: u * ustride +
// r * rstride).
template <typename T> struct Phase {
    const T *w;
    int K, units, R, ustride, rstride;
    __device__ int row(int u, int r) const { return u * ustride + r * rstride; }
};

// A warp's weight stream over the phases A, C, D, E: where its next stage to copy starts
// (phase, unit, first chunk), and the ring it copies into.
template <typename T> struct Stream {
    Phase<T> a, c, d, e;  // (not an array: indexing one by the phase number would put the
                          // stream in local memory, a round trip per stage)
    __device__ Phase<T> ph(int i) const { return i == 0 ? a : i == 1 ? c : i == 2 ? d : e; }
    uint4 *ring;  // this warp's [stages][SL][32]
    int p, u, c0, issued, stages;
    __device__ void init(uint4 *r, int n) {
        ring = r;
        stages = n;
        p = 0;
        u = first_unit();
        c0 = 0;
        issued = 0;
        skip_empty();
    }
    __device__ void skip_empty() {
        while (p < 4 && u >= ph(p).units) {
            ++p;
            u = first_unit();
        }
    }
    // Copies the next stage (nothing once the stream is done) and commits a group, so that
    // the groups in flight always number the stages issued but not yet consumed.
    __device__ void issue() {
        if (p < 4) {
            constexpr int VEC = 16 / sizeof(T);
            const Phase<T> f = ph(p);
            const int lane = threadIdx.x & 31, nch = f.K / VEC, cl = SL / f.R;
            uint4 *slot = ring + (issued % stages) * SL * 32;
            for (int r = 0; r < f.R; ++r) {
                const uint4 *wr = reinterpret_cast<const uint4 *>(f.w + (size_t)f.row(u, r) * f.K);
#pragma unroll
                for (int c = 0; c < SL; ++c) {
                    const int ch = c0 + c * 32 + lane;
                    if (c < cl && ch < nch) cp_async16(slot + (r * cl + c) * 32 + lane, wr + ch);
                }
            }
            c0 += 32 * cl;
            if (c0 >= nch) {
                c0 = 0;
                u += gridDim.x * NW;
                skip_empty();
            }
        }
        cp_commit();
        ++issued;
    }
    // The oldest stage in flight, once its copies have landed. Every stage taken is followed
    // by an issue(), so `stages` stages are in flight and the oldest sits in the slot the next
    // issue() fills: issued % stages.
    __device__ const uint4 *oldest() {
        cp_wait_n(stages - 1);
        return ring + (issued % stages) * SL * 32;
    }
};

// Few-row matrix-vector products of phase `f` (R rows per unit, its stages taken from the
// stream in order): warp units u = global warp, + all warps, ...; epi(u, lane's value of row r
// for batch row `lane`) runs on every lane after the reduction. A lane sums chunks lane,
// lane + 32, ... in order, like small_linear. `work` false: the stages are consumed but not
// multiplied (a timing diagnostic).
template <typename T, int MM, int R, typename Epi>
__device__ void gemv(Stream<T> &st, const Phase<T> &f, const T *xs, int M,
                     bool work, Epi epi) {
    constexpr int VEC = 16 / sizeof(T), CL = SL / R;
    const int lane = threadIdx.x & 31;
    const int K = f.K, nch = K / VEC;
    for (int u = first_unit(); u < f.units; u += gridDim.x * NW) {
        float acc[R][MM];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < MM; ++m) acc[r][m] = 0.f;
        for (int c0 = 0; c0 < nch; c0 += 32 * CL) {
            const uint4 *slot = st.oldest();
            if (work) {
#pragma unroll
                for (int c = 0; c < CL; ++c) {
                    const int ch = c0 + c * 32 + lane;
                    if (ch < nch) {
                        uint4 wv[R];
#pragma unroll
                        for (int r = 0; r < R; ++r) wv[r] = slot[(r * CL + c) * 32 + lane];
#pragma unroll
                        for (int m = 0; m < MM; ++m) {
                            if (m < M) {
                                // the lane's 8 elements of x: one conflict-free 16-byte read
                                const uint4 xu =
                                    *reinterpret_cast<const uint4 *>(xs + m * K + ch * VEC);
                                const T *xt = reinterpret_cast<const T *>(&xu);
#pragma unroll
                                for (int e = 0; e < VEC; ++e) {
                                    const float xv = tof(xt[e]);
#pragma unroll
                                    for (int r = 0; r < R; ++r)
                                        acc[r][m] += xv * tof(reinterpret_cast<const T *>(&wv[r])[e]);
                                }
                            }
                        }
                    }
                }
            }
            // the slot is read (its values are in the sums): it takes the next stage
            st.issue();
        }
        float mine[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            mine[r] = 0.f;
#pragma unroll
            for (int m = 0; m < MM; ++m) {
                for (int o = 16; o > 0; o >>= 1)
                    acc[r][m] += __shfl_xor_sync(0xffffffff, acc[r][m], o);
                if (m == lane) mine[r] = acc[r][m];
            }
        }
        epi(u, mine);
    }
}

template <typename T, int HD, int MM>
__device__ void decode_layer(const T *x, T *out, const T *wqkv, const T *attn_norm,
                             const T *wo, const T *ffn_norm, const T *w13, const T *w2,
                             float eps, const float *rope, int rope_rows,
                             T *kv, size_t base, int n_layer, int max_len, int layer, int at,
                             int keys, const float *mask, long long mask_b, T *qr, T *att,
                             T *hm, T *f, float *part, unsigned *sync, int M, int D, int h,
                             int kvh, int F, int ck, int ring_at, int stages, int skip) {
    extern __shared__ __align__(16) unsigned char smraw[];
    float *sm = reinterpret_cast<float *>(smraw);
    __shared__ float red[32];
    __shared__ int last;
    constexpr int VEC = 16 / sizeof(T);
    const int A = h * HD, Q = (h + 2 * kvh) * HD, pairs = HD / 2;
    const int kmax = max(max(D, A), F);
    T *xs = reinterpret_cast<T *>(smraw), *ns = xs + MM * kmax;
    unsigned *cnt = sync + 2;  // sync[0..2]: the barrier word
    GridBarrier bar;
    const int lane = threadIdx.x & 31;
    const size_t plane = cache_plane(n_layer, M, kvh, max_len, HD);
    pdl_trigger();
    // the weight stream (phases A: row pairs of wqkv, C: rows of wo, D: gate row u with up row
    // F + u, E: rows of w2); its first NS stages go out before waiting for the previous kernel
    Stream<T> st;
    st.a = {wqkv, D, Q / 2, 2, 2, 1};
    st.c = {wo, A, D, 1, 1, 0};
    st.d = {w13, D, F, 2, 1, F};
    st.e = {w2, F, D, 1, 1, 0};
    st.init(reinterpret_cast<uint4 *>(smraw + ring_at) + (threadIdx.x >> 5) * stages * SL * 32,
            stages);
    for (int i = 0; i < stages; ++i) st.issue();
    pdl_wait();
    bar.init(reinterpret_cast<unsigned long long *>(sync));

    const bool loads = !(skip & 32);
    // A: queries, keys, values
    if (loads) stage(x, M, D, attn_norm, eps, xs, ns, red);
    gemv<T, MM, 2>(
        st, st.a, xs, M, !(skip & 1),
        [&](int u, const float *a) {
            if (lane >= M) return;
            const int n = 2 * u, m = lane;
            const float a0 = rnd<T>(a[0]), a1 = rnd<T>(a[1]);
            const float *cs = rope + (size_t)(rope_rows == 1 ? 0 : m) * pairs * 2;
            const int p = (n % HD) / 2;
            const float c = cs[2 * p], s = cs[2 * p + 1];
            float r0, r1;
            rope_pair(a0, a1, c, s, r0, r1);
            if (n < A) {
                qr[(size_t)m * A + n] = fromf<T>(r0);
                qr[(size_t)m * A + n + 1] = fromf<T>(r1);
            } else if (n < A + kvh * HD) {
                const int kh = (n - A) / HD;
                const size_t o = base + cache_head(layer, M, m, kvh, kh, max_len, HD) +
                                 (size_t)at * HD + 2 * p;
                kv[o] = fromf<T>(r0);
                kv[o + 1] = fromf<T>(r1);
            } else {
                const int kh = (n - A - kvh * HD) / HD;
                const size_t o = base + plane + cache_head(layer, M, m, kvh, kh, max_len, HD) +
                                 (size_t)at * HD + 2 * p;
                kv[o] = fromf<T>(a0);
                kv[o + 1] = fromf<T>(a1);
            }
        });
    if (!(skip & 64)) bar.sync();

    // B: attention; unit (bb, hh, chunk), chunks of one head consecutive
    {
        constexpr int LPK = HD / VEC, KPR = NW * 32 / LPK, RMAX = (CK_MAX + KPR - 1) / KPR;
        const int nch = (keys + ck - 1) / ck, units = M * h * nch;
        const int sub = threadIdx.x / LPK, col = (threadIdx.x % LPK) * VEC;
        const int warp = threadIdx.x >> 5;
        const float scale = rsqrtf((float)HD);
        float *ps = sm;  // [NW][HD]
        for (int u = (skip & 2) ? units : blockIdx.x; u < units; u += gridDim.x) {
            const int c = u % nch, hh = (u / nch) % h, bb = u / (nch * h);
            const int kh = hh / (h / kvh), j0 = c * ck, j1 = min(keys, j0 + ck);
            const uint4 qu = __ldcg(reinterpret_cast<const uint4 *>(qr + ((size_t)bb * h + hh) * HD + col));
            float qv[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) qv[e] = tof(reinterpret_cast<const T *>(&qu)[e]) * scale;
            const size_t head = base + cache_head(layer, M, bb, kvh, kh, max_len, HD);
            const T *kp = kv + head, *vp = kv + plane + head;
            uint4 kr[RMAX], vr[RMAX];
            float sc[RMAX];
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const int j = j0 + r * KPR + sub;
                const bool ok = r * KPR < ck && j < j1;
                kr[r] = ok ? __ldcg(reinterpret_cast<const uint4 *>(kp + (size_t)j * HD + col))
                           : make_uint4(0, 0, 0, 0);
                vr[r] = ok ? __ldcg(reinterpret_cast<const uint4 *>(vp + (size_t)j * HD + col))
                           : make_uint4(0, 0, 0, 0);
                sc[r] = ok ? (mask ? __ldg(mask + bb * mask_b + j) : 0.f) : -INFINITY;
            }
            float lmax = -INFINITY;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                float d = 0.f;
                const T *t = reinterpret_cast<const T *>(&kr[r]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) d += qv[e] * tof(t[e]);
#pragma unroll
                for (int o = 1; o < LPK; o <<= 1) d += __shfl_xor_sync(0xffffffff, d, o);
                const bool hidden = isinf(sc[r]) && sc[r] < 0.f;
                sc[r] = hidden ? -INFINITY : d + sc[r];
                lmax = fmaxf(lmax, sc[r]);
            }
            const float mx = block_max(lmax, red);
            float lsum = 0.f, acc[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const float p = sc[r] == -INFINITY ? 0.f : __expf(sc[r] - mx);
                if (threadIdx.x % LPK == 0) lsum += p;
                const T *t = reinterpret_cast<const T *>(&vr[r]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[e] += p * tof(t[e]);
            }
            const float l = block_sum(lsum, red);
#pragma unroll
            for (int o = LPK; o < 32; o <<= 1)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[e] += __shfl_xor_sync(0xffffffff, acc[e], o);
            if (lane < LPK)
#pragma unroll
                for (int e = 0; e < VEC; ++e) ps[warp * HD + col + e] = acc[e];
            __syncthreads();
            const int t = threadIdx.x;
            float v = 0.f;
            if (t < HD)
                for (int w = 0; w < NW; ++w) v += ps[w * HD + t];
            T *o = att + ((size_t)bb * h + hh) * HD;
            if (nch == 1) {
                if (t < HD) o[t] = fromf<T>(v * (l > 0.f ? 1.f / l : 0.f));
            } else {
                float *pp = part + (size_t)u * (HD + 2);
                if (t < HD) pp[t] = v;
                if (t == 0) {
                    pp[HD] = mx;
                    pp[HD + 1] = l;
                }
                __threadfence();
                __syncthreads();
                if (t == 0) last = atomicAdd(cnt + bb * h + hh, 1u) == (unsigned)(nch - 1);
                __syncthreads();
                if (last) {
                    // the head's chunks, CG at a time through shared memory (one L2 round
                    // trip per group), merged with a running maximum
                    __threadfence();
                    constexpr int CG = 16;
                    float *cs = ps + NW * HD;  // [CG][HD + 2]
                    float gm = -INFINITY, L = 0.f, O = 0.f;
                    for (int g0 = 0; g0 < nch; g0 += CG) {
                        const float *p0 = part + (size_t)(u - c + g0) * (HD + 2);
                        const int n = min(CG, nch - g0) * (HD + 2);
                        for (int i0 = t; i0 < n; i0 += 4 * blockDim.x) {
                            float v4[4];
#pragma unroll
                            for (int r = 0; r < 4; ++r) {
                                const int i = i0 + r * blockDim.x;
                                v4[r] = i < n ? __ldcg(p0 + i) : 0.f;
                            }
#pragma unroll
                            for (int r = 0; r < 4; ++r)
                                if (i0 + r * blockDim.x < n) cs[i0 + r * blockDim.x] = v4[r];
                        }
                        __syncthreads();
                        if (t < HD) {
                            const int ng = min(CG, nch - g0);
                            float gmx = gm;
                            for (int cc = 0; cc < ng; ++cc) gmx = fmaxf(gmx, cs[cc * (HD + 2) + HD]);
                            if (gmx != -INFINITY) {
                                const float k = gm == -INFINITY ? 0.f : __expf(gm - gmx);
                                L *= k;
                                O *= k;
                                for (int cc = 0; cc < ng; ++cc) {
                                    const float mc = cs[cc * (HD + 2) + HD];
                                    const float wgt = mc == -INFINITY ? 0.f : __expf(mc - gmx);
                                    L += wgt * cs[cc * (HD + 2) + HD + 1];
                                    O += wgt * cs[cc * (HD + 2) + t];
                                }
                                gm = gmx;
                            }
                        }
                        __syncthreads();
                    }
                    if (t < HD) o[t] = fromf<T>(O * (L > 0.f ? 1.f / L : 0.f));
                    if (t == 0) cnt[bb * h + hh] = 0u;
                }
            }
            __syncthreads();
        }
    }
    if (!(skip & 64)) bar.sync();

    // C: wo + residual
    if (loads) stage(att, M, A, (const T *)nullptr, 0.f, xs, ns, red);
    gemv<T, MM, 1>(
        st, st.c, xs, M, !(skip & 4),
        [&](int u, const float *a) {
            if (lane >= M) return;
            const size_t o = (size_t)lane * D + u;
            hm[o] = fromf<T>(tof(__ldcg(x + o)) + rnd<T>(a[0]));
        });
    if (!(skip & 64)) bar.sync();

    // D: RMSNorm, gate/up, SwiGLU
    if (loads) stage(hm, M, D, ffn_norm, eps, xs, ns, red);
    gemv<T, MM, 2>(
        st, st.d, xs, M, !(skip & 8),
        [&](int u, const float *a) {
            if (lane >= M) return;
            f[(size_t)lane * F + u] = swiglu<T>(rnd<T>(a[0]), rnd<T>(a[1]));
        });
    if (!(skip & 64)) bar.sync();

    // E: w2 + residual
    if (loads) stage(f, M, F, (const T *)nullptr, 0.f, xs, ns, red);
    gemv<T, MM, 1>(
        st, st.e, xs, M, !(skip & 16),
        [&](int u, const float *a) {
            if (lane >= M) return;
            const size_t o = (size_t)lane * D + u;
            out[o] = fromf<T>(tof(__ldcg(hm + o)) + rnd<T>(a[0]));
        });
}

}  // namespace

#define LAYER(T, HD, MM, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(NW * 32, 1) NAME(                               \
        const T *x, T *out, const T *wqkv, const T *attn_norm, const T *wo, const T *ffn_norm,  \
        const T *w13, const T *w2, float eps, const float *rope, int rope_rows, T *kv,          \
        unsigned long long base, int n_layer, int max_len, int layer, int at, int keys,         \
        const float *mask, long long mask_b, T *qr, T *att, T *hm, T *f, float *part,           \
        unsigned *sync, int M, int D, int h, int kvh, int F, int ck, int ring_at, int stages,   \
        int skip) {                                                                             \
        decode_layer<T, HD, MM>(                                                                \
            x, out, wqkv, attn_norm, wo, ffn_norm, w13, w2, eps, rope, rope_rows, kv, base,     \
            n_layer, max_len, layer, at, keys, mask, mask_b, qr, att, hm, f, part, sync, M, D,  \
            h, kvh, F, ck, ring_at, stages, skip);                                              \
    }
#define LAYERS_HD(T, HD, SUF)                                                                   \
    LAYER(T, HD, 1, decode_layer_##HD##_1_##SUF)                                                \
    LAYER(T, HD, 2, decode_layer_##HD##_2_##SUF)                                                \
    LAYER(T, HD, 4, decode_layer_##HD##_4_##SUF)                                                \
    LAYER(T, HD, 8, decode_layer_##HD##_8_##SUF)
#define LAYERS(T, SUF)                                                                          \
    LAYERS_HD(T, 32, SUF)                                                                       \
    LAYERS_HD(T, 64, SUF)                                                                       \
    LAYERS_HD(T, 128, SUF)
LAYERS(__nv_bfloat16, bf16)
LAYERS(__half, f16)
