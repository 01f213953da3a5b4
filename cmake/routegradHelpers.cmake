# Helpers used by routegrad's own CMakeLists.txt files. Nothing here is installed.

# routegrad_check_header_version(<config.hpp>)
#   Fails configure unless ROUTEGRAD_VERSION_MAJOR/MINOR/PATCH in <config.hpp> equal
#   PROJECT_VERSION_MAJOR/MINOR/PATCH. Editing the header re-runs configure.
function(routegrad_check_header_version header)
  if(NOT EXISTS "${header}")
    message(FATAL_ERROR "routegrad: ${header} is missing; it must define "
                        "ROUTEGRAD_VERSION_MAJOR/MINOR/PATCH (${PROJECT_VERSION})")
  endif()
  set_property(
    DIRECTORY
    APPEND
    PROPERTY CMAKE_CONFIGURE_DEPENDS "${header}")
  file(STRINGS "${header}" _lines
       REGEX "^[ \t]*#[ \t]*define[ \t]+ROUTEGRAD_VERSION_(MAJOR|MINOR|PATCH)[ \t]")
  foreach(_part MAJOR MINOR PATCH)
    set(_value "")
    foreach(_line IN LISTS _lines)
      if(_line MATCHES "ROUTEGRAD_VERSION_${_part}[ \t]+\\(?[ \t]*([0-9]+)")
        set(_value "${CMAKE_MATCH_1}")
      endif()
    endforeach()
    if(_value STREQUAL "")
      message(FATAL_ERROR "routegrad: ${header} does not define ROUTEGRAD_VERSION_${_part}")
    endif()
    if(NOT _value EQUAL PROJECT_VERSION_${_part})
      message(
        FATAL_ERROR
          "routegrad: version mismatch: project(routegrad VERSION ${PROJECT_VERSION}) but "
          "${header} has ROUTEGRAD_VERSION_${_part} ${_value}. Update both together.")
    endif()
  endforeach()
endfunction()

# routegrad_target_dev_options(<target> [NO_SANITIZE])
#   Warnings (and -Werror when ROUTEGRAD_WERROR) and sanitizers (ROUTEGRAD_SANITIZE) for
#   routegrad's own tests, examples and benchmarks. Never applied to the library targets.
function(routegrad_target_dev_options target)
  cmake_parse_arguments(ARG "NO_SANITIZE" "" "" ${ARGN})

  if(MSVC)
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:/W4;/permissive->")
    if(ROUTEGRAD_WERROR)
      target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:/WX>")
    endif()
  else()
    set(_warnings -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor)
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${_warnings}>")
    if(ROUTEGRAD_WERROR)
      target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:-Werror>")
    endif()
  endif()

  if(ROUTEGRAD_CUDA_ENABLED)
    # C++17 for .cu files, and the shared CUDA runtime: routegrad::cuda links CUDA::cudart, so
    # CMake's default (cudart_static for CUDA targets) would put both runtimes on the link line.
    set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Shared CUDA_STANDARD 17
                                               CUDA_STANDARD_REQUIRED ON)
    # Host-compiler warnings go through -Xcompiler. No -Wpedantic: the host code nvcc generates
    # trips it ("style of line directive is a GCC extension").
    target_compile_options(
      ${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow,-Wnon-virtual-dtor>")
    if(ROUTEGRAD_WERROR)
      target_compile_options(
        ${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings;-Xcompiler=-Werror>")
    endif()
  endif()

  if(ROUTEGRAD_SANITIZE AND NOT ARG_NO_SANITIZE)
    if(MSVC)
      message(WARNING "routegrad: ROUTEGRAD_SANITIZE is ignored with MSVC")
    else()
      list(JOIN ROUTEGRAD_SANITIZE "," _sanitizers)
      target_compile_options(
        ${target}
        PRIVATE
          "$<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${_sanitizers};-fno-sanitize-recover=all;-fno-omit-frame-pointer>"
      )
      target_link_options(${target} PRIVATE "$<$<LINK_LANGUAGE:CXX>:-fsanitize=${_sanitizers}>")
    endif()
  endif()
endfunction()

# routegrad_add_kernels_once_test(<program>)
#   A CTest test (label build; no GPU needed) that fails when one of <program>'s routing kernels
#   is compiled in two of its object files (tests/support/kernels_compiled_once.sh says why).
function(routegrad_add_kernels_once_test program)
  if(NOT CMAKE_NM)
    message(STATUS "routegrad: no nm, ${program}.kernels_compiled_once is not added")
    return()
  endif()
  add_test(NAME ${program}.kernels_compiled_once
           COMMAND bash "${PROJECT_SOURCE_DIR}/tests/support/kernels_compiled_once.sh" "${CMAKE_NM}"
                   ${program} "$<TARGET_OBJECTS:${program}>" COMMAND_EXPAND_LISTS)
  set_tests_properties(${program}.kernels_compiled_once PROPERTIES LABELS build)
endfunction()
