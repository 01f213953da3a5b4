# routegrad_discover_doctest_tests(<target> LABEL <label>)
#
#   doctest_discover_tests() (one CTest test per doctest test case, discovered after each build)
#   plus a second post-build step, routegradDoctestLabels.cmake, that gives every discovered test
#   the label <label>, its TEST_SUITE name as a further label, the label "slow" when its name
#   starts with "slow:".
#   Needs doctest.cmake to be included first.
set(_ROUTEGRAD_DOCTEST_LABELS_SCRIPT "${CMAKE_CURRENT_LIST_DIR}/routegradDoctestLabels.cmake")

function(routegrad_discover_doctest_tests target)
  cmake_parse_arguments(ARG "" "LABEL" "" ${ARGN})
  if(NOT ARG_LABEL)
    message(FATAL_ERROR "routegrad_discover_doctest_tests(${target}): LABEL is required")
  endif()

  doctest_discover_tests(${target} WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
                         PROPERTIES LABELS "${ARG_LABEL}")

  set(labels_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_labels.cmake")
  set(include_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_labels_include.cmake")
  add_custom_command(
    TARGET ${target}
    POST_BUILD
    BYPRODUCTS "${labels_file}"
    COMMAND
      "${CMAKE_COMMAND}" -D "TEST_EXECUTABLE=$<TARGET_FILE:${target}>" -D "LABEL=${ARG_LABEL}"
      -D "CTEST_FILE=${labels_file}" -D "TEST_WORKING_DIR=${CMAKE_CURRENT_BINARY_DIR}" -P
      "${_ROUTEGRAD_DOCTEST_LABELS_SCRIPT}"
    VERBATIM)
  # Included by CTest after doctest's own file (TEST_INCLUDE_FILES keeps the order).
  file(WRITE "${include_file}" "if(EXISTS \"${labels_file}\")\n  include(\"${labels_file}\")\nendif()\n")
  set_property(
    DIRECTORY
    APPEND
    PROPERTY TEST_INCLUDE_FILES "${include_file}")
endfunction()
