// The doctest runner of the CUDA tests (tests/cuda/*.cu). Plain C++, compiled by the host
// compiler and linked with the CUDA runtime.
//
// Without a usable CUDA device it prints a note and returns 77, which CTest reports as
// "skipped" (SKIP_RETURN_CODE 77), never as passed. Doctest's query options (--help,
// --list-test-cases, ...) work without a device.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>

namespace {

constexpr int kSkipReturnCode = 77;

bool is_query(int argc, char** argv) {
  static const char* const kQueries[] = {"-h",   "--help", "-?",  "-v", "--version",
                                         "-ltc", "-lts",   "-lr", "-c", "--count"};
  for (int i = 1; i < argc; ++i) {
    for (const char* q : kQueries) {
      if (std::strcmp(argv[i], q) == 0) return true;
    }
    if (std::strncmp(argv[i], "--list-", 7) == 0 || std::strncmp(argv[i], "--dt-list-", 10) == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (!is_query(argc, argv)) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      std::printf("no CUDA device: CUDA tests skipped (%s)\n",
                  err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
      std::fflush(stdout);
      return kSkipReturnCode;
    }
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
