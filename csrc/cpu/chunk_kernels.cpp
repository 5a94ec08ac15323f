// Element loops of the CPU kernels, compiled once per instruction set (see NOTE: [CPU instruction-set
// dispatch] in cpu_kernel_table.h). MRGD_CPU_ISA names the namespace: baseline or avx2. Deliberately no
// torch or standard-library container headers here.
#include <bit>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/elementwise_ops.h"
#include "mrgd_ext/update_math.h"

#ifndef MRGD_CPU_ISA
#error "compile chunk_kernels.cpp with -DMRGD_CPU_ISA=<baseline|avx2>"
#endif

namespace mrgd_ext::cpu::MRGD_CPU_ISA {
namespace {

// Loads and stores between storage and the arithmetic type (float32 for the 16-bit formats).
template <int Kind>
struct Storage;

template <>
struct Storage<kF32> {
  using raw = float;
  using acc = float;
  static acc load(raw x) { return x; }
  static raw store(acc x) { return x; }
};

template <>
struct Storage<kF64> {
  using raw = double;
  using acc = double;
  static acc load(raw x) { return x; }
  static raw store(acc x) { return x; }
};

// bfloat16 as its 16 bits: widening is a shift; narrowing rounds to nearest even and keeps NaN a NaN.
// Written as branch-free integer arithmetic so the compiler vectorises whole loops.
template <>
struct Storage<kBF16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }
  static raw store(acc x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<raw>(is_nan ? 0x7FC0u : rounded);
  }
};

// float16 through the compiler's _Float16 (F16C instructions when compiled for AVX2).
template <>
struct Storage<kF16> {
  using raw = _Float16;
  using acc = float;
  static acc load(raw x) { return static_cast<float>(x); }
  static raw store(acc x) { return static_cast<_Float16>(x); }
};

template <int Kind>
struct Basis;
template <>
struct Basis<kBasisF32> : Storage<kF32> {};
template <>
struct Basis<kBasisBF16> : Storage<kBF16> {};
template <>
struct Basis<kBasisF64> : Storage<kF64> {};

#if defined(__AVX2__)
// NOTE: [AVX2 lanes through the shared math]
// F8 is eight float lanes with the arithmetic operators the shared element functions use, so the AVX2
// loops evaluate the very expressions of update_math.h, eight elements at a time, with the same rounding
// (separate multiply and add, no contraction). Only the 16-bit loads and stores are written by hand:
// bfloat16 widens by a shift and narrows with round-to-nearest-even (NaN kept a quiet NaN); float16 uses
// the F16C conversions, which round to nearest even like the scalar _Float16 cast.
struct F8 {
  __m256 v;
  F8(__m256 x) : v(x) {}
  F8() = default;
  explicit F8(float x) : v(_mm256_set1_ps(x)) {}
};
static inline F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
static inline F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
static inline F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }

template <int Kind>
struct Lanes;

template <>
struct Lanes<kBF16> {
  static F8 load(const uint16_t* src) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static __m256i rounded_bits(F8 x) {
    const __m256i u = _mm256_castps_si256(x.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q)));
  }
  static void store(uint16_t* dst, F8 x) {
    const __m256i r = rounded_bits(x);
    // packus works within 128-bit halves; the permute restores element order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  }
  // Sixteen elements: one pack and one permute serve both halves, then a single 32-byte store.
  static void store2(uint16_t* dst, F8 lo, F8 hi) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded_bits(lo), rounded_bits(hi)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), packed);
  }
};

template <>
struct Lanes<kF16> {
  static F8 load(const _Float16* src) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  static void store(_Float16* dst, F8 x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store2(_Float16* dst, F8 lo, F8 hi) {
    store(dst, lo);
    store(dst + 8, hi);
  }
};

template <int Kind>
constexpr bool kHasLanes = Kind == kBF16 || Kind == kF16;
#else
template <int Kind>
constexpr bool kHasLanes = false;
#endif

// Fn::apply on every element of one chunk of every list (NOTE: [element-wise ops]). The lists are read
// through separate pointers that never alias (each list holds distinct tensors; the caller checks).
template <typename Fn, int Kind, bool Decay>
void elementwise_loop(void* const* x, int64_t len, const double* s) {
  using S = Storage<Kind>;
  using raw = typename S::raw;
  using acc = typename S::acc;
  constexpr int N = Fn::kLists;
  constexpr int K = kNumScalars<Fn>;
  raw* ptr[N];
  for (int j = 0; j < N; ++j) ptr[j] = static_cast<raw*>(x[j]);
  acc s_a[K + 1];  // + 1: an op may take no scalars
  for (int k = 0; k < K; ++k) s_a[k] = static_cast<acc>(s[k]);
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (kHasLanes<Kind>) {
    F8 s8[K + 1];
    for (int k = 0; k < K; ++k) s8[k] = F8(s_a[k]);
    for (; i + 16 <= len; i += 16) {
      F8 lo[N], hi[N];
      for (int j = 0; j < N; ++j) {
        lo[j] = Lanes<Kind>::load(ptr[j] + i);
        hi[j] = Lanes<Kind>::load(ptr[j] + i + 8);
      }
      Fn::template apply<F8, Decay>(lo, s8);
      Fn::template apply<F8, Decay>(hi, s8);
      for (int j = 0; j < Fn::kUpdated; ++j) Lanes<Kind>::store2(ptr[j] + i, lo[j], hi[j]);
    }
    for (; i + 8 <= len; i += 8) {
      F8 v[N];
      for (int j = 0; j < N; ++j) v[j] = Lanes<Kind>::load(ptr[j] + i);
      Fn::template apply<F8, Decay>(v, s8);
      for (int j = 0; j < Fn::kUpdated; ++j) Lanes<Kind>::store(ptr[j] + i, v[j]);
    }
  }
#endif
  // No `omp simd` on this loop: under it GCC privatises v per SIMD lane and then leaves the loop scalar (7x
  // slower for float32 in cache, half the copy bandwidth out of it); without it the loop vectorises, behind a
  // runtime aliasing check. Element-wise arithmetic with -ffp-contract=off rounds the same either way.
  for (int64_t e = i; e < len; ++e) {
    acc v[N];
    for (int j = 0; j < N; ++j) v[j] = S::load(ptr[j][e]);
    Fn::template apply<acc, Decay>(v, s_a);
    for (int j = 0; j < Fn::kUpdated; ++j) ptr[j][e] = S::store(v[j]);
  }
}

// One chunk of an element-wise op: the loop with or without the weight-decay term (NOTE: [no decay term]).
template <typename Fn, int Kind>
void elementwise_chunk(void* const* x, int64_t len, const double* s) {
  if constexpr (Fn::kDecayScalar >= 0) {
    if (!decays(s[Fn::kDecayScalar])) return elementwise_loop<Fn, Kind, false>(x, len, s);
  }
  elementwise_loop<Fn, Kind, true>(x, len, s);
}

// NOTE: [projection accuracy]
// The dot products of one chunk run in the arithmetic type (float for float/half/bfloat16 parameters)
// over at most one chunk (8 Ki terms, split across SIMD lanes), and the caller adds the per-chunk partial
// sums in double. The rounding error therefore grows with the chunk length, not with n_total.
template <int Kind, int BKind>
void project_chunk(const void* p_, const void* g_, int64_t len, const void* U_, int64_t ld, int64_t r,
                   double weight_decay, double factor, void* scratch, double* partial) {
  using S = Storage<Kind>;
  using B = Basis<BKind>;
  using acc = typename S::acc;
  const auto* __restrict p = static_cast<const typename S::raw*>(p_);
  const auto* __restrict g = static_cast<const typename S::raw*>(g_);
  const auto* U = static_cast<const typename B::raw*>(U_);
  acc* __restrict geff = static_cast<acc*>(scratch);
  const acc wd_a = static_cast<acc>(weight_decay), f_a = static_cast<acc>(factor);
  const auto fill = [&](auto decay) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      geff[i] = effective_gradient<acc, decltype(decay)::value>(S::load(p[i]), S::load(g[i]), wd_a, f_a);
    }
  };
  decays(weight_decay) ? fill(std::true_type{}) : fill(std::false_type{});
  for (int64_t k = 0; k < r; ++k) {
    const auto* __restrict u = U + k * ld;
    acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) sum += static_cast<acc>(B::load(u[i])) * geff[i];
    partial[k] = static_cast<double>(sum);
  }
}

// The correction sum_k U[k, i] w[k] of one chunk into corr (summed from k = 0 upwards in the arithmetic type).
template <int Kind, int BKind>
void chunk_correction(int64_t len, const void* U_, int64_t ld, int64_t r, const double* w,
                      typename Storage<Kind>::acc* __restrict corr) {
  using B = Basis<BKind>;
  using acc = typename Storage<Kind>::acc;
  const auto* U = static_cast<const typename B::raw*>(U_);
  for (int64_t i = 0; i < len; ++i) corr[i] = 0;
  for (int64_t k = 0; k < r; ++k) {
    const auto* __restrict u = U + k * ld;
    const acc wk = static_cast<acc>(w[k]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) corr[i] += static_cast<acc>(B::load(u[i])) * wk;
  }
}

template <int Kind, int BKind>
void subspace_step_chunk(void* p_, const void* g_, int64_t len, const void* U_, int64_t ld, int64_t r,
                         const double* w, double lr, double weight_decay, double factor, void* scratch) {
  using S = Storage<Kind>;
  using acc = typename S::acc;
  auto* __restrict p = static_cast<typename S::raw*>(p_);
  const auto* __restrict g = static_cast<const typename S::raw*>(g_);
  acc* __restrict corr = static_cast<acc*>(scratch);
  chunk_correction<Kind, BKind>(len, U_, ld, r, w, corr);
  const acc lr_a = static_cast<acc>(lr), wd_a = static_cast<acc>(weight_decay), f_a = static_cast<acc>(factor);
  const auto update = [&](auto decay) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      p[i] = S::store(
          subspace_update<acc, decltype(decay)::value>(S::load(p[i]), S::load(g[i]), corr[i], lr_a, wd_a, f_a));
    }
  };
  decays(weight_decay) ? update(std::true_type{}) : update(std::false_type{});
}

template <int Kind, int BKind>
void subspace_momentum_chunk(void* p_, void* v_, const void* g_, int64_t len, const void* U_, int64_t ld, int64_t r,
                             const double* w, double lr, double momentum, double weight_decay, double factor,
                             void* scratch) {
  using S = Storage<Kind>;
  using acc = typename S::acc;
  auto* __restrict p = static_cast<typename S::raw*>(p_);
  auto* __restrict v = static_cast<typename S::raw*>(v_);
  const auto* __restrict g = static_cast<const typename S::raw*>(g_);
  acc* __restrict corr = static_cast<acc*>(scratch);
  chunk_correction<Kind, BKind>(len, U_, ld, r, w, corr);
  const acc lr_a = static_cast<acc>(lr), mu_a = static_cast<acc>(momentum), wd_a = static_cast<acc>(weight_decay),
            f_a = static_cast<acc>(factor);
  const auto update = [&](auto decay) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      acc pi = S::load(p[i]), vi = S::load(v[i]);
      subspace_momentum_update<acc, decltype(decay)::value>(pi, vi, S::load(g[i]), corr[i], lr_a, mu_a, wd_a, f_a);
      v[i] = S::store(vi);
      p[i] = S::store(pi);
    }
  };
  decays(weight_decay) ? update(std::true_type{}) : update(std::false_type{});
}

template <int Kind>
constexpr void fill_row(KernelTable& t) {
#define MRGD_FILL_ELEMENTWISE(Fn) t.elementwise[kOp##Fn][Kind] = &elementwise_chunk<Fn, Kind>;
  MRGD_ELEMENTWISE_OPS(MRGD_FILL_ELEMENTWISE)
#undef MRGD_FILL_ELEMENTWISE
  t.project[Kind][kBasisF32] = &project_chunk<Kind, kBasisF32>;
  t.project[Kind][kBasisBF16] = &project_chunk<Kind, kBasisBF16>;
  t.project[Kind][kBasisF64] = &project_chunk<Kind, kBasisF64>;
  t.subspace_step[Kind][kBasisF32] = &subspace_step_chunk<Kind, kBasisF32>;
  t.subspace_step[Kind][kBasisBF16] = &subspace_step_chunk<Kind, kBasisBF16>;
  t.subspace_step[Kind][kBasisF64] = &subspace_step_chunk<Kind, kBasisF64>;
  t.subspace_momentum_step[Kind][kBasisF32] = &subspace_momentum_chunk<Kind, kBasisF32>;
  t.subspace_momentum_step[Kind][kBasisBF16] = &subspace_momentum_chunk<Kind, kBasisBF16>;
  t.subspace_momentum_step[Kind][kBasisF64] = &subspace_momentum_chunk<Kind, kBasisF64>;
}

constexpr KernelTable make_table() {
  KernelTable t{};
#define MRGD_STRINGIFY2(x) #x
#define MRGD_STRINGIFY(x) MRGD_STRINGIFY2(x)
  t.isa = MRGD_STRINGIFY(MRGD_CPU_ISA);
  fill_row<kF32>(t);
  fill_row<kF64>(t);
  fill_row<kBF16>(t);
  fill_row<kF16>(t);
  t.block_orthogonalize[0] = &block_orthogonalize_pass_f32;
  t.block_orthogonalize[1] = &block_orthogonalize_pass_f64;
  return t;
}

}  // namespace

const KernelTable& kernel_table() {
  static constexpr KernelTable table = make_table();
  return table;
}

}  // namespace mrgd_ext::cpu::MRGD_CPU_ISA
