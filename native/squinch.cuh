// squinch.cuh: the Squinch wire format (ARCHITECTURE.md section 3) as
// __host__ __device__ functions.
//
// Everything a kernel does to one 8-element block lives here: loading the
// block, the scale index q_max, the nearest / stochastic 4-bit codes, packing
// the 6 bytes, decoding, the fp16/bf16 conversions and the error-feedback
// residual. native/squinch.cu only adds the grid-stride loops around these
// "*_step" functions, so tests/native/host_check.cu can run the very same
// code on the CPU and compare it with the NumPy oracle bit for bit.
//
// Bit-exactness: every decision is a comparison against the shared float32
// tables of squinchcomm/codec/format.py (passed in as `tab`, layout
// SCALE[256] | INV_SCALE[256] | THRESHOLD[256] | F[16] | MIDPOINT[16] | STEP[16])
// or a single IEEE float32 operation. Device code uses __fmul_rn / __fadd_rn /
// __fsub_rn so that nvcc never contracts a multiply and an add into an FMA.
// Cheap estimates (a log2 from the float's bits, a square root) only pick the
// starting point of exact table comparisons, so the result never depends on
// them.
//
// NVRTC compiles this file too: no standard headers, fixed-width types are
// spelled with the builtin integer types.
#ifndef SQUINCH_CUH
#define SQUINCH_CUH

#define SQ_HD __host__ __device__ inline

#if defined(__CUDA_ARCH__)
#define SQ_UNROLL _Pragma("unroll")
#else
#define SQ_UNROLL
#endif

namespace squinch {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Format constants (squinchcomm/codec/format.py).
enum : int { kBlock = 8, kBlockBytes = 6, kQNonFinite = 255, kQMaxFinite = 254 };

// Offsets into the packed float32 table (format.packed_tables()).
enum : int {
  kTabScale = 0,    // SCALE[q] = A(q) = exp((q - 128) / 6)
  kTabInv = 256,    // INV_SCALE[q] = 1 / A(q)
  kTabT = 512,      // THRESHOLD[q] = T[q], T[0] = 0, T[255] = +inf
  kTabF = 768,      // LEVEL_FRACTION[c] = (c / 15)^2
  kTabMid = 784,    // MIDPOINT[k] = (F[k] + F[k+1]) / 2, MIDPOINT[15] = +inf
  kTabStep = 800,   // LEVEL_STEP[k] = F[k+1] - F[k]
  kTabSize = 816
};

// Element kinds of kernel inputs/outputs: float32, or raw uint16 bits.
enum : int { kKindF32 = 0, kKindF16 = 1, kKindBF16 = 2 };

constexpr u32 kAbsMask = 0x7FFFFFFFu;
constexpr u32 kInfBits = 0x7F800000u;
constexpr u32 kCanonicalNan = 0x7FC00000u;  // every backend decodes NaN blocks to this
constexpr float kU24 = 5.9604644775390625e-08f;  // 2^-24
// q ~ 129 + 6 ln2 * log2(m), with log2(m) ~ bits(m) / 2^23 - 127 (format, cpu._block_q).
constexpr float kQBias = -399.17815158667827f;
constexpr float kQSlope = 4.95777497692069e-07f;

// ------------------------------------------------------------------ bits and IEEE ops
/// Reinterpret a float32 as its bits.
SQ_HD u32 f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  u32 u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

/// Reinterpret bits as a float32.
SQ_HD float u2f(u32 u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

/// fl(a * b), never fused with a neighbouring add.
SQ_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

/// fl(a + b), never fused with a neighbouring multiply.
SQ_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/// fl(a - b), never fused with a neighbouring multiply.
SQ_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

SQ_HD bool is_nan(float f) { return (f2u(f) & kAbsMask) > kInfBits; }

/// Every NaN result is written as the canonical NaN (FORMAT.md): hardware
/// NaN propagation differs (CPUs keep the operand's payload, GPUs return
/// 0x7FFFFFFF), so the format fixes the bits instead of inheriting them.
SQ_HD float canonical(float r) { return is_nan(r) ? u2f(kCanonicalNan) : r; }

// ------------------------------------------------------------------ rounding hash
/// The 'lowbias32' finaliser (format._mix32), in 32-bit arithmetic.
SQ_HD u32 mix32(u32 x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/// u * 2^-24 in [0, 1) for global element `index` (format.uniform24); exact.
SQ_HD float uniform(u32 key, u64 index) {
  const u32 hi = mix32(static_cast<u32>(index >> 32) ^ key);
  const u32 h = mix32(static_cast<u32>(index) ^ hi);
  return fmul(static_cast<float>(h >> 8), kU24);
}

// ------------------------------------------------------------------ format core
/// Return the largest q in 0..254 with m >= T[q], from the bits of a finite m >= 0.
SQ_HD int block_q(u32 mbits, const float* tab) {
  // Step 1: estimate from the bits, a piecewise-linear log2 that reads low by
  // less than 0.36 of a q step: the estimate is q - 1, q or q + 1 (checked for
  // every finite float32, with and without FMA contraction).
  const float est = kQBias + kQSlope * static_cast<float>(mbits);
  int q = est <= 0.0f ? 0 : (est >= 254.0f ? kQMaxFinite : static_cast<int>(est));
  // Step 2: correct with exact comparisons; for m >= 0, m >= T <=> bits(m) >= bits(T).
  if (q < kQMaxFinite && mbits >= f2u(tab[kTabT + q + 1])) ++q;
  if (q > 0 && mbits < f2u(tab[kTabT + q])) --q;
  return q;
}

/// Return the nearest code: the number of MIDPOINT[0..14] <= r (ties upward).
SQ_HD int nearest_code(float r, const float* tab) {
  // Step 1: estimate; 15 sqrt(r) + 1/2 lies in [c, c + 2) for the true code c
  // (checked for every float32 r in [0, 1.5); above, both give 15). The upward
  // correction is then never taken; it stays so that an approximate sqrt
  // (a fast-math build) cannot change the code.
  const float est = 15.0f * sqrtf(r) + 0.5f;
  int c = est < 15.0f ? static_cast<int>(est) : 15;
  // Step 2: correct with exact comparisons against the midpoints.
  if (c < 15 && r >= tab[kTabMid + c]) ++c;
  if (c > 0 && r < tab[kTabMid + c - 1]) --c;
  return c;
}

/// Return the stochastic code of r for the uniform u in [0, 1).
SQ_HD int stochastic_code(float r, float u, const float* tab) {
  // Step 1: k = the number of F[1..15] <= r (the level at or below r),
  // estimated as floor(15 sqrt(r)) (exact for every float32 r with a correctly
  // rounded sqrt) and corrected by exact comparisons all the same.
  const float est = 15.0f * sqrtf(r);
  int k = est < 15.0f ? static_cast<int>(est) : 15;
  if (k < 15 && r >= tab[kTabF + k + 1]) ++k;
  if (r < tab[kTabF + k]) --k;  // k > 0 here: F[0] = 0 <= r
  if (k == 15) return 15;
  // Step 2: round up with probability (r - F[k]) / STEP[k].
  const bool up = fmul(u, tab[kTabStep + k]) < fsub(r, tab[kTabF + k]);
  return k + (up ? 1 : 0);
}

/// One encoded block: byte 0 = q, byte 1 = signs, bytes 2..5 = `word` (little endian).
struct Block {
  u32 q;
  u32 signs;  // bit j: element j < 0
  u32 word;   // bits 4j..4j+3: code of element j
};

/// Quantize the 8 values `v` (zero-padded) of the block whose element 0 has
/// global index `index0`.
SQ_HD Block encode_block(const float v[8], const float* tab, bool stochastic, u32 key,
                         u64 index0) {
  // Step 1: the largest |value| as bits; bits >= Inf's bits mean NaN or Inf.
  u32 mbits = 0;
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) {
    const u32 a = f2u(v[j]) & kAbsMask;
    mbits = a > mbits ? a : mbits;
  }
  Block blk = {static_cast<u32>(kQNonFinite), 0u, 0u};
  // Step 2: a non-finite block is canonical: q = 255, signs and codes 0.
  if (mbits >= kInfBits) return blk;
  // Step 3: the block scale and r = |x| * (1 / A(q)), one float32 product.
  const int q = block_q(mbits, tab);
  const float inv = tab[kTabInv + q];
  blk.q = static_cast<u32>(q);
  // Step 4: codes and signs (-0.0 is not < 0, so it has no sign bit).
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) {
    const float r = fmul(u2f(f2u(v[j]) & kAbsMask), inv);
    const int c = stochastic ? stochastic_code(r, uniform(key, index0 + j), tab)
                             : nearest_code(r, tab);
    blk.word |= static_cast<u32>(c) << (4 * j);
    blk.signs |= (v[j] < 0.0f ? 1u : 0u) << j;
  }
  return blk;
}

/// Decode one block: bits(A(q) * F[c]) | sign << 31; canonical NaN for q = 255.
SQ_HD void decode_block(Block blk, const float* tab, float out[8]) {
  if (blk.q == static_cast<u32>(kQNonFinite)) {
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) out[j] = u2f(kCanonicalNan);
    return;
  }
  const float scale = tab[kTabScale + blk.q];
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) {
    const u32 c = (blk.word >> (4 * j)) & 15u;
    const u32 sign = ((blk.signs >> j) & 1u) << 31;
    out[j] = u2f(f2u(fmul(scale, tab[kTabF + c])) | sign);
  }
}

// ------------------------------------------------------------------ fp16 / bf16
/// bfloat16 bits to float32, exactly.
SQ_HD float bf16_to_f32(u16 h) { return u2f(static_cast<u32>(h) << 16); }

/// IEEE half bits to float32, exactly (as cpu._load_f16).
SQ_HD float f16_to_f32(u16 h) {
  const u32 sign = (static_cast<u32>(h) & 0x8000u) << 16;
  const u32 e = (static_cast<u32>(h) >> 10) & 0x1Fu;
  const u32 mant = static_cast<u32>(h) & 0x3FFu;
  if (e == 0x1Fu) return u2f(sign | kInfBits | (mant << 13));  // Inf / NaN
  if (e == 0u) {  // zero / subnormal: mant * 2^-24 is exact in float32
    return u2f(f2u(fmul(static_cast<float>(mant), kU24)) | sign);
  }
  return u2f(sign | ((e + 112u) << 23) | (mant << 13));
}

/// float32 to bfloat16 bits, round to nearest even; NaN -> 0x7FC0 | sign (cpu._store_bf16).
SQ_HD u16 f32_to_bf16(float f) {
  const u32 bits = f2u(f);
  if ((bits & kAbsMask) > kInfBits) return static_cast<u16>((bits >> 16) | 0x0040u);
  const u32 lsb = (bits >> 16) & 1u;
  return static_cast<u16>((bits + 0x7FFFu + lsb) >> 16);
}

/// float32 to IEEE half bits, round to nearest even, overflow to Inf, as
/// NumPy's astype(np.float16); NaN keeps its top payload bits, quieted (0x7E00).
SQ_HD u16 f32_to_f16(float f) {
  const u32 bits = f2u(f);
  const u32 sign = (bits >> 16) & 0x8000u;
  const u32 a = bits & kAbsMask;
  if (a > kInfBits) return static_cast<u16>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x38800000u) {  // normal half range (or overflow): rebias, round the 13 dropped bits
    const u32 m = a - 0x38000000u;
    const u32 h = (m + 0xFFFu + ((m >> 13) & 1u)) >> 13;
    return static_cast<u16>(sign | (h < 0x7C00u ? h : 0x7C00u));
  }
  if (a < 0x33000000u) return static_cast<u16>(sign);  // below 2^-25: rounds to 0
  // Subnormal half: the value in units of 2^-24 is mant * 2^-(126 - e), e = exponent.
  const u32 shift = 126u - (a >> 23);  // 14..24
  const u32 mant = (a & 0x7FFFFFu) | 0x800000u;
  u32 h = mant >> shift;
  const u32 rem = mant & ((1u << shift) - 1u);
  const u32 half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal
  return static_cast<u16>(sign | h);
}

// ------------------------------------------------------------------ block loads / stores
/// True when pointer p is a multiple of `bytes` (a power of two); null counts as aligned.
SQ_HD bool is_aligned(const void* p, u64 bytes) {
  return (reinterpret_cast<u64>(p) & (bytes - 1)) == 0;
}

/// Number of blocks of n elements.
SQ_HD u64 num_blocks(u64 n) { return (n + kBlock - 1) / kBlock; }

/// Which load/store paths a launch may take, decided once per launch from
/// its pointers: `vec` = the float / uint16 arrays are 16-byte aligned (two
/// 16-byte accesses per block), `even` = the payload pointers (and row
/// stride) are 2-byte aligned (three 2-byte accesses per block). The kernels
/// and tests/native/host_check.cu both call these.
struct Paths {
  bool vec;
  bool even;
};

/// squinch_encode: input x, payload out, residual res (may be null).
SQ_HD Paths encode_paths(const void* x, const u8* out, const float* res) {
  Paths p = {is_aligned(x, 16) && is_aligned(res, 16), is_aligned(out, 2)};
  return p;
}

/// squinch_decode: payload in, out the float32 / uint16 output.
SQ_HD Paths decode_paths(const u8* payload, const void* out) {
  Paths p = {is_aligned(out, 16), is_aligned(payload, 2)};
  return p;
}

/// squinch_decode_accumulate: k payload rows `stride` bytes apart, float32 out.
SQ_HD Paths accumulate_paths(const u8* payloads, u64 stride, const float* out) {
  Paths p = {is_aligned(out, 16), is_aligned(payloads, 2) && stride % 2 == 0};
  return p;
}

/// squinch_reduce_encode: payload rows, payload out, residual res (may be null).
SQ_HD Paths reduce_encode_paths(const u8* payloads, u64 stride, const u8* out,
                                const float* res) {
  Paths p = {is_aligned(res, 16),
             is_aligned(payloads, 2) && stride % 2 == 0 && is_aligned(out, 2)};
  return p;
}

/// Read a T (a vector type or u16) from p, which the caller has checked is
/// aligned for T. The device reads it in one access; the host copies the
/// bytes (no type punning, so no -fno-strict-aliasing is needed).
template <typename T>
SQ_HD T load_as(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const T*>(p);
#else
  T v;
  __builtin_memcpy(&v, p, sizeof(T));
  return v;
#endif
}

/// Write a T to p (aligned for T), as load_as reads it.
template <typename T>
SQ_HD void store_as(void* p, T v) {
#if defined(__CUDA_ARCH__)
  *static_cast<T*>(p) = v;
#else
  __builtin_memcpy(p, &v, sizeof(T));
#endif
}

/// Load elements 8b..8b+7 of p (zeros past n): two 16-byte loads when `vec`
/// (p 16-byte aligned) and the block is whole, else scalar loads.
SQ_HD void load_f32x8(const float* p, u64 n, u64 b, bool vec, float v[8]) {
  const u64 i0 = kBlock * b;
  if (vec && i0 + kBlock <= n) {
    const float4 lo = load_as<float4>(p + i0);
    const float4 hi = load_as<float4>(p + i0 + 4);
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
    v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
  } else {
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) v[j] = i0 + j < n ? p[i0 + j] : 0.0f;
  }
}

/// Store elements 8b..min(8b+8, n) of p.
SQ_HD void store_f32x8(float* p, u64 n, u64 b, bool vec, const float v[8]) {
  const u64 i0 = kBlock * b;
  if (vec && i0 + kBlock <= n) {
    float4 lo, hi;
    lo.x = v[0]; lo.y = v[1]; lo.z = v[2]; lo.w = v[3];
    hi.x = v[4]; hi.y = v[5]; hi.z = v[6]; hi.w = v[7];
    store_as<float4>(p + i0, lo);
    store_as<float4>(p + i0 + 4, hi);
  } else {
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) {
      if (i0 + j < n) p[i0 + j] = v[j];
    }
  }
}

/// Load 8 uint16 (one 16-byte load when `vec` and the block is whole; zeros past n).
SQ_HD void load_u16x8(const u16* p, u64 n, u64 b, bool vec, u16 h[8]) {
  const u64 i0 = kBlock * b;
  if (vec && i0 + kBlock <= n) {
    const uint4 w = load_as<uint4>(p + i0);
    const u32 words[4] = {w.x, w.y, w.z, w.w};
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) h[j] = static_cast<u16>(words[j / 2] >> (16 * (j % 2)));
  } else {
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) h[j] = i0 + j < n ? p[i0 + j] : static_cast<u16>(0);
  }
}

/// Store elements 8b..min(8b+8, n) of the uint16 array p.
SQ_HD void store_u16x8(u16* p, u64 n, u64 b, bool vec, const u16 h[8]) {
  const u64 i0 = kBlock * b;
  if (vec && i0 + kBlock <= n) {
    uint4 w;
    w.x = static_cast<u32>(h[0]) | (static_cast<u32>(h[1]) << 16);
    w.y = static_cast<u32>(h[2]) | (static_cast<u32>(h[3]) << 16);
    w.z = static_cast<u32>(h[4]) | (static_cast<u32>(h[5]) << 16);
    w.w = static_cast<u32>(h[6]) | (static_cast<u32>(h[7]) << 16);
    store_as<uint4>(p + i0, w);
  } else {
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) {
      if (i0 + j < n) p[i0 + j] = h[j];
    }
  }
}

/// Read block b of a payload (three 2-byte loads when p is even, else bytes).
SQ_HD Block load_block(const u8* p, u64 b, bool even) {
  const u8* s = p + kBlockBytes * b;
  u32 b0, b1, w;
  if (even) {
    const u32 h0 = load_as<u16>(s);
    b0 = h0 & 0xFFu;
    b1 = h0 >> 8;
    w = static_cast<u32>(load_as<u16>(s + 2)) | (static_cast<u32>(load_as<u16>(s + 4)) << 16);
  } else {
    b0 = s[0];
    b1 = s[1];
    w = static_cast<u32>(s[2]) | (static_cast<u32>(s[3]) << 8) | (static_cast<u32>(s[4]) << 16)
        | (static_cast<u32>(s[5]) << 24);
  }
  Block blk = {b0, b1, w};
  return blk;
}

/// Write block b of a payload (three 2-byte stores when p is even, else bytes).
SQ_HD void store_block(u8* p, u64 b, bool even, Block blk) {
  u8* s = p + kBlockBytes * b;
  if (even) {
    store_as<u16>(s, static_cast<u16>(blk.q | (blk.signs << 8)));
    store_as<u16>(s + 2, static_cast<u16>(blk.word));
    store_as<u16>(s + 4, static_cast<u16>(blk.word >> 16));
  } else {
    s[0] = static_cast<u8>(blk.q);
    s[1] = static_cast<u8>(blk.signs);
    s[2] = static_cast<u8>(blk.word);
    s[3] = static_cast<u8>(blk.word >> 8);
    s[4] = static_cast<u8>(blk.word >> 16);
    s[5] = static_cast<u8>(blk.word >> 24);
  }
}

/// Load block b of an input of the given kind as float32 (zeros past n).
SQ_HD void load_input(const void* x, int kind, u64 n, u64 b, bool vec, float v[8]) {
  if (kind == kKindF32) {
    load_f32x8(static_cast<const float*>(x), n, b, vec, v);
    return;
  }
  u16 h[8];
  load_u16x8(static_cast<const u16*>(x), n, b, vec, h);
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) v[j] = kind == kKindF16 ? f16_to_f32(h[j]) : bf16_to_f32(h[j]);
}

// ------------------------------------------------------------------ per-block kernel steps
// Each *_step does one kernel's work for block b; the kernels call it in a
// grid-stride loop, the host check in a plain loop. `vec`: the float / uint16
// arrays are 16-byte aligned; `even`: the payload pointers (and row stride)
// are 2-byte aligned.

/// Encode the block values v (input plus residual, zero-padded), store the
/// payload block and, with a residual, write residual = v - decoded (a
/// non-finite block keeps its old residual).
SQ_HD void finish_encode(const float v[8], u64 n, u64 b, u8* out, float* res, bool stochastic,
                         u32 key, u64 offset, const float* tab, bool vec, bool even) {
  const Block blk = encode_block(v, tab, stochastic, key, offset + kBlock * b);
  store_block(out, b, even, blk);
  if (res != nullptr && blk.q != static_cast<u32>(kQNonFinite)) {
    float d[8];
    decode_block(blk, tab, d);
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) d[j] = fsub(v[j], d[j]);
    store_f32x8(res, n, b, vec, d);
  }
}

/// squinch_encode for block b: encode x (+ residual).
SQ_HD void encode_step(const void* x, int kind, u64 n, u64 b, u8* out, float* res,
                       bool stochastic, u32 key, u64 offset, const float* tab, bool vec,
                       bool even) {
  float v[8];
  load_input(x, kind, n, b, vec, v);
  if (res != nullptr) {
    float r[8];
    load_f32x8(res, n, b, vec, r);
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) v[j] = fadd(v[j], r[j]);  // padding: 0 + 0 = +0
  }
  finish_encode(v, n, b, out, res, stochastic, key, offset, tab, vec, even);
}

/// squinch_decode for block b: decode to float32, or to fp16 / bf16 bits.
SQ_HD void decode_step(const u8* p, u64 n, u64 b, void* out, int kind, const float* tab,
                       bool vec, bool even) {
  float d[8];
  decode_block(load_block(p, b, even), tab, d);
  if (kind == kKindF32) {
    store_f32x8(static_cast<float*>(out), n, b, vec, d);
    return;
  }
  u16 h[8];
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) h[j] = kind == kKindF16 ? f32_to_f16(d[j]) : f32_to_bf16(d[j]);
  store_u16x8(static_cast<u16*>(out), n, b, vec, h);
}

/// acc = sum over s = 0..k-1, in order, of decode(row s, block b), from +0.0.
SQ_HD void reduce_block(const u8* P, int k, u64 stride, u64 b, const float* tab, bool even,
                        float acc[8]) {
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) acc[j] = 0.0f;
  for (int s = 0; s < k; ++s) {
    float d[8];
    decode_block(load_block(P + stride * static_cast<u64>(s), b, even), tab, d);
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) acc[j] = fadd(acc[j], d[j]);
  }
}

/// squinch_decode_accumulate for block b: out = out + fl(sum * scale).
SQ_HD void accumulate_step(const u8* P, int k, u64 stride, u64 n, u64 b, float* out,
                           float scale, const float* tab, bool vec, bool even) {
  float acc[8], o[8];
  reduce_block(P, k, stride, b, tab, even, acc);
  load_f32x8(out, n, b, vec, o);
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) o[j] = canonical(fadd(o[j], fmul(acc[j], scale)));
  store_f32x8(out, n, b, vec, o);
}

/// squinch_reduce_encode for block b: encode fl(sum * scale) (+ residual);
/// elements past n count as 0.
SQ_HD void reduce_encode_step(const u8* P, int k, u64 stride, u64 n, u64 b, u8* out,
                              float* res, float scale, bool stochastic, u32 key, u64 offset,
                              const float* tab, bool vec, bool even) {
  float v[8];
  reduce_block(P, k, stride, b, tab, even, v);
  const u64 i0 = kBlock * b;
  SQ_UNROLL
  for (int j = 0; j < kBlock; ++j) v[j] = i0 + j < n ? fmul(v[j], scale) : 0.0f;
  if (res != nullptr) {
    float r[8];
    load_f32x8(res, n, b, vec, r);
    SQ_UNROLL
    for (int j = 0; j < kBlock; ++j) v[j] = fadd(v[j], r[j]);
  }
  finish_encode(v, n, b, out, res, stochastic, key, offset, tab, vec, even);
}

}  // namespace squinch

#endif  // SQUINCH_CUH
