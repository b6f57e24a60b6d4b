// cuda_host.h: just enough CUDA for a C++ compiler to build native/squinch.cu
// for the CPU, and a launch that runs its __global__ functions as a GPU would
// schedule them, so tests/native/host_check.cu exercises the real kernels
// (grid-stride loops, alignment paths, shared-memory table staging) without a GPU.
//
// The model: blocks run one after another; the threads of a block run as real
// threads (std::thread), and __syncthreads() is a barrier of the block's
// threads, so a kernel that reads shared memory before every thread has
// written it can read unwritten values, as on a GPU. `__shared__` variables
// are function statics: one copy, reused by each block in turn. The launch
// fills them with a NaN pattern before each block, so a kernel that reads a
// shared entry no thread of the current block wrote sees garbage instead of
// the previous block's values. Needs GCC or Clang on ELF (named sections).
//
// Included before native/squinch.cu; never by the library's own build.
#ifndef SQUINCH_CUDA_HOST_H
#define SQUINCH_CUDA_HOST_H

#include <math.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
// Function statics in one named section, so the launch can scribble over all of
// them before each block (the linker defines __start_/__stop_ for the section).
#define __shared__ static __attribute__((section("squinch_shared"), aligned(16)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace cuda_host {

inline dim3 block_idx, block_dim, grid_dim;  // set before a block's threads start
inline thread_local dim3 thread_idx;

/// A reusable barrier for the threads of one block.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_, waiting_ = 0, generation_ = 0;
};

inline Barrier* block_barrier = nullptr;

extern "C" char __start_squinch_shared[], __stop_squinch_shared[];

/// Fill all __shared__ storage with NaN (0xFFFFFFFF as a float32).
inline void scribble_shared() {
  std::memset(__start_squinch_shared, 0xFF,
              static_cast<std::size_t>(__stop_squinch_shared - __start_squinch_shared));
}

/// Run kernel<<<grid, block>>>(args...): blocks in order, threads concurrent.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
  grid_dim.x = grid;
  block_dim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    Barrier barrier(block);
    block_barrier = &barrier;
    block_idx.x = b;
    scribble_shared();
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([=] {
        thread_idx.x = t;
        kernel(args...);
      });
    }
    for (std::thread& th : threads) th.join();
  }
  block_barrier = nullptr;
}

}  // namespace cuda_host

#define threadIdx cuda_host::thread_idx
#define blockIdx cuda_host::block_idx
#define blockDim cuda_host::block_dim
#define gridDim cuda_host::grid_dim

inline void __syncthreads() { cuda_host::block_barrier->wait(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

#endif  // SQUINCH_CUDA_HOST_H
