# Script mode driver of the packaging tests (see CMakeLists.txt next to this file).
#
# MODE=install:   -DBUILD_DIR -DPREFIX [-DCONFIG] [-DEXPECT_FILES=a|b]
#   Empties PREFIX, runs `cmake --install BUILD_DIR --prefix PREFIX` and checks EXPECT_FILES
#   (relative to PREFIX) exist.
# MODE=consumer:  -DSOURCE_DIR -DBINARY_DIR -DGENERATOR [-DPLATFORM -DTOOLSET -DMAKE_PROGRAM]
#                 -DCXX_COMPILER [-DCONFIG] [-DARGS=-Da=1|-Db=2] [-DEXPECT_CONFIGURE_ERROR=regex]
#   Configures SOURCE_DIR into a fresh BINARY_DIR, builds it and runs its tests; or, with
#   EXPECT_CONFIGURE_ERROR, checks that configuring fails with a message matching the regex.
cmake_minimum_required(VERSION 3.18)

function(require)
  foreach(_var ${ARGN})
    if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
      message(FATAL_ERROR "run_consumer.cmake: ${_var} is not set")
    endif()
  endforeach()
endfunction()

function(run)
  string(REPLACE ";" " " _pretty "${ARGN}")
  message(STATUS "run: ${_pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "command failed (${_rc}): ${_pretty}")
  endif()
endfunction()

set(_config_args)
if(CONFIG)
  set(_config_args --config "${CONFIG}")
endif()

if(MODE STREQUAL "install")
  require(BUILD_DIR PREFIX)
  file(REMOVE_RECURSE "${PREFIX}")
  run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${_config_args})
  string(REPLACE "|" ";" _files "${EXPECT_FILES}")
  foreach(_file IN LISTS _files)
    if(NOT EXISTS "${PREFIX}/${_file}")
      message(FATAL_ERROR "install did not produce ${PREFIX}/${_file}")
    endif()
  endforeach()
  message(STATUS "installed routegrad into ${PREFIX}")

elseif(MODE STREQUAL "consumer")
  require(SOURCE_DIR BINARY_DIR GENERATOR CXX_COMPILER)
  file(REMOVE_RECURSE "${BINARY_DIR}")
  set(_configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
                 "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
  if(PLATFORM)
    list(APPEND _configure -A "${PLATFORM}")
  endif()
  if(TOOLSET)
    list(APPEND _configure -T "${TOOLSET}")
  endif()
  if(MAKE_PROGRAM)
    list(APPEND _configure "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  if(CONFIG)
    list(APPEND _configure "-DCMAKE_BUILD_TYPE=${CONFIG}")
  endif()
  if(ARGS)
    string(REPLACE "|" ";" _args "${ARGS}")
    list(APPEND _configure ${_args})
  endif()

  string(REPLACE ";" " " _pretty "${_configure}")
  message(STATUS "run: ${_pretty}")
  execute_process(
    COMMAND ${_configure}
    RESULT_VARIABLE _rc
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _out)
  message("${_out}")
  if(DEFINED EXPECT_CONFIGURE_ERROR)
    if(_rc EQUAL 0)
      message(FATAL_ERROR "configure succeeded, but it was expected to fail")
    endif()
    string(REGEX REPLACE "[ \t\r\n]+" " " _flat "${_out}")
    if(NOT _flat MATCHES "${EXPECT_CONFIGURE_ERROR}")
      message(FATAL_ERROR "configure failed, but not with a message matching "
                          "'${EXPECT_CONFIGURE_ERROR}'")
    endif()
    message(STATUS "configure failed as expected")
    return()
  endif()
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "configuring ${SOURCE_DIR} failed (${_rc})")
  endif()

  run("${CMAKE_COMMAND}" --build "${BINARY_DIR}" ${_config_args})
  set(_ctest_config)
  if(CONFIG)
    set(_ctest_config -C "${CONFIG}")
  endif()
  message(STATUS "run: ctest --output-on-failure ${_ctest_config} (in ${BINARY_DIR})")
  execute_process(
    COMMAND "${CMAKE_CTEST_COMMAND}" --output-on-failure ${_ctest_config}
    WORKING_DIRECTORY "${BINARY_DIR}"
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "the consumer's test failed (${_rc})")
  endif()

else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be install or consumer, not '${MODE}'")
endif()
