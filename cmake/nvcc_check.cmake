# Compile one torch-free CUDA source with nvcc for sm_80 and sm_90 and fail on register spills.
# Usage: cmake -DNVCC=... -DSRC=... -DOUT=... -DINC=... -P nvcc_check.cmake
execute_process(
  COMMAND ${NVCC} -c ${SRC} -o ${OUT}.o -std=c++17 -O3 -I${INC}
          -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(WRITE ${OUT}.ptxas.txt "${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed on ${SRC}:\n${out}${err}")
endif()
string(REGEX MATCHALL "[1-9][0-9]* bytes spill (stores|loads)" spills "${err}")
if(spills)
  message(FATAL_ERROR "ptxas reports register spills in ${SRC}: ${spills}\n${err}")
endif()
string(REGEX MATCHALL "Used [0-9]+ registers[^\n]*" regs "${err}")
list(LENGTH regs nkernels)
message(STATUS "${SRC}: ${nkernels} kernel builds, no spills")
foreach(line IN LISTS regs)
  message(STATUS "  ${line}")
endforeach()
