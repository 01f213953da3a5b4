// Version, compiler portability macros. Included by every routegrad header.
#pragma once

#define ROUTEGRAD_VERSION_MAJOR 0
#define ROUTEGRAD_VERSION_MINOR 1
#define ROUTEGRAD_VERSION_PATCH 0

// ROUTEGRAD_HD marks functions callable from host and device code. It vanishes when the
// translation unit is not compiled by a CUDA compiler, so the core stays plain C++17.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define ROUTEGRAD_HD __host__ __device__
#define ROUTEGRAD_DEVICE_COMPILER 1
#else
#define ROUTEGRAD_HD
#define ROUTEGRAD_DEVICE_COMPILER 0
#endif

#if defined(__CUDA_ARCH__)
#define ROUTEGRAD_DEVICE_PASS 1
#else
#define ROUTEGRAD_DEVICE_PASS 0
#endif

#if defined(_MSC_VER)
#define ROUTEGRAD_FORCEINLINE __forceinline
#else
#define ROUTEGRAD_FORCEINLINE inline __attribute__((always_inline))
#endif

namespace routegrad {

#define ROUTEGRAD_STRINGIFY_IMPL(x) #x
#define ROUTEGRAD_STRINGIFY(x) ROUTEGRAD_STRINGIFY_IMPL(x)

/// The library version as "major.minor.patch".
inline const char* version_string() {
  return ROUTEGRAD_STRINGIFY(ROUTEGRAD_VERSION_MAJOR) "." ROUTEGRAD_STRINGIFY(
      ROUTEGRAD_VERSION_MINOR) "." ROUTEGRAD_STRINGIFY(ROUTEGRAD_VERSION_PATCH);
}

}  // namespace routegrad
