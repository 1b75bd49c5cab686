// One MoE layer's selected routed experts for a few tokens, in one call (kllama/experts/cpu_kernels.py is the
// Python side and documents the contract).
//
// Decode reads each selected expert's weights once from DRAM, so the pass is bound by memory bandwidth. The work is
// cut into two matrix stages, each one fork/join over output rows of all selected experts at once:
//   1. gate/up: for intermediate rows j of a thread's block, for every selected expert and its tokens,
//      act = silu(gate_j . x) * (up_j . x) * routing weight (LoRA added to gate/up before the activation);
//   2. down: for hidden rows h of a thread's block, out[token, h] += down_h . act, summed over the token's experts.
// A thread owns its rows in both stages, so there are no atomics and no reduction across threads. Rows are read
// as contiguous streams with a software prefetch of the next row (a 4 KiB bf16 row is a page, where the hardware
// prefetcher stops; int8 on VNNI: two rows ahead). For up to 2 tokens an expert, int8 (VNNI) and bf16 (AVX512-BF16)
// run gate row j and up row j in one loop (`Avx512Int8VnniPair`, `Avx512Bf16DpPair`). A dot product of few
// activation rows (decode: one) keeps several independent accumulator chains per row (`chains`), else one FMA
// chain's latency, not memory, sets its speed (measured: benchmarks/NOTES.md, "The CPU expert kernel at memory
// bandwidth"). Dot products accumulate in fp32: AVX512-BF16 `vdpbf16ps` on bf16 activations, else weights widened
// to fp32 (AVX-512F, AVX2+FMA or scalar) and multiplied with fp32 activations holding the same values.
// int8 weights carry one fp32 scale per output row. fp8 (e4m3fn) weights carry one fp32 scale per 128x128 block
// (kllama/experts/quant.py's layout, a grid per fused projection): a byte becomes fp16 bits by a shift (exactly
// value * 2^-8), F16C widens those to fp32, and each 128-column block's partial dot product is multiplied by its
// scale (times 2^8) before it is added. int4 weights (two a byte, one fp32 scale per row and 64 columns) meet
// activation rows split into even and odd columns, so their nibbles need no interleaving ("int4" below; on
// AVX512-VNNI, integer dot products). The instruction set is a runtime argument checked against the CPU, so one
// build runs anywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Checks throw nothing. A checking function returns its first failed check's message ("" when all went well) and
// hands its result back through an argument; `KL_CHECK(cond, parts...)` returns the parts joined into one string from
// the function it is in, `KL_TRY(call)` returns a called check's message. The functions Python calls return the
// message, and cpu_kernels.py raises it as a RuntimeError. On the H200 box (torch 2.11 CUDA wheel) every failed check
// crashed the process with a segfault: as a c10::Error from TORCH_CHECK, as a std::runtime_error that pybind11
// translated, and as a returned message built with std::ostringstream. What the three share is a C++ stream
// formatting the message, so the parts are appended to a std::string by hand: no exception and no iostream.
inline void append(std::string& text, const char* part) { text += part; }
inline void append(std::string& text, const std::string& part) { text += part; }
inline void append(std::string& text, c10::ScalarType part) { text += c10::toString(part); }
inline void append(std::string& text, c10::IntArrayRef part) {
  text += '[';
  for (size_t i = 0; i < part.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(part[i]);
  }
  text += ']';
}
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>>>
void append(std::string& text, Int part) {
  text += std::to_string(part);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string text;
  (append(text, parts), ...);
  return text;
}

#define KL_CHECK(cond, ...)                  \
  do {                                       \
    if (!(cond)) return message(__VA_ARGS__); \
  } while (false)

#define KL_TRY(call)                            \
  do {                                          \
    std::string failed_ = (call);               \
    if (!failed_.empty()) return failed_;       \
  } while (false)

constexpr int kMaxPairs = 8;        // activation rows one weight-row read serves at once (accumulators in registers)
constexpr int64_t kGrainRows = 16;  // fewest output rows per thread

// ---- The host jobs' own thread team ----
// A captured decode step runs a layer's CPU pass, then ~0.15 ms of GPU work, then the next layer's pass. An OpenMP
// team's threads fall asleep in that gap, and whenever more OpenMP threads exist than cores (the main thread's team
// and the hand-off thread's) libgomp lets them spin only ~100 times before they sleep, even between the two stages
// of one pass: every stage then starts by waking 14 threads, which on the H200 box's VM cost int8 passes ~15 % in
// decode against the same pass back to back (benchmarks/NOTES.md, nineteenth session). `SpinTeam`'s workers spin
// for `kSpinTeamIdle` after their last task before they sleep, so through a decode step they never do. Host jobs
// (`HostJob::run`) use it; a pass called from Python keeps OpenMP, whose threads torch's own CPU ops share.
constexpr auto kSpinTeamIdle = std::chrono::milliseconds(2);
thread_local bool t_spin_team = false;  // set while a host job runs on this thread

class SpinTeam {
 public:
  static SpinTeam& get() {
    static SpinTeam* team = new SpinTeam();  // never destroyed: its workers end with the process
    return *team;
  }
  // Runs task(i) for i in [0, size), the caller as 0; false (nothing run) when another thread holds the team.
  bool run(int size, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> own(busy_, std::try_to_lock);
    if (!own.owns_lock() || size > kMaxSize) return false;
    while (int(workers_.size()) < size - 1) {
      const int index = int(workers_.size()) + 1;
      workers_.emplace_back([this, index] { work(index); });
      workers_.back().detach();
    }
    task_ = &task;
    pending_.store(size - 1);
    // one word holds the run's number and size, so a worker never pairs one run's number with another's size
    state_.store((++runs_ << 8) | uint64_t(size));
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    task(0);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
    return true;
  }

 private:
  static constexpr int kMaxSize = 255;  // a run's size shares `state_` with its number

  // Each run a worker sees, it takes part in when its index is below the run's size. A run cannot end before its
  // takers finish, so a taker sees its run (and `task_` of it) before the next one begins.
  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now = state_.load(std::memory_order_acquire);
      auto since = std::chrono::steady_clock::now();
      for (int64_t spins = 1; now == seen; ++spins) {
        _mm_pause();
        if (spins % 1024 == 0 && std::chrono::steady_clock::now() - since > kSpinTeamIdle) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return state_.load() != seen; });
          sleepers_.fetch_sub(1);
          since = std::chrono::steady_clock::now();
        }
        now = state_.load(std::memory_order_acquire);
      }
      seen = now;
      if (uint64_t(index) < (now & 0xff)) {
        (*task_)(index);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex busy_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};  // (run number << 8) | run size
  uint64_t runs_ = 0;  // runs started (the caller holding `busy_` counts them)
  std::atomic<int> pending_{0}, sleepers_{0};
  const std::function<void(int)>* task_ = nullptr;
};

// Rows [begin, end) over the thread team (`SpinTeam` inside a host job, else OpenMP's; omp_get_max_threads()
// threads), handed out as they are asked for (guided: a thread takes the rows left over the team's size, rounded up
// to `grain`, so ranges shrink toward the end): a thread that a host preempts or that reads slower gets fewer rows
// instead of holding up the whole pass at the join. Every fork/join of a pass goes through here: an OpenMP region
// opened inside a host job would start a second team that spins on the cores where the SpinTeam's workers spin.
template <typename F>
void guided_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  const int64_t team = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / grain);
  if (team <= 1) {
    if (n > 0) f(begin, end);
    return;
  }
  std::atomic<int64_t> next{begin};
  const std::function<void(int)> body = [&](int) {
    for (;;) {
      int64_t start = next.load(std::memory_order_relaxed), take = 0;
      while (start < end) {
        take = std::min(end - start, ((end - start + team - 1) / team + grain - 1) / grain * grain);
        if (next.compare_exchange_weak(start, start + take, std::memory_order_relaxed)) break;
      }
      if (start >= end) break;
      f(start, start + take);
    }
  };
  if (t_spin_team && SpinTeam::get().run(int(team), body)) return;
#pragma omp parallel num_threads(int(team))
  body(omp_get_thread_num());
}

constexpr int64_t kBlock = 128;     // fp8 scale block edge (rows and columns), quant.py's BLOCK
constexpr float kFp8Unscale = 256.0f;  // fp8 bytes read as fp16 are value * 2^-8
constexpr int64_t kGroup = 64;      // int4 scale group (columns of a row: 32 bytes)
constexpr int64_t kSplit = 32;      // int4 activation chunk (columns): 16 bytes' low nibbles, then their high ones

// Independent accumulator chains per activation row. Each chain takes one FMA per 4-5 cycles (its latency), so a
// weight row advances by chains(n) vector steps per FMA latency whatever the number of rows n: one chain per row
// held a 1-token dot product to 8 (AVX2) or 16 (AVX-512) weights per latency, well below a core's share of the
// memory bandwidth. From 5 rows on, one chain each is what the FMA ports and AVX2's 16 registers take.
constexpr int chains(int n) { return n <= 2 ? 4 : n <= 4 ? 2 : 1; }

// Tiers, each including the ones below it (every CPU with AVX512-BF16 has AVX512-VNNI).
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4 };

#define KL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define KL_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define KL_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

int64_t best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) {
    return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512Vnni;
  }
  if (avx512) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kAvx2;
  }
  return kScalar;
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch rounds (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// e4m3fn byte -> fp16 bits of value * 2^-8: e4m3's 7 magnitude bits at fp16's bits 13..7, the sign at bit 15 (fp16's
// exponent bias is 8 more than e4m3's, for normals and subnormals alike). NaN (0x7f, 0xff) is never quantized to.
inline uint16_t fp8_half_bits(uint8_t b) { return uint16_t((b & 0x80u) << 8 | (b & 0x7fu) << 7); }

inline float half_to_f32(uint16_t h) {  // exact, without F16C
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {  // subnormal (or zero): man * 2^-24
    float mag = float(man) * 0x1p-24f;
    std::memcpy(&u, &mag, sizeof u);
  } else {
    u = exp == 0x1fu ? (0xffu << 23 | man << 13) : ((exp + 112u) << 23 | man << 13);
  }
  u |= sign;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float fp8_scaled(uint8_t b) { return half_to_f32(fp8_half_bits(b)); }  // value * 2^-8

// res[i] = sum_k w[k] * a_i[k] for n = N activation rows `a` (N <= kMaxPairs) of length `len`; `w` is one weight
// row, the next row (prefetched) follows it in memory. `blocks` (fp8 and int4, else unused) holds the scales of the
// row's column blocks (fp8: 128 columns, each block's partial sum is multiplied by its scale; int4: 64-column
// groups, each weight is multiplied by its group's scale, as the fp32 reference dequantizes it).
using RowDot = void (*)(const void* w, const float* blocks, const void* const* a, int64_t len, float* res);
using DotTable = std::array<RowDot, kMaxPairs + 1>;  // index: number of activation rows

// ---- scalar (any CPU) ----
template <int N>
struct ScalarBf16 {
  static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const uint16_t* w = static_cast<const uint16_t*>(w_);
    for (int i = 0; i < N; ++i) {
      const float* a = static_cast<const float*>(a_[i]);
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= len; k += 8) {
        for (int l = 0; l < 8; ++l) part[l] += bf16_to_f32(w[k + l]) * a[k + l];
      }
      float sum = 0;
      for (int l = 0; l < 8; ++l) sum += part[l];
      for (; k < len; ++k) sum += bf16_to_f32(w[k]) * a[k];
      res[i] = sum;
    }
  }
};

template <int N>
struct ScalarInt8 {
  static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const int8_t* w = static_cast<const int8_t*>(w_);
    for (int i = 0; i < N; ++i) {
      const float* a = static_cast<const float*>(a_[i]);
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= len; k += 8) {
        for (int l = 0; l < 8; ++l) part[l] += float(w[k + l]) * a[k + l];
      }
      float sum = 0;
      for (int l = 0; l < 8; ++l) sum += part[l];
      for (; k < len; ++k) sum += float(w[k]) * a[k];
      res[i] = sum;
    }
  }
};

template <int N>
struct ScalarFp8 {
  static void run(const void* w_, const float* blocks, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    for (int i = 0; i < N; ++i) {
      const float* a = static_cast<const float*>(a_[i]);
      float sum = 0;
      for (int64_t k0 = 0, b = 0; k0 < len; k0 += kBlock, ++b) {
        const int64_t k1 = std::min(len, k0 + kBlock);
        float part = 0;
        for (int64_t k = k0; k < k1; ++k) part += fp8_scaled(w[k]) * a[k];
        sum += part * (blocks[b] * kFp8Unscale);
      }
      res[i] = sum;
    }
  }
};

// int4: byte b of a row holds column 2b in its low nibble and 2b + 1 in its high one, each as q + 8, q in [-7, 7],
// with one fp32 scale per 64 columns (32 bytes). The activation rows come split (`ActForm::kF32Split`): each chunk of
// 32 columns as its 16 even columns, then its 16 odd ones (zeros past len), so the low nibbles of a chunk's 16 bytes
// meet 16 consecutive floats and the high nibbles the next 16, with no shuffle of the weights (the split copy is made
// once per activation row and stage, and read by every weight row). Every fp32 path turns a nibble into q * scale
// rounded once to fp32, the weight the fp32 reference dequantizes to (AVX512-VNNI: integers, see there).
template <int N>
struct ScalarInt4 {
  static void run(const void* w_, const float* groups, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    for (int i = 0; i < N; ++i) {
      const float* a = static_cast<const float*>(a_[i]);
      float sum = 0;
      for (int64_t b = 0; b < len / 2; ++b) {
        const float s = groups[b / (kGroup / 2)];
        const float* even = a + b / (kSplit / 2) * kSplit + b % (kSplit / 2);  // the byte's odd column: 16 on
        sum += float(int(w[b] & 15u) - 8) * s * even[0];
        sum += float(int(w[b] >> 4) - 8) * s * even[kSplit / 2];
      }
      res[i] = sum;
    }
  }
};

// ---- AVX2 + FMA (+F16C) ----
KL_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int U>
KL_AVX2 inline __m256 sum_chains(const __m256* c) {  // c[0] + ... + c[U - 1], pairwise
  if constexpr (U == 1) {
    return c[0];
  } else {
    return _mm256_add_ps(sum_chains<U / 2>(c), sum_chains<U / 2>(c + U / 2));
  }
}

template <int N>
struct Avx2Bf16 {
  static constexpr int U = chains(N);
  KL_AVX2 static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const uint16_t* w = static_cast<const uint16_t*>(w_);
    const float* a[N];
    __m256 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * U <= len; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 8 * u;
        if ((ku & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + ku));
        __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        for (int i = 0; i < N; ++i) acc[i][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + ku), acc[i][u]);
      }
    }
    for (; k + 8 <= len; k += 8) {
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + k), acc[i][0]);
    }
    for (int i = 0; i < N; ++i) {
      float sum = hsum256(sum_chains<U>(acc[i]));
      for (int64_t t = k; t < len; ++t) sum += bf16_to_f32(w[t]) * a[i][t];
      res[i] = sum;
    }
  }
};

template <int N>
struct Avx2Int8 {
  static constexpr int U = chains(N);
  KL_AVX2 static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const int8_t* w = static_cast<const int8_t*>(w_);
    const float* a[N];
    __m256 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * U <= len; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 8 * u;
        if ((ku & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
        __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + ku))));
        for (int i = 0; i < N; ++i) acc[i][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + ku), acc[i][u]);
      }
    }
    for (; k + 8 <= len; k += 8) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
      __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + k), acc[i][0]);
    }
    for (int i = 0; i < N; ++i) {
      float sum = hsum256(sum_chains<U>(acc[i]));
      for (int64_t t = k; t < len; ++t) sum += float(w[t]) * a[i][t];
      res[i] = sum;
    }
  }
};

KL_AVX2 inline __m256 fp8x8_avx2(const uint8_t* w) {  // 8 e4m3 bytes -> 8 floats, value * 2^-8
  const __m128i wide = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));  // sign-extended
  // bits 13..7 the magnitude, bit 15 the sign (bit 14, a copy of the sign, is masked off: 0xBF80)
  return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(wide, 7), _mm_set1_epi16(int16_t(0xBF80))));
}

template <int N>
struct Avx2Fp8 {
  static constexpr int U = chains(N);  // divides the 16 steps of 8 bytes of a whole block
  KL_AVX2 static void run(const void* w_, const float* blocks, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    const float* a[N];
    __m256 acc[N];
    float tail[N];
    for (int i = 0; i < N; ++i) a[i] = static_cast<const float*>(a_[i]), acc[i] = _mm256_setzero_ps(), tail[i] = 0;
    for (int64_t k0 = 0, b = 0; k0 < len; k0 += kBlock, ++b) {
      const int64_t k1 = std::min(len, k0 + kBlock);
      const float scale = blocks[b] * kFp8Unscale;
      __m256 part[N][U];
      for (int i = 0; i < N; ++i) {
        for (int u = 0; u < U; ++u) part[i][u] = _mm256_setzero_ps();
      }
      int64_t k = k0;
      for (; k + 8 * U <= k1; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const int64_t ku = k + 8 * u;
          if ((ku & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
          const __m256 wf = fp8x8_avx2(w + ku);
          for (int i = 0; i < N; ++i) part[i][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + ku), part[i][u]);
        }
      }
      for (; k + 8 <= k1; k += 8) {  // the last block's tail
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
        const __m256 wf = fp8x8_avx2(w + k);
        for (int i = 0; i < N; ++i) part[i][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[i] + k), part[i][0]);
      }
      const __m256 s = _mm256_set1_ps(scale);
      for (int i = 0; i < N; ++i) {
        acc[i] = _mm256_fmadd_ps(sum_chains<U>(part[i]), s, acc[i]);
        float t = 0;
        for (int64_t q = k; q < k1; ++q) t += fp8_scaled(w[q]) * a[i][q];  // the last block's scalar tail
        tail[i] += t * scale;
      }
    }
    for (int i = 0; i < N; ++i) res[i] = hsum256(acc[i]) + tail[i];
  }
};

// 16 int4 bytes (32 columns from `col`, a multiple of 32) into the chains of N split activation rows: per 8 bytes one
// widening to 32-bit lanes, the low nibbles masked and the high ones shifted down, each converted and turned into
// q * scale = (nibble - 8) * scale by one FMA (nibble * s - 8 s, exact before its one rounding).
template <int N, int U>
KL_AVX2 inline void int4_chunk_avx2(const uint8_t* w, __m256 s, __m256 minus8s, const float* const* a, int64_t col,
                                    __m256 (*acc)[U]) {
  const __m256i low = _mm256_set1_epi32(15);
  for (int q = 0; q < 2; ++q) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * q)));
    const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), s, minus8s);
    const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, minus8s);
    for (int i = 0; i < N; ++i) {
      acc[i][(2 * q) % U] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(a[i] + col + 8 * q), acc[i][(2 * q) % U]);
      acc[i][(2 * q + 1) % U] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(a[i] + col + 16 + 8 * q), acc[i][(2 * q + 1) % U]);
    }
  }
}

template <int N>
struct Avx2Int4 {
  static constexpr int U = chains(N);
  KL_AVX2 static void run(const void* w_, const float* groups, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    const int64_t bytes = len / 2, num_groups = (len + kGroup - 1) / kGroup;
    const float* a[N];
    __m256 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    }
    _mm_prefetch(reinterpret_cast<const char*>(groups + num_groups), _MM_HINT_T0);  // the next row's scales
    for (int64_t b = 0, g = 0; b < bytes; b += kGroup / 2, ++g) {
      if ((b & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + bytes + b), _MM_HINT_T0);
      const __m256 s = _mm256_set1_ps(groups[g]), minus8s = _mm256_set1_ps(-8.0f * groups[g]);
      for (int64_t c = b; c < std::min(bytes, b + kGroup / 2); c += kSplit / 2) {
        if (bytes - c >= kSplit / 2) {
          int4_chunk_avx2<N, U>(w + c, s, minus8s, a, 2 * c, acc);
        } else {  // the row's last bytes: zero bytes (q = -8) meet the split rows' zero padding
          uint8_t tail[kSplit / 2] = {};
          std::memcpy(tail, w + c, size_t(bytes - c));
          int4_chunk_avx2<N, U>(tail, s, minus8s, a, 2 * c, acc);
        }
      }
    }
    for (int i = 0; i < N; ++i) res[i] = hsum256(sum_chains<U>(acc[i]));
  }
};

// ---- AVX-512F (+BW/VL for masked tails) ----
template <int U>
KL_AVX512 inline __m512 sum_chains512(const __m512* c) {  // c[0] + ... + c[U - 1], pairwise
  if constexpr (U == 1) {
    return c[0];
  } else {
    return _mm512_add_ps(sum_chains512<U / 2>(c), sum_chains512<U / 2>(c + U / 2));
  }
}

template <int N>
struct Avx512Bf16W {  // bf16 weights widened to fp32, fp32 activations
  static constexpr int U = chains(N);
  KL_AVX512 static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const uint16_t* w = static_cast<const uint16_t*>(w_);
    const float* a[N];
    __m512 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 * U <= len; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 16 * u;
        if ((ku & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ku));
        __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        for (int i = 0; i < N; ++i) acc[i][u] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(a[i] + ku), acc[i][u]);
      }
    }
    for (; k + 16 <= len; k += 16) {
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(a[i] + k), acc[i][0]);
    }
    if (k < len) {
      __mmask16 m = __mmask16((1u << (len - k)) - 1u);
      __m256i raw = _mm256_maskz_loadu_epi16(m, w + k);
      __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(m, a[i] + k), acc[i][0]);
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(sum_chains512<U>(acc[i]));
  }
};

template <int N>
struct Avx512Int8 {
  static constexpr int U = chains(N);
  KL_AVX512 static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const int8_t* w = static_cast<const int8_t*>(w_);
    const float* a[N];
    __m512 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 * U <= len; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 16 * u;
        if ((ku & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + ku));
        __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
        for (int i = 0; i < N; ++i) acc[i][u] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(a[i] + ku), acc[i][u]);
      }
    }
    for (; k + 16 <= len; k += 16) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(a[i] + k), acc[i][0]);
    }
    if (k < len) {
      __mmask16 m = __mmask16((1u << (len - k)) - 1u);
      __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k)));
      for (int i = 0; i < N; ++i) acc[i][0] = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(m, a[i] + k), acc[i][0]);
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(sum_chains512<U>(acc[i]));
  }
};

KL_AVX512 inline __m512 fp8x16_avx512(__m128i raw) {  // 16 e4m3 bytes -> 16 floats, value * 2^-8
  const __m256i wide = _mm256_cvtepi8_epi16(raw);
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(int16_t(0xBF80))));
}

template <int N>
struct Avx512Fp8 {  // 32 bytes per conversion into two chains; U chains per activation row (one row: 4)
  static constexpr int U = chains(N) < 2 ? 2 : chains(N);  // even, divides the 8 steps of 16 bytes of a block
  KL_AVX512 static void run(const void* w_, const float* blocks, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    const float* a[N];
    __m512 acc[N];
    for (int i = 0; i < N; ++i) a[i] = static_cast<const float*>(a_[i]), acc[i] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi16(int16_t(0xBF80));
    for (int64_t k0 = 0, b = 0; k0 < len; k0 += kBlock, ++b) {
      const int64_t k1 = std::min(len, k0 + kBlock);
      __m512 part[N][U];
      for (int i = 0; i < N; ++i) {
        for (int u = 0; u < U; ++u) part[i][u] = _mm512_setzero_ps();
      }
      int64_t k = k0;
      for (; k + 16 * U <= k1; k += 16 * U) {
        for (int u = 0; u < U; u += 2) {
          const int64_t ku = k + 16 * u;
          if ((ku & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ku));
          const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(raw), 7), mask);
          const __m512 w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
          const __m512 w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
          for (int i = 0; i < N; ++i) {
            part[i][u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(a[i] + ku), part[i][u]);
            part[i][u + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(a[i] + ku + 16), part[i][u + 1]);
          }
        }
      }
      for (; k + 16 <= k1; k += 16) {  // the last block's tail
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
        const __m512 wf = fp8x16_avx512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
        for (int i = 0; i < N; ++i) part[i][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(a[i] + k), part[i][0]);
      }
      if (k < k1) {
        const __mmask16 m = __mmask16((1u << (k1 - k)) - 1u);
        const __m512 wf = fp8x16_avx512(_mm_maskz_loadu_epi8(m, w + k));
        for (int i = 0; i < N; ++i) part[i][0] = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(m, a[i] + k), part[i][0]);
      }
      const __m512 s = _mm512_set1_ps(blocks[b] * kFp8Unscale);
      for (int i = 0; i < N; ++i) acc[i] = _mm512_fmadd_ps(sum_chains512<U>(part[i]), s, acc[i]);
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(acc[i]);
  }
};

// 16 int4 bytes (32 columns from `col`) into the chains of N split activation rows: one widening of the bytes to
// 32-bit lanes; `vpermps` reads only an index's low 4 bits, so the lanes index a 16-entry table of
// (nibble - 8) * scale as they are (low nibbles) and shifted down by 4 (high nibbles): two permutes give 32 weights.
template <int N, int U>
KL_AVX512 inline void int4_chunk_avx512(__m128i raw, __m512 table, const float* const* a, int64_t col,
                                        __m512 (*acc)[U], int u0) {
  const __m512i v = _mm512_cvtepu8_epi32(raw);
  const __m512 lo = _mm512_permutexvar_ps(v, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  for (int i = 0; i < N; ++i) {
    acc[i][u0 % U] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(a[i] + col), acc[i][u0 % U]);
    acc[i][(u0 + 1) % U] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(a[i] + col + 16), acc[i][(u0 + 1) % U]);
  }
}

template <int N>
struct Avx512Int4 {
  static constexpr int U = chains(N);
  KL_AVX512 static void run(const void* w_, const float* groups, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    const int64_t bytes = len / 2, num_groups = (len + kGroup - 1) / kGroup;
    const float* a[N];
    __m512 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const float*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    }
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  // nibble - 8
    _mm_prefetch(reinterpret_cast<const char*>(groups + num_groups), _MM_HINT_T0);  // the next row's scales
    int64_t b = 0, g = 0;
    for (; b + kGroup / 2 <= bytes; b += kGroup / 2, ++g) {
      if ((b & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + bytes + b), _MM_HINT_T0);
      const __m512 table = _mm512_mul_ps(q, _mm512_set1_ps(groups[g]));
      int4_chunk_avx512<N, U>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b)), table, a, 2 * b, acc, 0);
      int4_chunk_avx512<N, U>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b + 16)), table, a, 2 * b + 32,
                              acc, 2);
    }
    if (b < bytes) {  // a shorter last group: masked bytes load as 0 (q = -8) and meet the split rows' zero padding
      const __m512 table = _mm512_mul_ps(q, _mm512_set1_ps(groups[g]));
      for (int u0 = 0; b < bytes; b += kSplit / 2, u0 += 2) {
        const int64_t n = std::min<int64_t>(kSplit / 2, bytes - b);
        const __m128i raw = _mm_maskz_loadu_epi8(__mmask16((1u << n) - 1u), w + b);
        int4_chunk_avx512<N, U>(raw, table, a, 2 * b, acc, u0);
      }
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(sum_chains512<U>(acc[i]));
  }
};

// ---- AVX512-BF16: bf16 weights times bf16 activations, fp32 accumulation in one instruction per 32 pairs ----
template <int N>
struct Avx512Bf16Dp {
  static constexpr int U = chains(N);
  KL_AVX512BF16 static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const uint16_t* w = static_cast<const uint16_t*>(w_);
    const uint16_t* a[N];
    __m512 acc[N][U];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const uint16_t*>(a_[i]);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 32 * U <= len; k += 32 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 32 * u;
        _mm_prefetch(reinterpret_cast<const char*>(w + len + ku), _MM_HINT_T0);
        __m512i wv = _mm512_loadu_si512(w + ku);
        for (int i = 0; i < N; ++i) {
          __m512i av = _mm512_loadu_si512(a[i] + ku);
          acc[i][u] = _mm512_dpbf16_ps(acc[i][u], (__m512bh)av, (__m512bh)wv);
        }
      }
    }
    for (; k + 32 <= len; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + len + k), _MM_HINT_T0);
      __m512i wv = _mm512_loadu_si512(w + k);
      for (int i = 0; i < N; ++i) {
        __m512i av = _mm512_loadu_si512(a[i] + k);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)av, (__m512bh)wv);
      }
    }
    if (k < len) {
      __mmask32 m = __mmask32((1ull << (len - k)) - 1ull);
      __m512i wv = _mm512_maskz_loadu_epi16(m, w + k);
      for (int i = 0; i < N; ++i) {
        __m512i av = _mm512_maskz_loadu_epi16(m, a[i] + k);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)av, (__m512bh)wv);
      }
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(sum_chains512<U>(acc[i]));
  }
};

// ---- AVX512-VNNI: int8 weights times activations as 24-bit integers, exact int32 accumulation ----
// An activation row a [len] becomes q = round(a / scale), |q| <= kDigitMax, scale = max|a| / kDigitMax, written in
// three signed base-256 digits d0 + 256 d1 + 65536 d2, each in [-128, 127] (`QuantRow`, one byte plane a digit).
// `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes a step, so the weights are the unsigned operand:
// w + 128 (the sign bit flipped), and the 128 * sum(d) that adds is taken off once per row from the digits' sums.
// Per plane, sum_k w_k d_k is exact in int32: |(w + 128) d| <= 255 * 128 = 32640 a product, so a row of up to
// kMaxDigitLen = 65792 columns sums to below 2^31 (65792 x 32640 = 2^31 - 32768) in every lane and in the lanes'
// total (H = 2048: 66.8e6; I = 1408: 46.0e6; V3's H = 7168: 234e6); the planes are combined in int64 and scaled once
// in double. So the only error against the fp32 reference is q's rounding: |a - scale * q| <= 2 * scale (half a
// step, plus the fp32 rounding of a * (kDigitMax / max|a|)), a dot product off by at most 2 * max|a| / kDigitMax *
// sum|w| ~ 2.4e-7 max|a| sum|w| (random rows: ~1e-7 relative), the size of fp32 accumulation's own error over a row.
// Each 64-byte weight step costs one load, one xor and 3 `vpdpbusd` per activation row (the fp32 path: 8 conversions
// and 4 FMAs), so a core keeps more weight lines in flight.
constexpr int32_t kDigitMax = 127 * 65793;  // 0x7f7f7f: the largest q whose three digits stay in [-128, 127]
constexpr int64_t kMaxDigitLen = 65792;

struct QuantRow {  // an activation row as value = scale * (d[0] + 256 d[1] + 65536 d[2]); planes zero past len
  const int8_t* d[3];
  float scale;
  int32_t sum[3];  // each plane's digits summed
};

// Fills `q` from the fp32 row `a [len]` into the three planes `d0..d2` [padded] (padded: len rounded up to 64).
KL_AVX512VNNI void quantize_row(const float* a, int64_t len, int64_t padded, int8_t* d0, int8_t* d1, int8_t* d2,
                                QuantRow& q) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = len - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - k)) - 1u);
    peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, a + k)));
  }
  // a floor, so that kDigitMax / top stays finite (rows below it are digitized at that scale: q ~ 0)
  const float top = std::max(_mm512_reduce_max_ps(peak), 1e-30f);
  const __m512 inv = _mm512_set1_ps(float(kDigitMax) / top);
  const __m512i hi = _mm512_set1_epi32(kDigitMax), lo = _mm512_set1_epi32(-kDigitMax);
  const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512(), s2 = _mm512_setzero_si512();
  for (int64_t k = 0; k < padded; k += 16) {
    const __mmask16 m = k >= len ? __mmask16(0) : len - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - k)) - 1u);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + k), inv));  // nearest, ties even
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    const __m512i e0 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, half), byte), half);  // [-128, 127]
    v = _mm512_srai_epi32(_mm512_sub_epi32(v, e0), 8);  // exact: v - e0 is a multiple of 256
    const __m512i e1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, half), byte), half);
    const __m512i e2 = _mm512_srai_epi32(_mm512_sub_epi32(v, e1), 8);  // in [-127, 127] as |q| <= kDigitMax
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d0 + k), _mm512_cvtepi32_epi8(e0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d1 + k), _mm512_cvtepi32_epi8(e1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d2 + k), _mm512_cvtepi32_epi8(e2));
    s0 = _mm512_add_epi32(s0, e0), s1 = _mm512_add_epi32(s1, e1), s2 = _mm512_add_epi32(s2, e2);
  }
  q = QuantRow{{d0, d1, d2}, top / float(kDigitMax),
               {_mm512_reduce_add_epi32(s0), _mm512_reduce_add_epi32(s1), _mm512_reduce_add_epi32(s2)}};
}

template <int N>
struct Avx512Int8Vnni {  // the activation rows are `QuantRow`s; 3 planes are 3 independent chains per row
  KL_AVX512VNNI static void run(const void* w_, const float*, const void* const* a_, int64_t len, float* res) {
    const int8_t* w = static_cast<const int8_t*>(w_);
    const QuantRow* a[N];
    __m512i acc[N][3];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const QuantRow*>(a_[i]);
      for (int p = 0; p < 3; ++p) acc[i][p] = _mm512_setzero_si512();
    }
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) {
      // two rows ahead, where the other paths look one: an int8 row is half a bf16 row's bytes, and 2 rows ahead took
      // 0.95-0.97x the time of 1 at one token on the dev box (three runs, 8-20 interleaved rounds) and 0.97x on an H200
      // box; 3 or 4 rows gained nothing more (benchmarks/NOTES.md, seventeenth session)
      _mm_prefetch(reinterpret_cast<const char*>(w + 2 * len + k), _MM_HINT_T0);
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);  // w + 128, unsigned
      for (int i = 0; i < N; ++i) {
        for (int p = 0; p < 3; ++p) acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], wv, _mm512_loadu_si512(a[i]->d[p] + k));
      }
    }
    if (k < len) {  // masked weight bytes load as 0 (128 once flipped) and meet zero digits past len
      const __mmask64 m = __mmask64((1ull << (len - k)) - 1ull);
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + k), flip);
      for (int i = 0; i < N; ++i) {
        for (int p = 0; p < 3; ++p) acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], wv, _mm512_loadu_si512(a[i]->d[p] + k));
      }
    }
    for (int i = 0; i < N; ++i) {
      int64_t dot = 0;
      for (int p = 0; p < 3; ++p) {
        const int64_t plane = int64_t(_mm512_reduce_add_epi32(acc[i][p])) - 128 * int64_t(a[i]->sum[p]);
        dot += plane * (int64_t(1) << (8 * p));
      }
      res[i] = float(double(dot) * double(a[i]->scale));
    }
  }
};

// Gate row j and up row j against the same activation rows in one pass (stage 1 of a pass with few rows an expert):
// each digit plane load serves both rows, and two weight streams are in flight in one loop. At one token on the dev
// box this took 0.92-0.95x the time of two `Avx512Int8Vnni` calls; from 4 rows on it took 1.06x (24 accumulators
// leave the registers short), so it serves up to `kMaxPairedRows` (benchmarks/NOTES.md, seventeenth session).
constexpr int kMaxPairedRows = 2;

template <int N>
struct Avx512Int8VnniPair {
  KL_AVX512VNNI static void run(const void* w0_, const void* w1_, const void* const* a_, int64_t len, float* res0,
                                float* res1) {
    const int8_t* w0 = static_cast<const int8_t*>(w0_);
    const int8_t* w1 = static_cast<const int8_t*>(w1_);
    const QuantRow* a[N];
    __m512i acc0[N][3], acc1[N][3];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const QuantRow*>(a_[i]);
      for (int p = 0; p < 3; ++p) acc0[i][p] = acc1[i][p] = _mm512_setzero_si512();
    }
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + 2 * len + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + 2 * len + k), _MM_HINT_T0);
      const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(w0 + k), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(w1 + k), flip);
      for (int i = 0; i < N; ++i) {
        for (int p = 0; p < 3; ++p) {
          const __m512i d = _mm512_loadu_si512(a[i]->d[p] + k);
          acc0[i][p] = _mm512_dpbusd_epi32(acc0[i][p], v0, d);
          acc1[i][p] = _mm512_dpbusd_epi32(acc1[i][p], v1, d);
        }
      }
    }
    if (k < len) {
      const __mmask64 m = __mmask64((1ull << (len - k)) - 1ull);
      const __m512i v0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w0 + k), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w1 + k), flip);
      for (int i = 0; i < N; ++i) {
        for (int p = 0; p < 3; ++p) {
          const __m512i d = _mm512_loadu_si512(a[i]->d[p] + k);
          acc0[i][p] = _mm512_dpbusd_epi32(acc0[i][p], v0, d);
          acc1[i][p] = _mm512_dpbusd_epi32(acc1[i][p], v1, d);
        }
      }
    }
    for (int i = 0; i < N; ++i) {
      int64_t dot0 = 0, dot1 = 0;
      for (int p = 0; p < 3; ++p) {
        const int64_t corr = 128 * int64_t(a[i]->sum[p]);
        dot0 += (int64_t(_mm512_reduce_add_epi32(acc0[i][p])) - corr) * (int64_t(1) << (8 * p));
        dot1 += (int64_t(_mm512_reduce_add_epi32(acc1[i][p])) - corr) * (int64_t(1) << (8 * p));
      }
      res0[i] = float(double(dot0) * double(a[i]->scale));
      res1[i] = float(double(dot1) * double(a[i]->scale));
    }
  }
};

// The same for bf16 weights and activations (AVX512-BF16): 0.89-0.92x the time of two `Avx512Bf16Dp` calls at one
// and two tokens on the dev box.
template <int N>
struct Avx512Bf16DpPair {
  KL_AVX512BF16 static void run(const void* w0_, const void* w1_, const void* const* a_, int64_t len, float* res0,
                                float* res1) {
    const uint16_t* w0 = static_cast<const uint16_t*>(w0_);
    const uint16_t* w1 = static_cast<const uint16_t*>(w1_);
    const uint16_t* a[N];
    __m512 acc0[N][2], acc1[N][2];
    for (int i = 0; i < N; ++i) {
      a[i] = static_cast<const uint16_t*>(a_[i]);
      for (int u = 0; u < 2; ++u) acc0[i][u] = acc1[i][u] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + len + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + len + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w0 + len + k + 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + len + k + 32), _MM_HINT_T0);
      for (int u = 0; u < 2; ++u) {
        const __m512i v0 = _mm512_loadu_si512(w0 + k + 32 * u), v1 = _mm512_loadu_si512(w1 + k + 32 * u);
        for (int i = 0; i < N; ++i) {
          const __m512i av = _mm512_loadu_si512(a[i] + k + 32 * u);
          acc0[i][u] = _mm512_dpbf16_ps(acc0[i][u], (__m512bh)av, (__m512bh)v0);
          acc1[i][u] = _mm512_dpbf16_ps(acc1[i][u], (__m512bh)av, (__m512bh)v1);
        }
      }
    }
    for (; k < len; k += 32) {
      const __mmask32 m = len - k >= 32 ? ~__mmask32(0) : __mmask32((1ull << (len - k)) - 1ull);
      const __m512i v0 = _mm512_maskz_loadu_epi16(m, w0 + k), v1 = _mm512_maskz_loadu_epi16(m, w1 + k);
      for (int i = 0; i < N; ++i) {
        const __m512i av = _mm512_maskz_loadu_epi16(m, a[i] + k);
        acc0[i][0] = _mm512_dpbf16_ps(acc0[i][0], (__m512bh)av, (__m512bh)v0);
        acc1[i][0] = _mm512_dpbf16_ps(acc1[i][0], (__m512bh)av, (__m512bh)v1);
      }
    }
    for (int i = 0; i < N; ++i) {
      res0[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i][0], acc0[i][1]));
      res1[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc1[i][0], acc1[i][1]));
    }
  }
};

// gate[n], up[n] = the dot products of two weight rows with n activation rows
using PairDot = void (*)(const void* w0, const void* w1, const void* const* a, int64_t len, float* res0, float* res1);
using PairTable = std::array<PairDot, kMaxPairedRows + 1>;  // index: number of activation rows

template <template <int> class Op, int... Ns>
PairTable make_pairs(std::integer_sequence<int, Ns...>) {
  return {nullptr, &Op<Ns + 1>::run...};
}

template <template <int> class Op>
PairTable pair_table() {
  return make_pairs<Op>(std::make_integer_sequence<int, kMaxPairedRows>{});
}

// ---- AVX512-VNNI, int4 weights: nibbles times activations as 24-bit integers, exact per 8 columns ----
// The fp32 int4 path costs ~14 vector instructions per 64 weights at one token (widening, two permutes, four FMAs),
// which held it to the int8 path's time on the dev box's 2 AVX-512 cores (measured: compute-bound, as fast from the L3
// cache as from DRAM). Here 64 weight bytes become 128 unsigned nibbles in two instructions (an AND; a shift and an
// AND), and `vpdpbusd` multiplies them by the activation row's digit bytes (`QuantRow`'s three planes, each 128-column
// chunk as its 64 even columns, then its 64 odd ones: `SplitDigits`). A 32-bit lane l of a 64-byte step sums the
// columns 8l..8l+7 of one 64-column group (lanes 0-7: the step's first group, 8-15: its second), so per step and token
// the three planes' lanes are combined exactly in int32 (sum nibble * q <= 8 x 15 x kDigitMax < 2^31), the nibbles'
// offset of 8 is taken off (8 x the lane's sum of q, precomputed per row), and the lane is converted to fp32 and
// multiplied by its group's scale. The only errors are q's rounding (as for int8 on this tier: ~2.4e-7 x max|a| x
// sum|w| a dot product) and fp32's rounding of each lane's sum.
constexpr int64_t kSplitDigits = 128;  // columns of a `SplitDigits` chunk (64 weight bytes)

struct SplitDigits {  // an activation row as value = scale * q, q = d[0] + 256 d[1] + 65536 d[2]
  const int8_t* d[3];   // planes, each chunk as 64 even columns, then 64 odd ones, zeros past len
  const int32_t* corr;  // per chunk, 16 lanes: 8 x the sum of q over the chunk's columns 8l..8l+7
  float scale;
};

template <int N>
struct Avx512Int4Vnni {
  KL_AVX512VNNI static void run(const void* w_, const float* groups, const void* const* a_, int64_t len, float* res) {
    const uint8_t* w = static_cast<const uint8_t*>(w_);
    const int64_t bytes = len / 2, num_groups = (len + kGroup - 1) / kGroup;
    const SplitDigits* a[N];
    __m512 acc[N];
    for (int i = 0; i < N; ++i) a[i] = static_cast<const SplitDigits*>(a_[i]), acc[i] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    _mm_prefetch(reinterpret_cast<const char*>(groups + num_groups), _MM_HINT_T0);  // the next row's scales
    for (int64_t b = 0, c = 0; b < bytes; b += kSplitDigits / 2, ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + bytes + b), _MM_HINT_T0);
      const __m512i raw = bytes - b >= 64 ? _mm512_loadu_si512(w + b)
                                          : _mm512_maskz_loadu_epi8(__mmask64((1ull << (bytes - b)) - 1ull), w + b);
      const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      const float second = 2 * c + 1 < num_groups ? groups[2 * c + 1] : 0.0f;  // none: its lanes are all zero
      const __m512 s = _mm512_mask_blend_ps(__mmask16(0xff00), _mm512_set1_ps(groups[2 * c]), _mm512_set1_ps(second));
      const int64_t col = c * kSplitDigits;
      for (int i = 0; i < N; ++i) {  // t = ((plane 2) * 256 + plane 1) * 256 + plane 0, Horner's way
        __m512i t = zero;
        for (int q = 2; q >= 0; --q) {
          const int8_t* d = a[i]->d[q] + col;
          if (q < 2) t = _mm512_slli_epi32(t, 8);
          t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t, lo, _mm512_loadu_si512(d)), hi, _mm512_loadu_si512(d + 64));
        }
        t = _mm512_sub_epi32(t, _mm512_loadu_si512(a[i]->corr + 16 * c));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[i]);
      }
    }
    for (int i = 0; i < N; ++i) res[i] = _mm512_reduce_add_ps(acc[i]) * a[i]->scale;
  }
};

template <template <int> class Op, int... Ns>
DotTable make_table(std::integer_sequence<int, Ns...>) {
  return DotTable{nullptr, &Op<Ns + 1>::run...};
}

template <template <int> class Op>
DotTable table() {
  return make_table<Op>(std::make_integer_sequence<int, kMaxPairs>{});
}

enum class Weights { kBf16, kInt8, kFp8, kInt4 };  // int4: two per uint8 byte

Weights weights_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kChar: return Weights::kInt8;
    case at::kFloat8_e4m3fn: return Weights::kFp8;
    case at::kByte: return Weights::kInt4;
    default: return Weights::kBf16;
  }
}

at::ScalarType dtype_of(Weights kind) {
  static const std::array<at::ScalarType, 4> dtypes{at::kBFloat16, at::kChar, at::kFloat8_e4m3fn, at::kByte};
  return dtypes[static_cast<int>(kind)];
}

int64_t row_bytes(Weights kind, int64_t cols) {  // bytes of one weight row of `cols` columns
  return kind == Weights::kBf16 ? 2 * cols : kind == Weights::kInt4 ? cols / 2 : cols;
}

// How the dot products read activation rows: bf16 where the instruction takes bf16 (bf16 weights, AVX512-BF16),
// 24-bit integer digits where it takes bytes (int8 weights, AVX512-VNNI, rows short enough to sum exactly), fp32
// split into even and odd columns per 32 (int4 weights below AVX512-VNNI: the order of a chunk's nibbles), digits
// split per 128 columns (int4 weights, AVX512-VNNI), else fp32.
enum class ActForm { kF32, kBf16, kDigits, kF32Split, kDigitsSplit };

ActForm act_form(Weights kind, int64_t isa, int64_t len) {
  if (kind == Weights::kInt4) return isa >= kAvx512Vnni ? ActForm::kDigitsSplit : ActForm::kF32Split;
  if (kind == Weights::kBf16 && isa >= kAvx512Bf16) return ActForm::kBf16;
  if (kind == Weights::kInt8 && isa >= kAvx512Vnni && len <= kMaxDigitLen) return ActForm::kDigits;
  return ActForm::kF32;
}

const DotTable& dot_table(Weights kind, int64_t isa, ActForm form) {
  static const DotTable avx512_vnni = table<Avx512Int8Vnni>(), avx512_vnni_int4 = table<Avx512Int4Vnni>();
  if (form == ActForm::kDigits) return avx512_vnni;
  if (form == ActForm::kDigitsSplit) return avx512_vnni_int4;
  static const DotTable scalar_bf16 = table<ScalarBf16>(), scalar_int8 = table<ScalarInt8>();
  static const DotTable avx2_bf16 = table<Avx2Bf16>(), avx2_int8 = table<Avx2Int8>();
  static const DotTable avx512_bf16 = table<Avx512Bf16W>(), avx512_int8 = table<Avx512Int8>();
  static const DotTable avx512_dp = table<Avx512Bf16Dp>();
  static const DotTable scalar_fp8 = table<ScalarFp8>(), avx2_fp8 = table<Avx2Fp8>(), avx512_fp8 = table<Avx512Fp8>();
  static const DotTable scalar_int4 = table<ScalarInt4>(), avx2_int4 = table<Avx2Int4>();
  static const DotTable avx512_int4 = table<Avx512Int4>();
  if (kind == Weights::kInt4) return isa >= kAvx512 ? avx512_int4 : isa == kAvx2 ? avx2_int4 : scalar_int4;
  if (kind == Weights::kFp8) return isa >= kAvx512 ? avx512_fp8 : isa == kAvx2 ? avx2_fp8 : scalar_fp8;
  if (kind == Weights::kInt8) return isa >= kAvx512 ? avx512_int8 : isa == kAvx2 ? avx2_int8 : scalar_int8;
  if (form == ActForm::kBf16) return avx512_dp;
  return isa >= kAvx512 ? avx512_bf16 : isa == kAvx2 ? avx2_bf16 : scalar_bf16;
}

// The gate/up pair dot products that read activations in `form`, or nullptr: int8 weights with VNNI (digits) and
// bf16 weights with AVX512-BF16 (bf16).
const PairDot* pair_dots(ActForm form) {
  static const PairTable vnni = pair_table<Avx512Int8VnniPair>(), bf16 = pair_table<Avx512Bf16DpPair>();
  return form == ActForm::kDigits ? vnni.data() : form == ActForm::kBf16 ? bf16.data() : nullptr;
}

// Activation rows in the representation the dot products read (`ActForm`), `cols` wide. Values are `set` as fp32
// (kept as fp32 for LoRA's first factor and the digits' or split rows' source, or as bf16), then `finish` makes the
// digit rows or the split rows.
struct Acts {
  ActForm form;
  int64_t rows, cols, padded, split_cols;  // padded: cols rounded up to 64 (a digit plane), split_cols: to 32
  std::vector<uint16_t> h;
  std::vector<float> f;
  std::vector<int8_t> digits;  // kDigits: per row, 3 planes of `padded` bytes
  std::vector<QuantRow> quant;
  std::vector<float> split;  // kF32Split: per row, `split_cols` floats, each 32 columns as 16 even, then 16 odd
  std::vector<int32_t> corr;  // kDigitsSplit: per row, 16 lanes a 128-column chunk (`SplitDigits`)
  std::vector<SplitDigits> split_quant;

  Acts(ActForm form_, int64_t rows_, int64_t cols_)
      : form(form_), rows(rows_), cols(cols_), padded((cols_ + 63) / 64 * 64),
        split_cols((cols_ + kSplit - 1) / kSplit * kSplit) {
    (form == ActForm::kBf16 ? h.resize(rows * cols) : f.resize(rows * cols));
    if (form == ActForm::kDigits) digits.resize(3 * rows * padded), quant.resize(rows);
    if (form == ActForm::kF32Split) split.assign(rows * split_cols, 0.0f);  // zeros past cols: int4's tail reads them
    if (form == ActForm::kDigitsSplit) {  // planes padded to whole chunks, zeros past cols
      digits.assign(3 * rows * chunked(), 0), corr.assign(rows * chunked() / 8, 0), split_quant.resize(rows);
    }
  }
  int64_t chunked() const { return (cols + kSplitDigits - 1) / kSplitDigits * kSplitDigits; }
  const void* row(int64_t r) const {  // what the weights' dot products read
    if (form == ActForm::kDigits) return &quant[r];
    if (form == ActForm::kF32Split) return split.data() + r * split_cols;
    if (form == ActForm::kDigitsSplit) return &split_quant[r];
    return lora_row(r);
  }
  const void* lora_row(int64_t r) const {  // what LoRA's (bf16-weight) dot products read
    return form == ActForm::kBf16 ? static_cast<const void*>(h.data() + r * cols)
                                  : static_cast<const void*>(f.data() + r * cols);
  }
  // `round` keeps the fp32 copy at bf16 values (bf16 weights read through the fp32 path)
  void set(int64_t r, int64_t c, float v, bool round) {
    if (form == ActForm::kBf16) {
      h[r * cols + c] = f32_to_bf16(v);
    } else {
      f[r * cols + c] = round ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
  }
  void split_digits(int64_t r, std::vector<int8_t>& plain);
  void finish() {  // once every value is set: the digit or split rows, one fork/join on the pass's team
    if (form == ActForm::kF32 || form == ActForm::kBf16) return;
    guided_rows(0, rows, 8, [&](int64_t r0, int64_t r1) {
      std::vector<int8_t> plain(form == ActForm::kDigitsSplit ? 3 * padded : 0);  // a row's planes, column order
      for (int64_t r = r0; r < r1; ++r) {
        if (form == ActForm::kDigits) {
          int8_t* d = digits.data() + 3 * r * padded;
          quantize_row(f.data() + r * cols, cols, padded, d, d + padded, d + 2 * padded, quant[r]);
        } else if (form == ActForm::kDigitsSplit) {
          split_digits(r, plain);
        } else {  // kF32Split
          const float* src = f.data() + r * cols;
          float* dst = split.data() + r * split_cols;
          for (int64_t c = 0; c < cols; ++c) dst[c / kSplit * kSplit + c % 2 * (kSplit / 2) + c % kSplit / 2] = src[c];
        }
      }
    });
  }
};

// Digitizes row r (`quantize_row`, into `plain`) and writes its planes in `SplitDigits` order with their lane sums.
void Acts::split_digits(int64_t r, std::vector<int8_t>& plain) {
  QuantRow q;
  quantize_row(f.data() + r * cols, cols, padded, plain.data(), plain.data() + padded, plain.data() + 2 * padded, q);
  const int64_t chunk_cols = chunked();
  int8_t* planes = digits.data() + 3 * r * chunk_cols;
  int32_t* sums = corr.data() + r * chunk_cols / 8;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t at = c / kSplitDigits * kSplitDigits + (c % 2) * (kSplitDigits / 2) + c % kSplitDigits / 2;
    for (int p = 0; p < 3; ++p) planes[p * chunk_cols + at] = plain[p * padded + c];
    sums[c / 8] += 8 * (int32_t(plain[c]) + 256 * int32_t(plain[padded + c]) + 65536 * int32_t(plain[2 * padded + c]));
  }
  split_quant[r] = SplitDigits{{planes, planes + chunk_cols, planes + 2 * chunk_cols}, sums, q.scale};
}

// One projection's expert LoRA: a [E, r, in], b [E, out, r] (bf16, scaling folded into b).
struct Lora {
  const uint16_t* a = nullptr;
  const uint16_t* b = nullptr;
  int64_t r = 0;
  explicit operator bool() const { return a != nullptr; }
};

struct Group {  // one selected expert and its (token, weight) pairs [begin, end) in pair order
  int64_t expert, begin, end;
};

std::string check_weight(const at::Tensor& w, const char* name, int64_t experts, int64_t rows, int64_t cols,
                         at::ScalarType dtype) {
  KL_CHECK(w.device().is_cpu() && w.is_contiguous(), name, " must be a contiguous CPU tensor");
  KL_CHECK(w.scalar_type() == dtype, name, " has dtype ", w.scalar_type(), ", expected ", dtype);
  KL_CHECK(w.dim() == 3 && w.size(0) == experts && w.size(1) == rows && w.size(2) == cols, name,
              " has shape ", w.sizes(), ", expected [", experts, ", ", rows, ", ", cols, "]");
  return {};
}

// A weight's scales: none (bf16), one per output row (int8, [E, rows]), one per 128x128 block (fp8,
// [E, grids * ceil(rows / grids / 128), ceil(cols / 128)]: `grids` equal row groups, each on its own block grid), or
// one per row and 64-column group (int4, [E, rows, ceil(cols / 64)]: blocks one row high).
struct Scales {
  const float* data = nullptr;
  bool blocked = false;
  int64_t rows = 0, grid_rows = 0, grids = 1, block_rows = 0, block_cols = 0, block_height = kBlock;

  bool per_row() const { return data != nullptr && !blocked; }
  float row(int64_t e, int64_t r) const { return data[e * rows + r]; }
  const float* blocks(int64_t e, int64_t r) const {  // the scales of row r's column blocks (fp8, int4), else nullptr
    if (!blocked) return nullptr;
    return data +
           (e * grids * block_rows + (r / grid_rows) * block_rows + (r % grid_rows) / block_height) * block_cols;
  }
};

std::string scales_of(const std::optional<at::Tensor>& scale, const char* name, Weights kind, int64_t experts,
                      int64_t rows, int64_t cols, int64_t grids, Scales& out) {
  out = {};
  if (kind == Weights::kBf16) return {};
  KL_CHECK(scale.has_value(), name, " is required for int8, fp8 and int4 weights");
  const at::Tensor& s = *scale;
  KL_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == at::kFloat, name,
              " must be a contiguous float32 CPU tensor");
  if (kind == Weights::kInt8) {
    KL_CHECK(s.dim() == 2 && s.size(0) == experts && s.size(1) == rows, name, " has shape ", s.sizes(),
                ", expected [", experts, ", ", rows, "]");
    out = {s.data_ptr<float>(), false, rows, rows, 1, 0, 0};
    return {};
  }
  if (kind == Weights::kInt4) {
    const int64_t groups = (cols + kGroup - 1) / kGroup;
    KL_CHECK(s.dim() == 3 && s.size(0) == experts && s.size(1) == rows && s.size(2) == groups, name,
                " has shape ", s.sizes(), ", expected [", experts, ", ", rows, ", ", groups, "] (64-column groups)");
    out = {s.data_ptr<float>(), true, rows, rows, 1, rows, groups, 1};
    return {};
  }
  const int64_t grid_rows = rows / grids, block_rows = (grid_rows + kBlock - 1) / kBlock;
  const int64_t block_cols = (cols + kBlock - 1) / kBlock;
  KL_CHECK(s.dim() == 3 && s.size(0) == experts && s.size(1) == grids * block_rows && s.size(2) == block_cols,
              name, " has shape ", s.sizes(), ", expected [", experts, ", ", grids * block_rows, ", ", block_cols,
              "] (128x128 blocks, ", grids, " grid(s))");
  out = {s.data_ptr<float>(), true, rows, grid_rows, grids, block_rows, block_cols};
  return {};
}

std::string lora_of(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b, const char* name,
                    int64_t experts, int64_t in, int64_t out, Lora& lora) {
  lora = {};
  KL_CHECK(a.has_value() == b.has_value(), name, ": give both LoRA factors or neither");
  if (!a.has_value()) return {};
  KL_CHECK(a->scalar_type() == at::kBFloat16 && b->scalar_type() == at::kBFloat16, name,
              ": LoRA factors must be bfloat16");
  KL_CHECK(a->is_contiguous() && b->is_contiguous() && a->device().is_cpu() && b->device().is_cpu(), name,
              ": LoRA factors must be contiguous CPU tensors");
  const int64_t r = a->dim() == 3 ? a->size(1) : -1;
  KL_CHECK(a->dim() == 3 && a->size(0) == experts && a->size(2) == in, name, ": LoRA a has shape ", a->sizes());
  KL_CHECK(b->dim() == 3 && b->size(0) == experts && b->size(1) == out && b->size(2) == r, name,
              ": LoRA b has shape ", b->sizes());
  lora = {reinterpret_cast<const uint16_t*>(a->data_ptr()), reinterpret_cast<const uint16_t*>(b->data_ptr()), r};
  return {};
}

inline float lora_b_dot(const uint16_t* b_row, const float* low, int64_t r) {
  float sum = 0;
  for (int64_t q = 0; q < r; ++q) sum += bf16_to_f32(b_row[q]) * low[q];
  return sum;
}

// low[p, q] = a[e_p, q, :] . rows[p] for every pair p (the LoRA's first factor), one fork/join.
void lora_low(const Lora& lora, const std::vector<Group>& groups, int64_t num_pairs, int64_t in,
              const std::vector<const void*>& pair_rows, const DotTable& dots, std::vector<float>& low) {
  low.assign(num_pairs * lora.r, 0.0f);
  std::vector<int64_t> pair_expert(num_pairs);
  for (const Group& g : groups) std::fill(pair_expert.begin() + g.begin, pair_expert.begin() + g.end, g.expert);
  guided_rows(0, num_pairs * lora.r, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / lora.r, q = item % lora.r;
      const void* row = pair_rows[p];
      dots[1](lora.a + (pair_expert[p] * lora.r + q) * in, nullptr, &row, in, &low[item]);
    }
  });
}

// A checked pass: what `run_pass` reads, as pointers and sizes (the tensors stay with the caller).
struct Pass {
  Weights kind = Weights::kBf16;
  int64_t isa = kScalar, E = 0, H = 0, I = 0, T = 0, K = 0;
  const void* x = nullptr;
  bool x_bf16 = false;
  const int64_t* idx = nullptr;
  const float* route_w = nullptr;
  const char* gu_ptr = nullptr;
  const char* dn_ptr = nullptr;
  Scales gu_scale, dn_scale;
  Lora gu_lora, dn_lora;
  void* out = nullptr;
  bool out_bf16 = false;
};

// Every check of a pass's arguments but the expert ids' range (read when it runs: they may not be written yet);
// fills `pass` when they hold.
std::string check_pass(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down,
                       const std::optional<at::Tensor>& gate_up_scale, const std::optional<at::Tensor>& down_scale,
                       const std::optional<at::Tensor>& gate_up_a, const std::optional<at::Tensor>& gate_up_b,
                       const std::optional<at::Tensor>& down_a, const std::optional<at::Tensor>& down_b,
                       const at::Tensor& out, int64_t isa, Pass& pass) {
  KL_CHECK(isa >= kScalar && isa <= best_isa(), "instruction set ", isa, " is not available on this CPU");
  KL_CHECK(gate_up.dim() == 3 && down.dim() == 3, "gate_up and down must be [E, out, in]");
  const Weights kind = weights_of(gate_up.scalar_type());
  const int64_t per_byte = kind == Weights::kInt4 ? 2 : 1;  // columns a byte of the last dimension holds
  const int64_t E = gate_up.size(0), two_inter = gate_up.size(1), H = per_byte * gate_up.size(2), I = two_inter / 2;
  KL_CHECK(kind != Weights::kInt4 || I % 2 == 0, "int4 weights need an even intermediate size, got ", I);
  const at::ScalarType wtype = dtype_of(kind);
  KL_TRY(check_weight(gate_up, "gate_up", E, 2 * I, H / per_byte, wtype));
  KL_TRY(check_weight(down, "down", E, H, I / per_byte, wtype));
  KL_CHECK(x.dim() == 2 && x.size(1) == H && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous CPU tensor [T, ", H, "]");
  KL_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  const int64_t T = x.size(0);
  KL_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 && index.size(0) == T && index.is_contiguous() &&
                  index.device().is_cpu(), "top_k_index must be a contiguous int64 CPU tensor [T, K]");
  const int64_t K = index.size(1);
  KL_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.size(1) == K && weights.is_contiguous() && weights.device().is_cpu(),
              "top_k_weights must be a contiguous float32 CPU tensor [T, K]");
  KL_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.dim() == 2 &&
                  out.size(0) == T && out.size(1) == H && out.is_contiguous() && out.device().is_cpu(),
              "out must be a contiguous float32 or bfloat16 CPU tensor [T, H]");
  pass = Pass{};
  pass.kind = kind, pass.isa = isa, pass.E = E, pass.H = H, pass.I = I, pass.T = T, pass.K = K;
  pass.x = x.data_ptr(), pass.x_bf16 = x.scalar_type() == at::kBFloat16;
  pass.idx = index.data_ptr<int64_t>(), pass.route_w = weights.data_ptr<float>();
  pass.gu_ptr = static_cast<const char*>(gate_up.data_ptr()), pass.dn_ptr = static_cast<const char*>(down.data_ptr());
  KL_TRY(scales_of(gate_up_scale, "gate_up_scale", kind, E, 2 * I, H, 2, pass.gu_scale));  // fp8: gate, up grids
  KL_TRY(scales_of(down_scale, "down_scale", kind, E, H, I, 1, pass.dn_scale));
  KL_TRY(lora_of(gate_up_a, gate_up_b, "gate_up", E, H, 2 * I, pass.gu_lora));
  KL_TRY(lora_of(down_a, down_b, "down", E, I, H, pass.dn_lora));
  pass.out = out.data_ptr(), pass.out_bf16 = out.scalar_type() == at::kBFloat16;
  return {};
}

// out[:T] = the routed experts of one layer for x[:T] (T <= pass.T; rows past T are left as they are); see the file
// comment. Returns "" or the message of an expert id outside [0, E), the only check made here (before any work: a
// HostJob keeps it, its runs are on threads that hold no GIL, the CUDA driver's among them).
std::string run_pass(const Pass& pass, int64_t T) {
  const Weights kind = pass.kind;
  const int64_t isa = pass.isa, E = pass.E, H = pass.H, I = pass.I, K = pass.K;
  const Scales& gu_scale = pass.gu_scale;
  const Scales& dn_scale = pass.dn_scale;
  const Lora& gu_lora = pass.gu_lora;
  const Lora& dn_lora = pass.dn_lora;

  // pairs (token, slot) grouped by expert in ascending order, tokens ascending within a group
  const int64_t* idx = pass.idx;
  const float* route_w = pass.route_w;
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t s = 0; s < T * K; ++s) {
    KL_CHECK(idx[s] >= 0 && idx[s] < E, "top_k_index holds expert ", idx[s], ", outside [0, ", E, ")");
    ++count[idx[s] + 1];
  }
  std::vector<Group> groups;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1]) groups.push_back({e, count[e], count[e] + count[e + 1]});
    count[e + 1] += count[e];
  }
  const int64_t S = T * K;
  std::vector<int64_t> pair_token(S);
  std::vector<float> pair_weight(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t p = count[idx[s]]++;
    pair_token[p] = s / K;
    pair_weight[p] = route_w[s];
  }

  const ActForm x_form = act_form(kind, isa, H), act_form_ = act_form(kind, isa, I);
  const bool round_acts = kind == Weights::kBf16;  // bf16 weights meet bf16-valued activations, as torch's path
  const DotTable& gu_dots = dot_table(kind, isa, x_form);
  const DotTable& dn_dots = dot_table(kind, isa, act_form_);
  // LoRA's factors are bf16: the bf16 dot product where activations are bf16, else the fp32 path of the tier
  const bool bf16_acts = x_form == ActForm::kBf16;
  const DotTable& lora_dots = dot_table(Weights::kBf16, bf16_acts ? kAvx512Bf16 : std::min<int64_t>(isa, kAvx512),
                                        bf16_acts ? ActForm::kBf16 : ActForm::kF32);
  Acts xs(x_form, T, H);
  if (pass.x_bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(pass.x);
    for (int64_t i = 0; i < T * H; ++i) xs.set(i / H, i % H, bf16_to_f32(src[i]), false);
  } else {
    const float* src = static_cast<const float*>(pass.x);
    for (int64_t i = 0; i < T * H; ++i) xs.set(i / H, i % H, src[i], round_acts);
  }
  xs.finish();
  std::vector<const void*> pair_x(S), pair_lora(S);
  for (int64_t p = 0; p < S; ++p) pair_x[p] = xs.row(pair_token[p]), pair_lora[p] = xs.lora_row(pair_token[p]);
  std::vector<float> gu_low;
  if (gu_lora) lora_low(gu_lora, groups, S, H, pair_lora, lora_dots, gu_low);

  // stage 1: act[p, j] = silu(gate) * up * routing weight, threads own intermediate rows j
  Acts act(act_form_, S, I);
  const size_t gu_row = row_bytes(kind, H), dn_row = row_bytes(kind, I);
  const char* gu_ptr = pass.gu_ptr;
  const PairDot* pairs = pair_dots(x_form);
  guided_rows(0, I, kGrainRows, [&](int64_t j0, int64_t j1) {
    float gate[kMaxPairs], up[kMaxPairs];
    for (const Group& g : groups) {
      const char* base = gu_ptr + size_t(g.expert * 2 * I) * gu_row;
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t p0 = g.begin; p0 < g.end; p0 += kMaxPairs) {
          const int n = int(std::min<int64_t>(kMaxPairs, g.end - p0));
          if (pairs && n <= kMaxPairedRows) {
            pairs[n](base + size_t(j) * gu_row, base + size_t(I + j) * gu_row, &pair_x[p0], H, gate, up);
          } else {
            gu_dots[n](base + size_t(j) * gu_row, gu_scale.blocks(g.expert, j), &pair_x[p0], H, gate);
            gu_dots[n](base + size_t(I + j) * gu_row, gu_scale.blocks(g.expert, I + j), &pair_x[p0], H, up);
          }
          for (int i = 0; i < n; ++i) {
            const int64_t p = p0 + i;
            float gv = gate[i], uv = up[i];
            if (gu_scale.per_row()) gv *= gu_scale.row(g.expert, j), uv *= gu_scale.row(g.expert, I + j);
            if (gu_lora) {
              const uint16_t* b = gu_lora.b + (g.expert * 2 * I) * gu_lora.r;
              gv += lora_b_dot(b + j * gu_lora.r, &gu_low[p * gu_lora.r], gu_lora.r);
              uv += lora_b_dot(b + (I + j) * gu_lora.r, &gu_low[p * gu_lora.r], gu_lora.r);
            }
            act.set(p, j, gv / (1.0f + std::exp(-gv)) * uv * pair_weight[p], round_acts);
          }
        }
      }
    }
  });

  act.finish();
  std::vector<const void*> pair_act(S), pair_act_lora(S);
  for (int64_t p = 0; p < S; ++p) pair_act[p] = act.row(p), pair_act_lora[p] = act.lora_row(p);
  std::vector<float> dn_low;
  if (dn_lora) lora_low(dn_lora, groups, S, I, pair_act_lora, lora_dots, dn_low);

  // stage 2: out[t, h] = sum over the token's experts of down_h . act, threads own hidden rows h; a bf16 `out`
  // gets the fp32 sums rounded once at the end of a thread's rows (what `.to(torch.bfloat16)` of the fp32 out gives)
  const bool bf16_out = pass.out_bf16;
  std::vector<float> sums(bf16_out ? T * H : 0);
  float* o = bf16_out ? sums.data() : static_cast<float*>(pass.out);
  uint16_t* o16 = bf16_out ? static_cast<uint16_t*>(pass.out) : nullptr;
  const char* dn_ptr = pass.dn_ptr;
  guided_rows(0, H, kGrainRows, [&](int64_t h0, int64_t h1) {
    for (int64_t t = 0; t < T; ++t) std::fill(o + t * H + h0, o + t * H + h1, 0.0f);
    float y[kMaxPairs];
    for (const Group& g : groups) {
      const char* base = dn_ptr + size_t(g.expert * H) * dn_row;
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t p0 = g.begin; p0 < g.end; p0 += kMaxPairs) {
          const int n = int(std::min<int64_t>(kMaxPairs, g.end - p0));
          dn_dots[n](base + size_t(h) * dn_row, dn_scale.blocks(g.expert, h), &pair_act[p0], I, y);
          for (int i = 0; i < n; ++i) {
            const int64_t p = p0 + i;
            float v = dn_scale.per_row() ? y[i] * dn_scale.row(g.expert, h) : y[i];
            if (dn_lora) {
              v += lora_b_dot(dn_lora.b + (g.expert * H + h) * dn_lora.r, &dn_low[p * dn_lora.r], dn_lora.r);
            }
            o[pair_token[p] * H + h] += v;
          }
        }
      }
    }
    if (bf16_out) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = h0; h < h1; ++h) o16[t * H + h] = f32_to_bf16(o[t * H + h]);
      }
    }
  });
  return {};
}

// out [T, H] (fp32 or bf16) = the routed experts of one layer for x [T, H]; see the file comment.
// Returns "" or the first failed check's message (see KL_CHECK).
std::string expert_pass(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights,
                        const at::Tensor& gate_up, const at::Tensor& down,
                        const std::optional<at::Tensor>& gate_up_scale, const std::optional<at::Tensor>& down_scale,
                        const std::optional<at::Tensor>& gate_up_a, const std::optional<at::Tensor>& gate_up_b,
                        const std::optional<at::Tensor>& down_a, const std::optional<at::Tensor>& down_b,
                        const at::Tensor& out, int64_t isa) {
  Pass pass;  // the checks run with the GIL, the pass without it
  KL_TRY(check_pass(x, index, weights, gate_up, down, gate_up_scale, down_scale, gate_up_a, gate_up_b, down_a, down_b,
                    out, isa, pass));
  py::gil_scoped_release no_gil;
  return run_pass(pass, x.size(0));
}

// One pass over fixed buffers, checked once and run many times: by `run` (tests), or by `host_job_callback` from a
// thread that holds no GIL (the CUDA driver's, for a host node of a captured decode step; cpu_kernels.py). It keeps
// its tensors alive. `rows` (clamped to [0, T]) is how many leading rows the next run computes. A failed check at
// construction, or a run's error, is kept in `error` (see KL_CHECK); a job made with an error never runs, and a
// failed run leaves `out` as it was.
struct HostJob {
  std::vector<at::Tensor> held;
  std::vector<std::optional<at::Tensor>> held_optional;
  Pass pass;
  bool checked = false;
  int64_t rows = 0, threads = 1, runs = 0;
  double seconds = 0;  // wall time of the finished runs, on the running thread's clock
  std::string error;

  HostJob(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights, const at::Tensor& gate_up,
          const at::Tensor& down, const std::optional<at::Tensor>& gate_up_scale,
          const std::optional<at::Tensor>& down_scale, const std::optional<at::Tensor>& gate_up_a,
          const std::optional<at::Tensor>& gate_up_b, const std::optional<at::Tensor>& down_a,
          const std::optional<at::Tensor>& down_b, const at::Tensor& out, int64_t isa, int64_t threads_)
      : held{x, index, weights, gate_up, down, out},
        held_optional{gate_up_scale, down_scale, gate_up_a, gate_up_b, down_a, down_b} {
    error = threads_ > 0 ? check_pass(x, index, weights, gate_up, down, gate_up_scale, down_scale, gate_up_a,
                                      gate_up_b, down_a, down_b, out, isa, pass)
                         : message("a host job needs at least one thread, got ", threads_);
    if (error.empty()) checked = true, rows = pass.T, threads = threads_;
  }

  void set_rows(int64_t value) { rows = std::clamp<int64_t>(value, 0, pass.T); }

  void run() noexcept {
    if (!checked) return;
    // the team size of this run only: the calling thread's own OpenMP setting is restored after it (a driver
    // thread starts at the runtime's default; a run on the main thread must not change torch's thread count)
    const int before = omp_get_max_threads();
    if (before != threads) omp_set_num_threads(static_cast<int>(threads));
    const auto start = std::chrono::steady_clock::now();
    t_spin_team = true;
    std::string failed = rows > 0 ? run_pass(pass, rows) : std::string();
    t_spin_team = false;
    if (failed.empty()) {
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      ++runs;
    } else if (error.empty()) {
      error = std::move(failed);
    }
    if (before != threads) omp_set_num_threads(before);
  }
};

extern "C" void host_job_callback(void* job) { static_cast<HostJob*>(job)->run(); }

// ---- Flag hand-offs: the GPU writes a flag in page-locked memory, a spinning thread answers ----
// A captured decode step can hand its CPU passes over without host nodes: for each pass the graph writes 1 into the
// pass's `go` word (a stream memory operation, after the copies of x and the routing), then waits until its `done`
// word is 1 and sets it back to 0 before copying the output back (cpu_compute.py, `HostNodePass`). `HandoffRunner`'s
// thread answers: for each pass of an armed sequence, in order, it spins until `go` is 1, clears it, runs the job and
// stores 1 into `done`. On the H200 box a host node cost ~64 us a layer when its function ran long, this ~9 us
// (benchmarks/NOTES.md, nineteenth session). The thread sleeps until a sequence is armed (before each replay of a
// graph that holds one), so it spins only while a step is in flight; it is the OpenMP master of its jobs' team, as
// the CUDA driver's thread is for host nodes.
struct HandoffSequence {  // the passes of one captured graph, in capture order
  std::vector<HostJob*> jobs;
  std::vector<uint32_t*> go, done;
  std::vector<py::object> held;  // keeps the jobs (Python objects) alive while the sequence is
};

class HandoffRunner {
 public:
  HandoffRunner() : thread_([this] { loop(); }) {}
  ~HandoffRunner() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    thread_.join();
  }
  // queue one replay's passes; the caller keeps `seq` alive until the replay is done
  void arm(const HandoffSequence& seq) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(&seq);
    }
    wake_.notify_one();
  }
  // drop armed sequences not yet served (a replay that failed to launch): the thread stops waiting for them
  void cancel() {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.clear();
    cancelled_.fetch_add(1);
  }
  int64_t served() const { return served_.load(); }
  // (go seen, done written) of each pass served since the last call, steady-clock nanoseconds (at most kStamps);
  // the first call starts the stamping (a runner nobody asks never records)
  std::vector<std::pair<int64_t, int64_t>> timeline() {
    std::lock_guard<std::mutex> lock(stamps_mutex_);
    stamping_.store(true, std::memory_order_relaxed);
    std::vector<std::pair<int64_t, int64_t>> out;
    out.swap(stamps_);
    return out;
  }

 private:
  void loop() {
    for (;;) {
      const HandoffSequence* seq = nullptr;
      uint64_t epoch = 0;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stop_.load() || !queue_.empty(); });
        if (stop_.load()) return;
        seq = queue_.front();
        queue_.pop_front();
        epoch = cancelled_.load();
      }
      bool dropped = false;  // stopped or cancelled: the rest of this sequence is never served
      for (size_t i = 0; i < seq->jobs.size() && !dropped; ++i) {
        for (;;) {
          const bool go = __atomic_load_n(seq->go[i], __ATOMIC_ACQUIRE) != 0;
          // checked after reading go: a go written after a cancel (for the next armed replay) is never taken here
          dropped = stop_.load() || cancelled_.load() != epoch;
          if (dropped || go) break;
          _mm_pause();
        }
        if (dropped) break;
        const bool stamp = stamping_.load(std::memory_order_relaxed);
        const int64_t seen = stamp ? now_ns() : 0;
        __atomic_store_n(seq->go[i], 0u, __ATOMIC_RELAXED);
        seq->jobs[i]->run();
        __atomic_store_n(seq->done[i], 1u, __ATOMIC_RELEASE);
        served_.fetch_add(1, std::memory_order_relaxed);
        if (stamp) {
          const int64_t finished = now_ns();
          std::lock_guard<std::mutex> lock(stamps_mutex_);
          if (stamps_.size() < kStamps) stamps_.emplace_back(seen, finished);
        }
      }
    }
  }

  static constexpr size_t kStamps = 1 << 20;
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  std::mutex mutex_, stamps_mutex_;
  std::condition_variable wake_;
  std::deque<const HandoffSequence*> queue_;
  std::vector<std::pair<int64_t, int64_t>> stamps_;
  std::atomic<bool> stop_{false}, stamping_{false};
  std::atomic<uint64_t> cancelled_{0};
  std::atomic<int64_t> served_{0};
  std::thread thread_;  // last: it starts once the members above exist
};

// A sequence over `jobs` (HostJob objects) and their flag words: `flags` int32 tensors of two words each (go, done),
// page-locked host memory the GPU writes and reads through stream memory operations.
std::string make_sequence(const std::vector<py::object>& jobs, const std::vector<at::Tensor>& flags,
                          HandoffSequence& seq) {
  KL_CHECK(jobs.size() == flags.size(), "a hand-off sequence needs one flag pair per job, got ", int64_t(jobs.size()),
           " jobs and ", int64_t(flags.size()), " flag pairs");
  for (size_t i = 0; i < jobs.size(); ++i) {
    const at::Tensor& f = flags[i];
    KL_CHECK(f.scalar_type() == at::kInt && f.dim() == 1 && f.numel() == 2 && f.is_contiguous() && f.is_cpu(),
             "hand-off flags must be a contiguous int32 host tensor of 2 words");
    seq.jobs.push_back(jobs[i].cast<HostJob*>());
    seq.go.push_back(reinterpret_cast<uint32_t*>(f.data_ptr<int32_t>()));
    seq.done.push_back(reinterpret_cast<uint32_t*>(f.data_ptr<int32_t>()) + 1);
    seq.held.push_back(jobs[i]);
    seq.held.push_back(py::cast(f));
  }
  return {};
}

// out [n] = the fp8 -> fp32 conversion the `isa` path's dot products use, times 2^8 (the value), of `codes` [n]
// uint8, n a multiple of 16 (a test checks it against torch's float8_e4m3fn cast for all 256 codes).
KL_AVX2 void fp8_values_avx2(const uint8_t* c, float* o, int64_t n) {
  for (int64_t k = 0; k < n; k += 8) {
    _mm256_storeu_ps(o + k, _mm256_mul_ps(fp8x8_avx2(c + k), _mm256_set1_ps(kFp8Unscale)));
  }
}

KL_AVX512 void fp8_values_avx512(const uint8_t* c, float* o, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = fp8x16_avx512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
    _mm512_storeu_ps(o + k, _mm512_mul_ps(v, _mm512_set1_ps(kFp8Unscale)));
  }
}

std::string check_fp8_values(const at::Tensor& codes, const at::Tensor& out, int64_t isa) {
  KL_CHECK(isa >= kScalar && isa <= best_isa(), "instruction set ", isa, " is not available on this CPU");
  KL_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous() &&
                  codes.device().is_cpu() && codes.size(0) % 16 == 0,
              "codes must be a contiguous uint8 CPU tensor [n], n a multiple of 16");
  const int64_t n = codes.size(0);
  KL_CHECK(out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == n && out.is_contiguous() &&
                  out.device().is_cpu(), "out must be a contiguous float32 CPU tensor [", n, "]");
  return {};
}

// Returns "" or the failed check's message (see KL_CHECK).
std::string fp8_values(const at::Tensor& codes, const at::Tensor& out, int64_t isa) {
  KL_TRY(check_fp8_values(codes, out, isa));
  const int64_t n = codes.size(0);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  if (isa >= kAvx512) {
    fp8_values_avx512(c, o, n);
  } else if (isa == kAvx2) {
    fp8_values_avx2(c, o, n);
  } else {
    for (int64_t k = 0; k < n; ++k) o[k] = fp8_scaled(c[k]) * kFp8Unscale;
  }
  return {};
}

// How many threads at::parallel_for runs here (the extension must share torch's OpenMP runtime and settings).
int64_t parallel_threads() {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, 1 << 16, 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_isa", &best_isa,
        "best instruction-set tier of this CPU (0 scalar, 1 avx2, 2 avx512, 3 avx512-vnni, 4 avx512-bf16)");
  m.def("expert_pass", &expert_pass, "one layer's selected experts for a few tokens (see cpu_kernels.py)",
        py::arg("x"), py::arg("top_k_index"), py::arg("top_k_weights"), py::arg("gate_up"), py::arg("down"),
        py::arg("gate_up_scale"), py::arg("down_scale"), py::arg("gate_up_a"), py::arg("gate_up_b"),
        py::arg("down_a"), py::arg("down_b"), py::arg("out"), py::arg("isa"));
  py::class_<HostJob>(m, "HostJob", "one pass over fixed buffers, run by a host node (see cpu_kernels.py)")
      .def(py::init<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
                    int64_t>(),
           py::arg("x"), py::arg("top_k_index"), py::arg("top_k_weights"), py::arg("gate_up"), py::arg("down"),
           py::arg("gate_up_scale"), py::arg("down_scale"), py::arg("gate_up_a"), py::arg("gate_up_b"),
           py::arg("down_a"), py::arg("down_b"), py::arg("out"), py::arg("isa"), py::arg("threads"))
      .def_property("rows", [](const HostJob& j) { return j.rows; }, &HostJob::set_rows)
      .def_property(
          "threads", [](const HostJob& j) { return j.threads; },
          [](HostJob& j, int64_t value) { j.threads = std::max<int64_t>(value, 1); })
      .def_readonly("runs", &HostJob::runs)
      .def_readonly("seconds", &HostJob::seconds)
      .def_property_readonly("error", [](const HostJob& j) { return j.error; })
      .def_property_readonly("address", [](HostJob& j) { return reinterpret_cast<uintptr_t>(&j); })
      .def("run", &HostJob::run, py::call_guard<py::gil_scoped_release>());
  py::class_<HandoffSequence>(m, "HandoffSequence", "one captured graph's flag hand-offs, in order (cpu_kernels.py)")
      .def_property_readonly("size", [](const HandoffSequence& q) { return int64_t(q.jobs.size()); });
  m.def("make_sequence", [](const std::vector<py::object>& jobs, const std::vector<at::Tensor>& flags) {
        auto seq = std::make_unique<HandoffSequence>();
        std::string error = make_sequence(jobs, flags, *seq);
        return py::make_tuple(error.empty() ? py::cast(std::move(seq)) : py::none(), error);
      }, "a hand-off sequence, or None and why not", py::arg("jobs"), py::arg("flags"));
  py::class_<HandoffRunner>(m, "HandoffRunner", "the thread that answers flag hand-offs (cpu_kernels.py)")
      .def(py::init<>())
      .def("arm", &HandoffRunner::arm, py::arg("sequence"))
      .def("cancel", &HandoffRunner::cancel)
      .def_property_readonly("served", &HandoffRunner::served)
      .def("timeline", &HandoffRunner::timeline, "(go seen, done) ns of the passes served since the last call; the first call starts the stamping");
  m.def("host_job_callback", []() { return reinterpret_cast<uintptr_t>(&host_job_callback); },
        "address of `void host_job_callback(void* job)`, a CUDA host function running a HostJob");
  m.def("fp8_values", &fp8_values, "the fp8 conversion of an instruction-set path (tests)", py::arg("codes"),
        py::arg("out"), py::arg("isa"));
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses in this extension");
}
