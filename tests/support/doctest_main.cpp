// The doctest runner shared by every CPU test file in tests/cpu/: test files only include
// <doctest/doctest.h> and must not define DOCTEST_CONFIG_IMPLEMENT* or main() themselves.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
