// squinch.cu: the Squinch CUDA kernels (loaded by squinchcomm/codec/cuda.py
// through cupy.RawModule, compiled with NVRTC on first use).
//
// One thread per 8-element block in a grid-stride loop with 64-bit indices.
// Each CTA first stages the 816-float table in shared memory (the codes index
// it per element, which constant memory would serialise). Vector (16-byte)
// accesses are used when the arrays are aligned, checked once per launch; the
// per-block work is the shared __host__ __device__ code of squinch.cuh.
//
// Arguments common to several kernels:
//   n        element count (the payload holds ceil(n / 8) blocks of 6 bytes)
//   kind     0 float32, 1 float16 bits, 2 bfloat16 bits (inputs / outputs)
//   tables   format.packed_tables() on the device (816 float32)
//   key      format.stream_key(seed); offset: global index of element 0
//   residual float32[n] error-feedback state, updated in place, or null
//   payloads k rows of `stride` bytes; blocks are summed in row order
#include "squinch.cuh"

namespace {

/// Copy the packed tables into shared memory (the whole CTA takes part).
__device__ __forceinline__ void stage_tables(float* smem, const float* __restrict__ tables) {
  for (int i = threadIdx.x; i < squinch::kTabSize; i += blockDim.x) smem[i] = __ldg(tables + i);
  __syncthreads();
}

__device__ __forceinline__ unsigned long long first_block() {
  return static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ unsigned long long block_stride() {
  return static_cast<unsigned long long>(gridDim.x) * blockDim.x;
}

}  // namespace

/// Encode x[0:n] into out (6 * ceil(n / 8) bytes), with optional error feedback.
extern "C" __global__ void squinch_encode(const void* __restrict__ x, int kind,
                                          unsigned long long n,
                                          unsigned char* __restrict__ out,
                                          float* __restrict__ residual, int stochastic,
                                          unsigned int key, unsigned long long offset,
                                          const float* __restrict__ tables) {
  __shared__ float tab[squinch::kTabSize];
  stage_tables(tab, tables);
  const squinch::Paths path = squinch::encode_paths(x, out, residual);
  const unsigned long long nb = squinch::num_blocks(n);
  for (unsigned long long b = first_block(); b < nb; b += block_stride()) {
    squinch::encode_step(x, kind, n, b, out, residual, stochastic != 0, key, offset, tab,
                         path.vec, path.even);
  }
}

/// Decode payload into out[0:n] (float32, or fp16 / bf16 bits by kind).
extern "C" __global__ void squinch_decode(const unsigned char* __restrict__ payload,
                                          unsigned long long n, void* __restrict__ out,
                                          int kind, const float* __restrict__ tables) {
  __shared__ float tab[squinch::kTabSize];
  stage_tables(tab, tables);
  const squinch::Paths path = squinch::decode_paths(payload, out);
  const unsigned long long nb = squinch::num_blocks(n);
  for (unsigned long long b = first_block(); b < nb; b += block_stride()) {
    squinch::decode_step(payload, n, b, out, kind, tab, path.vec, path.even);
  }
}

/// out[i] = out[i] + fl(fl(sum_s decode(payloads[s])[i]) * scale), i < n.
extern "C" __global__ void squinch_decode_accumulate(const unsigned char* __restrict__ payloads,
                                                     int k, unsigned long long stride,
                                                     unsigned long long n,
                                                     float* __restrict__ out, float scale,
                                                     const float* __restrict__ tables) {
  __shared__ float tab[squinch::kTabSize];
  stage_tables(tab, tables);
  const squinch::Paths path = squinch::accumulate_paths(payloads, stride, out);
  const unsigned long long nb = squinch::num_blocks(n);
  for (unsigned long long b = first_block(); b < nb; b += block_stride()) {
    squinch::accumulate_step(payloads, k, stride, n, b, out, scale, tab, path.vec, path.even);
  }
}

/// Encode fl(sum_s decode(payloads[s]) * scale) (+ residual) into out: the
/// fused decode-accumulate-encode of the compressed allreduce.
extern "C" __global__ void squinch_reduce_encode(const unsigned char* __restrict__ payloads,
                                                 int k, unsigned long long stride,
                                                 unsigned long long n,
                                                 unsigned char* __restrict__ out,
                                                 float* __restrict__ residual, float scale,
                                                 int stochastic, unsigned int key,
                                                 unsigned long long offset,
                                                 const float* __restrict__ tables) {
  __shared__ float tab[squinch::kTabSize];
  stage_tables(tab, tables);
  const squinch::Paths path = squinch::reduce_encode_paths(payloads, stride, out, residual);
  const unsigned long long nb = squinch::num_blocks(n);
  for (unsigned long long b = first_block(); b < nb; b += block_stride()) {
    squinch::reduce_encode_step(payloads, k, stride, n, b, out, residual, scale,
                                stochastic != 0, key, offset, tab, path.vec, path.even);
  }
}
