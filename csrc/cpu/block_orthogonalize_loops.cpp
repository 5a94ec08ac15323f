// Element loops of the CPU block orthogonalisation kernel (block_orthogonalize.cpp), compiled once per
// instruction set like chunk_kernels.cpp (NOTE: [CPU instruction-set dispatch] in cpu_kernel_table.h);
// MRGD_CPU_ISA names the namespace. Everything but the two entry points has internal linkage, so no
// function compiled for AVX2 can be merged by the linker into baseline callers. Deliberately no torch or
// standard-library headers here (<type_traits> only declares types).
//
// T is the storage and arithmetic type (float or double): float rows accumulate in float within one
// sub-chunk (at most a few thousand terms, split across SIMD lanes) and every sub-chunk's sum is added in
// double (NOTE: [orthogonalisation accuracy] in block_orthogonalize.cpp).

#include <cstdint>
#include <type_traits>

#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/lanczos_math.h"

#ifndef MRGD_CPU_ISA
#error "compile block_orthogonalize_loops.cpp with -DMRGD_CPU_ISA=<baseline|avx2>"
#endif

namespace mrgd_ext::cpu::MRGD_CPU_ISA {
namespace {

// 32-byte SIMD vectors through GCC/Clang vector extensions: AVX registers in the AVX2 build, pairs of SSE
// registers in the baseline build. The shared element math (lanczos_math.h) applies lane by lane.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  static constexpr int W = 4;
};

template <typename T>
__attribute__((always_inline)) inline typename Simd<T>::vec vload(const T* p) {
  typename Simd<T>::vec v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T>
__attribute__((always_inline)) inline void vstore(T* p, typename Simd<T>::vec v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
__attribute__((always_inline)) inline typename Simd<T>::vec vbroadcast(T x) {
  typename Simd<T>::vec v = {};
  return v + x;
}

// Lanes summed in a fixed order, so results do not depend on how the compiler schedules the reduction.
template <typename T>
__attribute__((always_inline)) inline T hsum(typename Simd<T>::vec v) {
  T s = v[0];
  for (int l = 1; l < Simd<T>::W; ++l) s += v[l];
  return s;
}

// NOTE: [register blocking]
// Both loops are small matrix products with a huge inner dimension (the n columns), so they are written as
// register-blocked micro-kernels: `dots` keeps a J x K tile of accumulators (J rows of V against K rows of
// Q: J + K loads feed J * K multiply-adds) and `subtract` keeps J rows of V for two SIMD vectors of columns
// in registers while the m basis rows stream past (one load of Q per vector and J broadcasts feed 2 J
// multiply-adds). Tiles of at least 8 accumulators also give the FMA units enough independent chains to
// hide their latency.

// out[j * ldo + k] += sum_{i < len} v[j][i] * q[k][i] for j < J, k < K.
template <typename T, int J, int K>
void dots(const T* const* q, const T* const* v, int64_t len, double* out, int64_t ldo) {
  using vec = typename Simd<T>::vec;
  constexpr int W = Simd<T>::W;
  vec acc[J][K];
  for (int j = 0; j < J; ++j)
    for (int k = 0; k < K; ++k) acc[j][k] = vec{};
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vec vj[J];
    for (int j = 0; j < J; ++j) vj[j] = vload(v[j] + i);
    for (int k = 0; k < K; ++k) {
      const vec qk = vload(q[k] + i);
      for (int j = 0; j < J; ++j) acc[j][k] = dot_update<vec>(acc[j][k], vj[j], qk);
    }
  }
  for (int j = 0; j < J; ++j) {
    for (int k = 0; k < K; ++k) {
      T s = hsum<T>(acc[j][k]);
      for (int64_t t = i; t < len; ++t) s = dot_update<T>(s, v[j][t], q[k][t]);
      out[j * ldo + k] += static_cast<double>(s);
    }
  }
}

// v[j][i] <- v[j][i] - sum_{k < m} c[j * ldc + k] * Q[k * ldq + i] for j < J, i < len; the k terms are
// subtracted in order k = 0, 1, ..., with v held in registers, so each row of V is loaded and stored once.
// U vectors of columns per step keep J * U >= 4 independent accumulation chains.
//
// NOTE: [basis prefetch]
// Walking column-wise through all m rows of Q touches m far-apart streams at once, more than the hardware
// prefetchers follow, so the loop would wait on memory and then compute with memory idle. Instead it
// prefetches, for every row k it reads, the cache line `ahead` columns further on (the same columns of the
// next sub-chunk): that sub-chunk is then in cache when its turn comes, and memory traffic overlaps the
// arithmetic. Lines beyond `limit` (the end of this thread's columns) are not requested.
template <typename T, int J>
void subtract(const T* Q, int64_t ldq, int64_t m, const T* c, int64_t ldc, T* const* v, int64_t len,
              int64_t ahead, int64_t limit) {
  using vec = typename Simd<T>::vec;
  constexpr int W = Simd<T>::W;
  constexpr int U = J >= 3 ? 2 : 4;
  constexpr int kLine = 64 / sizeof(T);  // elements per cache line
  int64_t i = 0;
  for (; i + U * W <= len; i += U * W) {
    vec acc[U][J];
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < J; ++j) acc[u][j] = vload(v[j] + i + u * W);
    const bool prefetch = i + ahead + U * W <= limit;
    for (int64_t k = 0; k < m; ++k) {
      const T* qk = Q + k * ldq + i;
      if (prefetch) {
        for (int u = 0; u < U * W; u += kLine) __builtin_prefetch(qk + ahead + u, 0, 3);
      }
      vec q[U];
      for (int u = 0; u < U; ++u) q[u] = vload(qk + u * W);
      for (int j = 0; j < J; ++j) {
        const vec cjk = vbroadcast(c[j * ldc + k]);
        for (int u = 0; u < U; ++u) acc[u][j] = orthogonalize_update<vec>(acc[u][j], cjk, q[u]);
      }
    }
    for (int u = 0; u < U; ++u)
      for (int j = 0; j < J; ++j) vstore(v[j] + i + u * W, acc[u][j]);
  }
  for (; i < len; ++i) {
    for (int j = 0; j < J; ++j) {
      T x = v[j][i];
      for (int64_t k = 0; k < m; ++k) x = orthogonalize_update<T>(x, c[j * ldc + k], Q[k * ldq + i]);
      v[j][i] = x;
    }
  }
}

// Tile shapes: rows of V per tile (up to kRowBlock) and, for each, the number of basis rows per tile
// (NOTE: [register blocking]: J * K + J + 1 <= 16 vector registers).
constexpr int kRowBlock = 4;
template <int J>
constexpr int kColBlock = J == 4 ? 2 : J == 3 ? 3 : J == 2 ? 4 : 8;

// Calls f(j, integral_constant<J>) for row tiles covering [0, rows).
template <typename F>
__attribute__((always_inline)) inline void for_row_blocks(int64_t rows, F&& f) {
  int64_t j = 0;
  for (; j + kRowBlock <= rows; j += kRowBlock) f(j, std::integral_constant<int, kRowBlock>{});
  switch (rows - j) {
    case 3: f(j, std::integral_constant<int, 3>{}); break;
    case 2: f(j, std::integral_constant<int, 2>{}); break;
    case 1: f(j, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// out[j * ldo + k] += <v_j, q_k> for j < J and every k < rows_q: full K-tiles, then single rows.
template <typename T, int J>
void dots_all(const T* q0, int64_t ldq, int64_t rows_q, const T* const* v, int64_t len, double* out, int64_t ldo) {
  constexpr int K = kColBlock<J>;
  const T* q[K];
  int64_t k = 0;
  for (; k + K <= rows_q; k += K) {
    for (int r = 0; r < K; ++r) q[r] = q0 + (k + r) * ldq;
    dots<T, J, K>(q, v, len, out + k, ldo);
  }
  for (; k < rows_q; ++k) {
    q[0] = q0 + k * ldq;
    dots<T, J, 1>(q, v, len, out + k, ldo);
  }
}

// One pass of the kernel over the columns [begin, end) (one super-chunk), sub-chunk by sub-chunk:
//   subtract the previous round's projection (a.coef != nullptr), then either accumulate this round's
//   projection coefficients into proj [b, m] or (last pass) the Gram matrix of the result into gram [b, b]
//   (upper triangle); the first pass also accumulates the squared input norms into norms [b].
// Within a sub-chunk the basis columns are read from memory once by the subtraction and reused from cache
// by the projection that follows it (NOTE: [fused passes] in block_orthogonalize.cpp).
template <typename T>
void chunk_pass(const BlockOrthogonalizePass& a, int64_t begin, int64_t end, double* proj, double* gram, double* norms) {
  const T* Q = static_cast<const T*>(a.basis);
  T* V = static_cast<T*>(a.vectors);
  const T* coef = static_cast<const T*>(a.coef);
  const int64_t m = a.m, b = a.b;
  // NOTE: [first pass sub-chunks]
  // The first pass only reads: nothing of Q is reused, so its sub-chunks are sized for V alone and each
  // row of Q streams through longer runs, which the hardware prefetchers follow better.
  const int64_t sub_len = coef == nullptr ? a.first_sub_len : a.sub_len;
  for (int64_t s = begin; s < end; s += sub_len) {
    const int64_t len = sub_len < end - s ? sub_len : end - s;
    if (norms != nullptr) {
      for (int64_t j = 0; j < b; ++j) {
        const T* vj = V + j * a.ldv + s;
        dots<T, 1, 1>(&vj, &vj, len, norms + j, 1);
      }
    }
    if (coef != nullptr && m > 0) {
      for_row_blocks(b, [&](int64_t j, auto rows_tag) {
        constexpr int J = decltype(rows_tag)::value;
        T* rows[J];
        for (int r = 0; r < J; ++r) rows[r] = V + (j + r) * a.ldv + s;
        subtract<T, J>(Q + s, a.ldq, m, coef + j * m, m, rows, len, a.sub_len, end - s);
      });
    }
    if (a.project) {
      for_row_blocks(b, [&](int64_t j, auto rows_tag) {
        constexpr int J = decltype(rows_tag)::value;
        const T* rows[J];
        for (int r = 0; r < J; ++r) rows[r] = V + (j + r) * a.ldv + s;
        dots_all<T, J>(Q + s, a.ldq, m, rows, len, proj + j * m, m);
      });
    } else if (gram != nullptr) {
      // Upper triangle, row tile by row tile: tile rows [j, j + J) against rows [j, b).
      for_row_blocks(b, [&](int64_t j, auto rows_tag) {
        constexpr int J = decltype(rows_tag)::value;
        const T* rows[J];
        for (int r = 0; r < J; ++r) rows[r] = V + (j + r) * a.ldv + s;
        dots_all<T, J>(V + j * a.ldv + s, a.ldv, b - j, rows, len, gram + j * b + j, b);
      });
    }
  }
}

}  // namespace

void block_orthogonalize_pass_f32(const BlockOrthogonalizePass& a, int64_t begin, int64_t end, double* proj,
                                  double* gram, double* norms) {
  chunk_pass<float>(a, begin, end, proj, gram, norms);
}
void block_orthogonalize_pass_f64(const BlockOrthogonalizePass& a, int64_t begin, int64_t end, double* proj,
                                  double* gram, double* norms) {
  chunk_pass<double>(a, begin, end, proj, gram, norms);
}

}  // namespace mrgd_ext::cpu::MRGD_CPU_ISA
