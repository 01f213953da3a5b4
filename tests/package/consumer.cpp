// The program both consumer projects build: it includes the umbrella header the way a user does
// and checks that the header's version agrees with the package it came from.
#include <routegrad/core/config.hpp>
#include <routegrad/routegrad.hpp>

#include <cstdio>
#include <cstring>

#ifdef ROUTEGRAD_CONSUMER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

int main() {
  const char* version = routegrad::version_string();
  std::printf("routegrad %s\n", version);

  char expected[64];
  std::snprintf(expected, sizeof expected, "%d.%d.%d", ROUTEGRAD_VERSION_MAJOR,
                ROUTEGRAD_VERSION_MINOR, ROUTEGRAD_VERSION_PATCH);
  if (std::strcmp(version, expected) != 0) {
    std::printf("version_string() is %s but the version macros say %s\n", version, expected);
    return 1;
  }
#ifdef ROUTEGRAD_CONSUMER_PACKAGE_VERSION
  if (std::strcmp(version, ROUTEGRAD_CONSUMER_PACKAGE_VERSION) != 0) {
    std::printf("version_string() is %s but the CMake package is %s\n", version,
                ROUTEGRAD_CONSUMER_PACKAGE_VERSION);
    return 1;
  }
#endif
#ifdef ROUTEGRAD_CONSUMER_WITH_CUDA
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || runtime <= 0) {
    std::printf("cudaRuntimeGetVersion failed\n");
    return 1;
  }
  std::printf("CUDA runtime %d\n", runtime);
#endif
  return 0;
}
