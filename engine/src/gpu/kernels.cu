// fleetmerge's CUDA kernels, compiled at run time by NVRTC (no nvcc at build
// time). Compiled with --fmad=false: every a * b + c rounds twice, as on the
// CPU, and FMAs are written out (fmaf) where the CPU kernels use them, so the
// results are bit-identical to the CPU path's.
//
// Elements are f32 once decoded; tensors are processed in chunks of CHUNK
// elements whose indices match the CPU kernels' chunks (tie quotas of top-k
// selections are per chunk).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define THREADS 256
#define MAX_STREAMS 16

// Stored element types.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define DT_F8_E4M3 3
#define DT_F8_E5M2 4

// How a task vector is sparsified.
#define KEEP_ALL 0
#define KEEP_NOTHING 1
#define KEEP_TOP 2
#define KEEP_RANDOM 3

extern "C" {

// IEEE half to f32 (exact).
__device__ __forceinline__ float from_f16(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    if (exp == 0) {
        // Zero or subnormal: man * 2^-24, exact in f32.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) {
        // Infinity, or a NaN made quiet (as the half crate does).
        return __uint_as_float(sign | 0x7f800000u | (man != 0 ? 0x400000u : 0u) | (man << 13));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// E4M3 ("e4m3fn": no infinities, 0x7f/0xff are NaN) to f32, exact (dtype.rs).
__device__ __forceinline__ float from_e4m3(u32 b) {
    u32 exp = (b >> 3) & 0x0fu;
    u32 man = b & 0x07u;
    if (exp == 0x0fu && man == 0x07u) {
        return __uint_as_float(0x7fc00000u);
    }
    float v = exp == 0 ? (float)man * 0.001953125f
                       : __uint_as_float(((exp + 120u) << 23) | (man << 20));
    return (b & 0x80u) ? -v : v;
}

// f32 to IEEE half, round to nearest even, as the half crate (and F16C) do:
// overflow to infinity, NaNs quiet with the top payload bits kept.
__device__ __forceinline__ u16 to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 exp = (x >> 23) & 0xffu;
    u32 man = x & 0x7fffffu;
    if (exp == 0xffu) {
        return (u16)(sign | 0x7c00u | (man != 0 ? 0x0200u : 0u) | (man >> 13));
    }
    int e = (int)exp - 127 + 15;
    if (e >= 31) {
        return (u16)(sign | 0x7c00u);
    }
    if (e <= 0) {
        if (14 - e > 24) {
            return (u16)sign;
        }
        u32 m = man | 0x800000u;
        u32 shift = (u32)(14 - e);
        u32 half_man = m >> shift;
        u32 rem = m & ((1u << shift) - 1u);
        u32 halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (half_man & 1u))) {
            half_man++;
        }
        return (u16)(sign | half_man);
    }
    u32 out = sign | ((u32)e << 10) | (man >> 13);
    u32 rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) {
        out++;
    }
    return (u16)out;
}

__device__ __forceinline__ float load(const void *p, int dtype, u64 i) {
    if (dtype == DT_F32) {
        return ((const float *)p)[i];
    }
    if (dtype == DT_F8_E4M3) {
        return from_e4m3(((const unsigned char *)p)[i]);
    }
    if (dtype == DT_F8_E5M2) {
        // The top byte of an f16.
        return from_f16((u16)(((const unsigned char *)p)[i] << 8));
    }
    u16 h = ((const u16 *)p)[i];
    if (dtype == DT_F16) {
        return from_f16(h);
    }
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even; NaNs stay quiet NaNs (as dtype.rs f32_to_bf16).
__device__ __forceinline__ u16 to_bf16(float x) {
    u32 bits = __float_as_uint(x);
    if (x != x) {
        return (u16)((bits >> 16) | 0x0040u);
    }
    u32 round = 0x7fffu + ((bits >> 16) & 1u);
    return (u16)((bits + round) >> 16);
}

__device__ __forceinline__ u32 magnitude_key(float x) {
    return __float_as_uint(x) & 0x7fffffffu;
}

// SplitMix64's finaliser and a stream's uniform draw (methods/rng.rs).
__device__ __forceinline__ u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool keep_random(u64 key, u64 index, float p) {
    u64 z = mix(key + index * 0x9e3779b97f4a7c15ull);
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u < p;
}

// dst[offset + i] = src[i] as f32, i < n.
__global__ void decode(const void *src, int dtype, float *dst, u64 offset, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        dst[offset + i] = load(src, dtype, i);
    }
}

// Block-scaled FP8 weights (DeepSeek-V3's weight_scale_inv): element e of the
// input at xs[offset..offset + n], row e / cols, is multiplied by its block's
// scale, as kernel::BlockScale does on the CPU.
__global__ void apply_scale(float *xs, u64 offset, u64 n, const void *scales, int scale_dtype,
                            u64 cols, u64 block_rows, u64 block_cols, u64 scale_cols) {
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (u64)gridDim.x * blockDim.x) {
        u64 r = e / cols, c = e % cols;
        float s = load(scales, scale_dtype, (r / block_rows) * scale_cols + c / block_cols);
        xs[offset + e] *= s;
    }
}

// dst[i] = src[i] in dtype, i < n.
__global__ void encode(const float *src, int dtype, void *dst, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        if (dtype == DT_F32) {
            ((float *)dst)[i] = src[i];
        } else if (dtype == DT_F16) {
            ((u16 *)dst)[i] = to_f16(src[i]);
        } else {
            ((u16 *)dst)[i] = to_bf16(src[i]);
        }
    }
}

// linear: y = Σ_i fma(x_i, w_i, ·) in input order, divided by `sum` when
// normalizing (methods/linear.rs). xs holds the inputs one after the other.
__global__ void linear(const float *xs, const float *w, int inputs, int normalize, float sum,
                       float *y, u64 n) {
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (u64)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < inputs; i++) {
            acc = fmaf(xs[(u64)i * n + e], w[i], acc);
        }
        if (normalize) {
            acc = acc / sum;
        }
        y[e] = acc;
    }
}

// Histogram of one digit of the keys |x - b| (x: input `xi`, b: input `bi`
// of xs) whose decided bits (mask) equal prefix: hist[(key >> shift) &
// (buckets - 1)] (buckets <= 4096).
__global__ void digit_hist(const float *xs, int xi, int bi, u64 n, u32 prefix, u32 mask, u32 shift,
                           u32 buckets, u64 *hist) {
    __shared__ u32 local[4096];
    const float *x = xs + (u64)xi * n;
    const float *b = xs + (u64)bi * n;
    for (u32 i = threadIdx.x; i < buckets; i += blockDim.x) {
        local[i] = 0;
    }
    __syncthreads();
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (u64)gridDim.x * blockDim.x) {
        u32 key = magnitude_key(x[e] - b[e]);
        if ((key & mask) == prefix) {
            atomicAdd(&local[(key >> shift) & (buckets - 1)], 1u);
        }
    }
    __syncthreads();
    for (u32 i = threadIdx.x; i < buckets; i += blockDim.x) {
        if (local[i] != 0) {
            atomicAdd(&hist[i], (u64)local[i]);
        }
    }
}

// Per chunk (one block each): how many keys |x - b| equal `key`.
__global__ void chunk_ties(const float *xs, int xi, int bi, u64 n, u32 key, u32 chunk,
                           u32 *counts) {
    __shared__ u32 total;
    const float *x = xs + (u64)xi * n;
    const float *b = xs + (u64)bi * n;
    if (threadIdx.x == 0) {
        total = 0;
    }
    __syncthreads();
    u64 start = (u64)blockIdx.x * chunk;
    u64 end = start + chunk < n ? start + chunk : n;
    u32 mine = 0;
    for (u64 e = start + threadIdx.x; e < end; e += blockDim.x) {
        mine += magnitude_key(x[e] - b[e]) == key;
    }
    atomicAdd(&total, mine);
    __syncthreads();
    if (threadIdx.x == 0) {
        counts[blockIdx.x] = total;
    }
}

// Whether element e of a task vector survives, for the elements of a chunk
// visited in order; `ties` counts the threshold-equal keys seen so far in the
// chunk (KEEP_TOP keeps keys above the threshold, then of the equal ones skips
// `skip` and keeps `take`).
__device__ __forceinline__ bool survives(int mode, u32 threshold, u32 skip, u32 take, float p,
                                         u64 rng, u64 e, float d, u32 *ties) {
    switch (mode) {
    case KEEP_ALL:
        return true;
    case KEEP_NOTHING:
        return false;
    case KEEP_TOP: {
        u32 key = magnitude_key(d);
        if (key > threshold) {
            return true;
        }
        if (key == threshold) {
            u32 rank = (*ties)++;
            return rank >= skip && rank < skip + take;
        }
        return false;
    }
    default:
        return keep_random(rng, e, p);
    }
}

// DARE/TIES rescale: per chunk (one thread each, elements in order, as the CPU
// sums them), the L1 norm of the task vector before and after sparsifying,
// in f64.
__global__ void l1_parts(const float *xs, int xi, int bi, u64 n, u32 chunk, u32 chunks,
                         int mode, u32 threshold, const u32 *quota, u64 quota_at, float p,
                         u64 rng, double *before, double *after) {
    const float *x = xs + (u64)xi * n;
    const float *b = xs + (u64)bi * n;
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) {
        return;
    }
    u64 start = (u64)c * chunk;
    u64 end = start + chunk < n ? start + chunk : n;
    u32 skip = mode == KEEP_TOP ? quota[quota_at + 2 * c] : 0;
    u32 take = mode == KEEP_TOP ? quota[quota_at + 2 * c + 1] : 0;
    u32 ties = 0;
    double bf = 0.0, af = 0.0;
    for (u64 e = start; e < end; e++) {
        float d = x[e] - b[e];
        double m = (double)fabsf(d);
        bf += m;
        if (survives(mode, threshold, skip, take, p, rng, e, d, &ties)) {
            af += m;
        }
    }
    before[c] = bf;
    after[c] = af;
}

// The task-arithmetic family's merge (methods/gta; host code gpu/task_vectors.rs),
// one block per chunk.
// The block walks its chunk a row of blockDim elements at a time, thread t
// taking element t of the row (coalesced loads). Per stream s (task vector):
// input index idx[s], mode/threshold/p/rng as in `survives`, quota[(s * chunks
// + c) * 2 + {0, 1}] its (skip, take) in chunk c, scale and weight. A
// threshold-equal key's rank among the chunk's equal keys (which decides
// whether it is kept) is the ties of the rows before plus a block-wide prefix
// sum over this row. Output y in f32.
__global__ void gta_merge(const float *xs, u64 n, int base, int streams, const int *idx,
                          const int *mode, const u32 *threshold, const u32 *quota, u32 chunks,
                          const float *p, const u64 *rng, const float *scale, const float *weight,
                          u32 chunk, int consensus, int normalize, float plain_divisor,
                          float lambda, float *y) {
    __shared__ u32 scan[MAX_STREAMS][THREADS];
    u32 c = blockIdx.x;
    u32 t = threadIdx.x;
    u64 start = (u64)c * chunk;
    u64 end = start + chunk < n ? start + chunk : n;
    const float *b = xs + (u64)base * n;

    bool any_top = false;
    u32 before[MAX_STREAMS];
    u32 skip[MAX_STREAMS];
    u32 take[MAX_STREAMS];
    for (int s = 0; s < streams; s++) {
        bool top = mode[s] == KEEP_TOP;
        any_top = any_top || top;
        before[s] = 0;
        skip[s] = top ? quota[((u64)s * chunks + c) * 2] : 0;
        take[s] = top ? quota[((u64)s * chunks + c) * 2 + 1] : 0;
    }
    float w[MAX_STREAMS];
    u32 tie[MAX_STREAMS];
    // Every thread runs every row (the barriers need all of them).
    for (u64 row = start; row < end; row += blockDim.x) {
        u64 e = row + t;
        bool in = e < end;
        float be = in ? b[e] : 0.0f;
        if (any_top) {
            for (int s = 0; s < streams; s++) {
                u32 f = 0;
                if (in && mode[s] == KEEP_TOP) {
                    f = magnitude_key(xs[(u64)idx[s] * n + e] - be) == threshold[s];
                }
                tie[s] = f;
                scan[s][t] = f;
            }
            __syncthreads();
            // Inclusive prefix sums over the row (Hillis-Steele).
            for (u32 off = 1; off < blockDim.x; off <<= 1) {
                u32 v[MAX_STREAMS];
                for (int s = 0; s < streams; s++) {
                    v[s] = t >= off ? scan[s][t - off] : 0;
                }
                __syncthreads();
                for (int s = 0; s < streams; s++) {
                    scan[s][t] += v[s];
                }
                __syncthreads();
            }
        }
        if (in) {
            float sum = 0.0f;
            for (int s = 0; s < streams; s++) {
                float d = xs[(u64)idx[s] * n + e] - be;
                bool keep;
                if (mode[s] == KEEP_TOP) {
                    u32 key = magnitude_key(d);
                    if (key == threshold[s]) {
                        // Equal keys before this one in the chunk.
                        u32 rank = before[s] + scan[s][t] - tie[s];
                        keep = rank >= skip[s] && rank < skip[s] + take[s];
                    } else {
                        keep = key > threshold[s];
                    }
                } else {
                    keep = survives(mode[s], threshold[s], 0, 0, p[s], rng[s], e, d, 0);
                }
                w[s] = keep ? d * scale[s] * weight[s] : 0.0f;
                sum += w[s];
            }
            float m;
            if (consensus) {
                float o = 0.0f, div = 0.0f;
                for (int s = 0; s < streams; s++) {
                    float v = w[s];
                    bool agree = (v != 0.0f) && ((v > 0.0f) == (sum >= 0.0f));
                    o += agree ? v : 0.0f;
                    div += agree ? weight[s] : 0.0f;
                }
                float divisor = div == 0.0f ? 1.0f : div;
                m = normalize ? o / divisor : o;
            } else {
                m = normalize ? sum / plain_divisor : sum;
            }
            if (lambda != 1.0f) {
                m *= lambda;
            }
            y[e] = be + m;
        }
        if (any_top) {
            for (int s = 0; s < streams; s++) {
                before[s] += scan[s][blockDim.x - 1];
            }
            // Nobody overwrites the row's sums before everyone has read them.
            __syncthreads();
        }
    }
}

}
