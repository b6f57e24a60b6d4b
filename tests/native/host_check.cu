// host_check.cu: run the CUDA kernels of native/squinch.cu on the CPU, so
// tests/test_native_host.py can compare them with the NumPy oracle bit for bit
// on a machine without a GPU.
//
// Build (any C++17 compiler on ELF; no CUDA toolkit needed):
//   g++ -std=c++17 -O2 -pthread -ffp-contract=off -I native -I tests/native
//       -x c++ tests/native/host_check.cu -o host_check
// tests/native/cuda_host.h stands in for the CUDA runtime: squinch.cu is
// included as it is, and its __global__ functions run under an emulated
// <<<GRID, BLOCK>>> launch (blocks in turn, each block's threads concurrent,
// __syncthreads a barrier, shared memory scribbled between blocks).
//
// Usage (all arrays are raw little-endian files; `-` = no residual; `shift`
// = 1 places every array one element / byte off its alignment, to exercise
// the scalar fallbacks instead of the vector loads; GRID BLOCK: the launch):
//   host_check encode     TABLES KIND N X STOCH KEY OFFSET RES_IN OUT RES_OUT SHIFT GRID BLOCK
//   host_check decode     TABLES KIND N PAYLOAD OUT SHIFT GRID BLOCK
//   host_check accumulate TABLES K N PAYLOADS OUT_IN SCALE_BITS OUT SHIFT GRID BLOCK
//   host_check reduce     TABLES K N PAYLOADS SCALE_BITS STOCH KEY OFFSET RES_IN OUT RES_OUT SHIFT
//                         GRID BLOCK
//   host_check paths      (prints the *_paths flags for aligned and shifted pointers)
//   host_check convert    F32_IN U16_IN OUT_F16 OUT_BF16 OUT_F16_TO_F32 OUT_BF16_TO_F32
//   host_check layout     (prints the packed-table offsets, `NAME VALUE` per line)
// KIND: 0 float32, 1 float16 bits, 2 bfloat16 bits; KEY, OFFSET, SCALE_BITS
// are decimal integers (SCALE_BITS: the float32's bits).
#include "cuda_host.h"
#include "squinch.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using squinch::u16;
using squinch::u32;
using squinch::u64;
using squinch::u8;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "host_check: %s\n", msg.c_str());
  std::exit(2);
}

/// A byte buffer whose data starts 64-byte aligned plus `shift` bytes.
struct Buffer {
  std::vector<u8> storage;
  u8* data = nullptr;
  size_t size = 0;

  Buffer(size_t bytes, size_t shift) : storage(bytes + 64 + shift + 16), size(bytes) {
    const u64 base = reinterpret_cast<u64>(storage.data());
    data = storage.data() + ((64 - base % 64) % 64) + shift;
  }
  Buffer(const Buffer&) = delete;  // `data` points into `storage`: move only
  Buffer(Buffer&&) = default;
  template <typename T> T* as() { return reinterpret_cast<T*>(data); }
};

Buffer read_file(const std::string& path, size_t shift) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  std::fseek(f, 0, SEEK_END);
  const long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  Buffer buf(static_cast<size_t>(size), shift);
  if (size > 0 && std::fread(buf.data, 1, static_cast<size_t>(size), f) != static_cast<size_t>(size))
    die("short read " + path);
  std::fclose(f);
  return buf;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot write " + path);
  if (bytes > 0 && std::fwrite(data, 1, bytes, f) != bytes) die("short write " + path);
  std::fclose(f);
}

u64 to_u64(const char* s) { return std::strtoull(s, nullptr, 10); }

float bits_to_float(u64 bits) { return squinch::u2f(static_cast<u32>(bits)); }

std::vector<float> read_tables(const std::string& path) {
  Buffer buf = read_file(path, 0);
  if (buf.size != sizeof(float) * squinch::kTabSize)
    die("tables must hold " + std::to_string(squinch::kTabSize) + " float32");
  std::vector<float> tab(squinch::kTabSize);
  std::memcpy(tab.data(), buf.data, buf.size);
  return tab;
}

/// The residual buffer (or none) with the given element shift.
struct Residual {
  Buffer buf;
  bool present;
  Residual(const std::string& path, size_t shift)
      : buf(path == "-" ? Buffer(0, shift) : read_file(path, shift)), present(path != "-") {}
  float* ptr() { return present ? buf.as<float>() : nullptr; }
};

/// The GRID BLOCK arguments of a kernel command.
struct Launch {
  unsigned grid, block;
  explicit Launch(char** a)
      : grid(static_cast<unsigned>(to_u64(a[0]))), block(static_cast<unsigned>(to_u64(a[1]))) {
    if (grid == 0 || block == 0) die("GRID and BLOCK must be >= 1");
  }
  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args... args) const {
    cuda_host::launch(kernel, grid, block, args...);
  }
};

int cmd_encode(char** a) {
  // TABLES KIND N X STOCH KEY OFFSET RES_IN OUT RES_OUT SHIFT
  const std::vector<float> tab = read_tables(a[0]);
  const int kind = std::atoi(a[1]);
  const u64 n = to_u64(a[2]);
  const size_t esize = kind == squinch::kKindF32 ? 4 : 2;
  const size_t shift = std::atoi(a[10]);
  const Launch launch(a + 11);
  Buffer x = read_file(a[3], shift * esize);
  const bool stochastic = std::atoi(a[4]) != 0;
  const u32 key = static_cast<u32>(to_u64(a[5]));
  const u64 offset = to_u64(a[6]);
  Residual res(a[7], shift * 4);
  const u64 nb = squinch::num_blocks(n);
  Buffer out(6 * nb, shift);
  launch.run(squinch_encode, static_cast<const void*>(x.data), kind, n, out.data, res.ptr(),
             stochastic ? 1 : 0, key, offset, tab.data());
  write_file(a[8], out.data, out.size);
  if (res.present) write_file(a[9], res.buf.data, res.buf.size);
  return 0;
}

int cmd_decode(char** a) {
  // TABLES KIND N PAYLOAD OUT SHIFT
  const std::vector<float> tab = read_tables(a[0]);
  const int kind = std::atoi(a[1]);
  const u64 n = to_u64(a[2]);
  const size_t shift = std::atoi(a[5]);
  const Launch launch(a + 6);
  const size_t esize = kind == squinch::kKindF32 ? 4 : 2;
  Buffer p = read_file(a[3], shift);
  Buffer out(esize * n, shift * esize);
  launch.run(squinch_decode, static_cast<const u8*>(p.data), n,
             static_cast<void*>(out.data), kind, tab.data());
  write_file(a[4], out.data, out.size);
  return 0;
}

int cmd_accumulate(char** a) {
  // TABLES K N PAYLOADS OUT_IN SCALE_BITS OUT SHIFT
  const std::vector<float> tab = read_tables(a[0]);
  const int k = std::atoi(a[1]);
  const u64 n = to_u64(a[2]);
  const size_t shift = std::atoi(a[7]);
  const Launch launch(a + 8);
  Buffer P = read_file(a[3], shift);
  Buffer out = read_file(a[4], shift * 4);
  const float scale = bits_to_float(to_u64(a[5]));
  const u64 stride = 6 * squinch::num_blocks(n);
  launch.run(squinch_decode_accumulate, static_cast<const u8*>(P.data), k, stride, n,
             out.as<float>(), scale, tab.data());
  write_file(a[6], out.data, out.size);
  return 0;
}

int cmd_reduce(char** a) {
  // TABLES K N PAYLOADS SCALE_BITS STOCH KEY OFFSET RES_IN OUT RES_OUT SHIFT
  const std::vector<float> tab = read_tables(a[0]);
  const int k = std::atoi(a[1]);
  const u64 n = to_u64(a[2]);
  const size_t shift = std::atoi(a[11]);
  const Launch launch(a + 12);
  Buffer P = read_file(a[3], shift);
  const float scale = bits_to_float(to_u64(a[4]));
  const bool stochastic = std::atoi(a[5]) != 0;
  const u32 key = static_cast<u32>(to_u64(a[6]));
  const u64 offset = to_u64(a[7]);
  Residual res(a[8], shift * 4);
  const u64 nb = squinch::num_blocks(n);
  const u64 stride = 6 * nb;
  Buffer out(6 * nb, shift);
  launch.run(squinch_reduce_encode, static_cast<const u8*>(P.data), k, stride, n, out.data,
             res.ptr(), scale, stochastic ? 1 : 0, key, offset, tab.data());
  write_file(a[9], out.data, out.size);
  if (res.present) write_file(a[10], res.buf.data, res.buf.size);
  return 0;
}

int cmd_paths(char**) {
  // The path flags of each kernel for a 64-byte aligned base pointer and for
  // it plus 1 and 2 bytes (the row stride 6 is even, 3 is odd).
  alignas(64) static u8 base[64];
  const u8* p[3] = {base, base + 1, base + 2};
  for (int i = 0; i < 3; ++i) {
    const float* f = reinterpret_cast<const float*>(p[i]);
    const squinch::Paths e = squinch::encode_paths(p[i], p[i], f);
    const squinch::Paths e0 = squinch::encode_paths(p[i], p[i], nullptr);
    const squinch::Paths d = squinch::decode_paths(p[i], p[i]);
    const squinch::Paths c = squinch::accumulate_paths(p[i], 6, f);
    const squinch::Paths c3 = squinch::accumulate_paths(p[i], 3, f);
    const squinch::Paths r = squinch::reduce_encode_paths(p[i], 6, p[i], f);
    const squinch::Paths r0 = squinch::reduce_encode_paths(p[i], 6, p[i], nullptr);
    std::printf("%d encode %d %d encode_nores %d %d decode %d %d accumulate %d %d "
                "accumulate_odd %d %d reduce %d %d reduce_nores %d %d\n",
                i, e.vec, e.even, e0.vec, e0.even, d.vec, d.even, c.vec, c.even, c3.vec, c3.even,
                r.vec, r.even, r0.vec, r0.even);
  }
  return 0;
}

int cmd_convert(char** a) {
  // F32_IN U16_IN OUT_F16 OUT_BF16 OUT_F16_TO_F32 OUT_BF16_TO_F32
  Buffer f = read_file(a[0], 0);
  Buffer h = read_file(a[1], 0);
  const size_t nf = f.size / 4, nh = h.size / 2;
  std::vector<u16> to_f16(nf), to_bf16(nf);
  std::vector<float> from_f16(nh), from_bf16(nh);
  for (size_t i = 0; i < nf; ++i) {
    to_f16[i] = squinch::f32_to_f16(f.as<float>()[i]);
    to_bf16[i] = squinch::f32_to_bf16(f.as<float>()[i]);
  }
  for (size_t i = 0; i < nh; ++i) {
    from_f16[i] = squinch::f16_to_f32(h.as<u16>()[i]);
    from_bf16[i] = squinch::bf16_to_f32(h.as<u16>()[i]);
  }
  write_file(a[2], to_f16.data(), 2 * nf);
  write_file(a[3], to_bf16.data(), 2 * nf);
  write_file(a[4], from_f16.data(), 4 * nh);
  write_file(a[5], from_bf16.data(), 4 * nh);
  return 0;
}

int cmd_layout(char**) {
  // The packed-table layout as the compiler sees native/squinch.cuh, so the
  // test compares the kernels' offsets with format.packed_tables() itself.
  const struct {
    const char* name;
    int value;
  } entries[] = {{"kTabScale", squinch::kTabScale}, {"kTabInv", squinch::kTabInv},
                 {"kTabT", squinch::kTabT},         {"kTabF", squinch::kTabF},
                 {"kTabMid", squinch::kTabMid},     {"kTabStep", squinch::kTabStep},
                 {"kTabSize", squinch::kTabSize}};
  for (const auto& e : entries) std::printf("%s %d\n", e.name, e.value);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  struct Command {
    const char* name;
    int nargs;
    int (*run)(char**);
  };
  const Command commands[] = {{"encode", 13, cmd_encode},         {"decode", 8, cmd_decode},
                              {"accumulate", 10, cmd_accumulate}, {"reduce", 14, cmd_reduce},
                              {"paths", 0, cmd_paths},            {"convert", 6, cmd_convert},
                              {"layout", 0, cmd_layout}};
  if (argc >= 2) {
    for (const Command& c : commands) {
      if (std::strcmp(argv[1], c.name) == 0) {
        if (argc != 2 + c.nargs) die(std::string("wrong argument count for ") + c.name);
        return c.run(argv + 2);
      }
    }
  }
  die("usage: host_check encode|decode|accumulate|reduce|paths|convert|layout ARGS... "
      "(see the source)");
}
