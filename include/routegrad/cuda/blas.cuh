// cuBLAS for the MoE layer: the handle a call uses, strided views as cuBLAS operands, one GEMM,
// and the expert GEMMs of a call (one grouped call per stage, or one call per expert).
//
// Every GEMM is C = α·A·B + β·C in row-major index terms on strided views: a view is usable when
// one of its two strides is 1 and the other spans the unit-stride dimension (a leading
// dimension, as BLAS needs); `make_matrix` says whether it is. Storage fp32 / fp64 / fp16 / bf16,
// accumulation in fp32 (fp64 for double): CUBLAS_COMPUTE_32F honours the handle's math mode, so a
// caller's handle that allows TF32 gets TF32 for fp32 layers; the cached handle never does.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/status.hpp"
#include "../core/view.hpp"
#include "error.cuh"

namespace routegrad::cuda {

/// A cuBLAS failure as a status: cuda_error with the cublasStatus_t in detail().
inline status from_cublas(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return status::ok();
  return {status_code::cuda_error, what, static_cast<int>(s)};
}

}  // namespace routegrad::cuda

/// Returns a cuda_error status naming `what` when the cuBLAS call fails.
#define ROUTEGRAD_CUBLAS_TRY(call, what)                              \
  do {                                                                \
    const cublasStatus_t rg_cublas_status_ = (call);                  \
    if (rg_cublas_status_ != CUBLAS_STATUS_SUCCESS)                   \
      return ::routegrad::cuda::from_cublas(rg_cublas_status_, what); \
  } while (0)

namespace routegrad::cuda::blas {

template <class T>
constexpr cudaDataType_t data_type() {
  using S = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<S, double>)
    return CUDA_R_64F;
  else if constexpr (std::is_same_v<S, __half>)
    return CUDA_R_16F;
  else if constexpr (std::is_same_v<S, __nv_bfloat16>)
    return CUDA_R_16BF;
  else
    return CUDA_R_32F;
}

/// fp64 for double storage, fp32 (with the handle's math mode) otherwise.
template <class T>
constexpr cublasComputeType_t compute_type() {
  return std::is_same_v<std::remove_cv_t<T>, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
}

/// α and β are passed in the compute type's scale type.
template <class T>
using scale_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

/// A matrix as cuBLAS addresses it: [rows, cols], row-major or column-major, leading dimension.
struct matrix {
  const void* data;
  index_t rows, cols;
  bool row_major;
  index_t ld;
};

/// The canonical cuBLAS form of a strided [rows, cols] matrix (element (i, j) at i·s0 + j·s1);
/// false when no leading dimension describes it (neither stride is 1, or the strides overlap).
inline bool make_matrix(const void* data, index_t rows, index_t cols, index_t s0, index_t s1,
                        matrix& out) {
  if (rows <= 0 || cols <= 0) {
    out = {data, rows, cols, true, cols > 1 ? cols : 1};
    return true;
  }
  if (s1 == 1 && (rows == 1 || s0 >= cols)) {
    out = {data, rows, cols, true, rows == 1 ? cols : s0};
    return true;
  }
  if (s0 == 1 && (cols == 1 || s1 >= rows)) {
    out = {data, rows, cols, false, cols == 1 ? rows : s1};
    return true;
  }
  if (rows == 1 && s1 >= 1) {  // one row: column-major with the column stride as ld
    out = {data, rows, cols, false, s1};
    return true;
  }
  if (cols == 1 && s0 >= 1) {  // one column: row-major with the row stride as ld
    out = {data, rows, cols, true, s0};
    return true;
  }
  return false;
}

/// Whether a rank-2 view is a cuBLAS operand (and its leading dimension fits cuBLAS's int).
template <class V>
bool is_gemm_operand(const V& v) {
  matrix m{};
  return make_matrix(v.data_handle(), v.extent(0), v.extent(1), v.stride(0), v.stride(1), m) &&
         m.ld <= INT_MAX;
}

/// Expert e's [rows, cols] slab of a rank-3 view [E, rows, cols], or its transpose.
template <class V>
bool slab_matrix(const V& v, index_t e, bool transpose, matrix& out) {
  const auto* p = v.data_handle() + e * v.stride(0);
  return transpose ? make_matrix(p, v.extent(2), v.extent(1), v.stride(2), v.stride(1), out)
                   : make_matrix(p, v.extent(1), v.extent(2), v.stride(1), v.stride(2), out);
}

/// Whether every expert slab of a rank-3 view (or its transpose) is a cuBLAS operand.
template <class V>
bool is_gemm_slab(const V& v) {
  matrix m{};
  return slab_matrix(v, 0, false, m) && m.ld <= INT_MAX;
}

inline matrix transposed(const matrix& m) { return {m.data, m.cols, m.rows, !m.row_major, m.ld}; }

/// One cuBLAS (column-major) GEMM call: C = op(A)·op(B), C [m, n].
struct gemm_call {
  cublasOperation_t transa, transb;
  int m, n, k;
  const void* a;
  int lda;
  const void* b;
  int ldb;
  void* c;
  int ldc;
};

/// Plans C[m, n] = A[m, k]·B[k, n] (row-major index terms) as a column-major cuBLAS call: a
/// row-major C is computed as Cᵀ = Bᵀ·Aᵀ. False when a size or leading dimension exceeds int.
inline bool plan(matrix c, matrix a, matrix b, gemm_call& out) {
  if (c.row_major) {
    const matrix at = transposed(b), bt = transposed(a);
    c = transposed(c);
    a = at;
    b = bt;
  }
  const index_t lim = INT_MAX;
  if (c.rows > lim || c.cols > lim || a.cols > lim || a.ld > lim || b.ld > lim || c.ld > lim)
    return false;
  out.transa = a.row_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  out.transb = b.row_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  out.m = static_cast<int>(c.rows);
  out.n = static_cast<int>(c.cols);
  out.k = static_cast<int>(a.cols);
  out.a = a.data;
  out.lda = static_cast<int>(a.ld);
  out.b = b.data;
  out.ldb = static_cast<int>(b.ld);
  out.c = const_cast<void*>(c.data);
  out.ldc = static_cast<int>(c.ld);
  return true;
}

/// One GEMM: A and B stored as TAB, C as TC, accumulation in TAB's compute type.
template <class TAB, class TC>
status gemm(cublasHandle_t handle, const gemm_call& g, double alpha, double beta) {
  const scale_t<TAB> a = static_cast<scale_t<TAB>>(alpha), b = static_cast<scale_t<TAB>>(beta);
  ROUTEGRAD_CUBLAS_TRY(
      cublasGemmEx(handle, g.transa, g.transb, g.m, g.n, g.k, &a, g.a, data_type<TAB>(), g.lda, g.b,
                   data_type<TAB>(), g.ldb, &b, g.c, data_type<TC>(), g.ldc, compute_type<TAB>(),
                   CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
  return status::ok();
}

/// The cuBLAS handle of a call: the caller's (its stream and pointer mode are set for the call
/// and restored afterwards), or one created on first use for this host thread and device and kept
/// until the thread exits.
class handle_scope {
 public:
  handle_scope() = default;
  handle_scope(const handle_scope&) = delete;
  handle_scope& operator=(const handle_scope&) = delete;
  ~handle_scope() {
    if (restore_) {
      (void)cublasSetStream(handle_, old_stream_);
      (void)cublasSetPointerMode(handle_, old_mode_);
    }
  }

  status open(cublasHandle_t given, cudaStream_t stream) {
    if (given != nullptr) {
      handle_ = given;
      ROUTEGRAD_CUBLAS_TRY(cublasGetStream(handle_, &old_stream_), "cublasGetStream");
      ROUTEGRAD_CUBLAS_TRY(cublasGetPointerMode(handle_, &old_mode_), "cublasGetPointerMode");
      restore_ = true;
    } else {
      ROUTEGRAD_RETURN_IF_ERROR(cached(handle_));
    }
    ROUTEGRAD_CUBLAS_TRY(cublasSetStream(handle_, stream), "cublasSetStream");
    ROUTEGRAD_CUBLAS_TRY(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST),
                         "cublasSetPointerMode");
    return status::ok();
  }
  cublasHandle_t get() const { return handle_; }

 private:
  static status cached(cublasHandle_t& out) {
    struct cache {
      std::vector<std::pair<int, cublasHandle_t>> handles;
      cache() = default;
      cache(const cache&) = delete;
      cache& operator=(const cache&) = delete;
      ~cache() {
        for (auto& h : handles) (void)cublasDestroy(h.second);
      }
    };
    thread_local cache c;
    int device = 0;
    ROUTEGRAD_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
    for (const auto& h : c.handles)
      if (h.first == device) {
        out = h.second;
        return status::ok();
      }
    cublasHandle_t h = nullptr;
    ROUTEGRAD_CUBLAS_TRY(cublasCreate(&h), "cublasCreate");
    c.handles.emplace_back(device, h);
    out = h;
    return status::ok();
  }

  cublasHandle_t handle_ = nullptr;
  cudaStream_t old_stream_ = nullptr;
  cublasPointerMode_t old_mode_ = CUBLAS_POINTER_MODE_HOST;
  bool restore_ = false;
};

/// The expert GEMMs of one layer call, planned on the host once the per-expert row counts are
/// known: each stage is one GEMM per expert with rows (a stage's problems may differ in m, n, k).
/// upload() copies every stage's device pointer arrays at once (cublasGemmGroupedBatchedEx reads
/// A, B and C pointers from device memory); run() issues one grouped call for a stage, or one
/// cublasGemmEx per expert.
class expert_stages {
 public:
  int add_stage(double alpha, double beta) {
    stages_.push_back({alpha, beta, {}});
    return static_cast<int>(stages_.size()) - 1;
  }
  void add(int s, const gemm_call& g) { stages_[static_cast<std::size_t>(s)].calls.push_back(g); }

  /// Pointer slots (void*) the device arrays of `stages` stages of `experts` problems need.
  static std::size_t pointer_slots(int stages, index_t experts) {
    return static_cast<std::size_t>(stages) * 3u * static_cast<std::size_t>(experts);
  }

  /// Copies the A, B, C pointer arrays of every stage to `device_slots` (pointer_slots(...) of
  /// them), stream-ordered. Call it right after a synchronisation (the copy is from pageable
  /// memory).
  status upload(void** device_slots, std::size_t capacity, cudaStream_t stream) {
    host_.clear();
    for (const stage& s : stages_) {
      for (const gemm_call& g : s.calls) host_.push_back(const_cast<void*>(g.a));
      for (const gemm_call& g : s.calls) host_.push_back(const_cast<void*>(g.b));
      for (const gemm_call& g : s.calls) host_.push_back(g.c);
    }
    if (host_.size() > capacity)
      return {status_code::workspace_too_small, "exec.workspace: pointer arrays do not fit"};
    device_ = device_slots;
    if (!host_.empty())
      ROUTEGRAD_CUDA_TRY(cudaMemcpyAsync(device_slots, host_.data(), host_.size() * sizeof(void*),
                                         cudaMemcpyHostToDevice, stream),
                         "cudaMemcpyAsync(expert GEMM pointers)");
    return status::ok();
  }

  /// Runs stage `s`: A and B stored as TAB, C as TC.
  template <class TAB, class TC>
  status run(int s, cublasHandle_t handle, bool grouped) const {
    const stage& st = stages_[static_cast<std::size_t>(s)];
    const int n = static_cast<int>(st.calls.size());
    if (n == 0) return status::ok();
    if (grouped) {
      std::size_t first = 0;  // this stage's place in the uploaded arrays
      for (int i = 0; i < s; ++i) first += 3u * stages_[static_cast<std::size_t>(i)].calls.size();
      std::vector<cublasOperation_t> ta(static_cast<std::size_t>(n)), tb(ta.size());
      std::vector<int> m(ta.size()), nn(ta.size()), k(ta.size()), lda(ta.size()), ldb(ta.size()),
          ldc(ta.size()), size(ta.size(), 1);
      std::vector<scale_t<TAB>> alpha(ta.size(), static_cast<scale_t<TAB>>(st.alpha)),
          beta(ta.size(), static_cast<scale_t<TAB>>(st.beta));
      for (std::size_t i = 0; i < ta.size(); ++i) {
        const gemm_call& g = st.calls[i];
        ta[i] = g.transa;
        tb[i] = g.transb;
        m[i] = g.m;
        nn[i] = g.n;
        k[i] = g.k;
        lda[i] = g.lda;
        ldb[i] = g.ldb;
        ldc[i] = g.ldc;
      }
      void** base = device_ + first;
      const cublasStatus_t r = cublasGemmGroupedBatchedEx(
          handle, ta.data(), tb.data(), m.data(), nn.data(), k.data(), alpha.data(),
          const_cast<const void* const*>(base), data_type<TAB>(), lda.data(),
          const_cast<const void* const*>(base + n), data_type<TAB>(), ldb.data(), beta.data(),
          base + 2 * n, data_type<TC>(), ldc.data(), n, size.data(), compute_type<TAB>());
      if (r == CUBLAS_STATUS_SUCCESS) return status::ok();
      // A cuBLAS without a grouped kernel for these types: one call per expert.
      if (r != CUBLAS_STATUS_NOT_SUPPORTED) return from_cublas(r, "cublasGemmGroupedBatchedEx");
    }
    for (const gemm_call& g : st.calls)
      ROUTEGRAD_RETURN_IF_ERROR((gemm<TAB, TC>(handle, g, st.alpha, st.beta)));
    return status::ok();
  }

 private:
  struct stage {
    double alpha, beta;
    std::vector<gemm_call> calls;
  };
  std::vector<stage> stages_;
  std::vector<void*> host_;
  void** device_ = nullptr;
};

}  // namespace routegrad::cuda::blas
