# hbmalloc_find_cuda_runtime(<include-var> <library-var>)
#
# Finds the CUDA runtime's headers and shared library for the interposition test, in order:
#  1. the cache option HBMALLOC_CUDA_RUNTIME_DIR, then the environment variable of that name
#     (a folder with include/cuda_runtime.h, include/crt/ and lib/libcudart.so.13);
#  2. .whl/nvidia/cu13 in the source tree (where scripts/install-test-deps.sh installs the
#     nvidia-cuda-runtime wheel);
#  3. the nvidia-cuda-runtime wheel in python3's site-packages (nvidia/cu13, or nvidia/cuda_runtime
#     for CUDA 12 wheels).
# Sets both variables to "" when nothing usable is found, and then HBMALLOC_CUDA_RUNTIME_MISSING
# to one sentence saying what is missing where (for the caller's single warning).
function(hbmalloc_find_cuda_runtime include_var library_var)
    set(dir "${HBMALLOC_CUDA_RUNTIME_DIR}")
    if(NOT dir AND DEFINED ENV{HBMALLOC_CUDA_RUNTIME_DIR})
        set(dir "$ENV{HBMALLOC_CUDA_RUNTIME_DIR}")
    endif()
    if(NOT dir AND EXISTS "${PROJECT_SOURCE_DIR}/.whl/nvidia/cu13/include/cuda_runtime.h")
        set(dir "${PROJECT_SOURCE_DIR}/.whl/nvidia/cu13")
    endif()
    if(NOT dir)
        find_package(Python3 COMPONENTS Interpreter QUIET)
        if(Python3_Interpreter_FOUND)
            execute_process(
                COMMAND "${Python3_EXECUTABLE}" -c [=[
import os, sys
try:
    import nvidia
except ImportError:
    sys.exit(0)
for base in nvidia.__path__:
    for sub in ("cu13", "cuda_runtime"):
        d = os.path.join(base, sub)
        if os.path.isfile(os.path.join(d, "include", "cuda_runtime.h")):
            print(d)
            sys.exit(0)
]=]
                OUTPUT_VARIABLE dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
        endif()
    endif()

    set(include "")
    set(library "")
    # cuda_runtime.h includes crt/host_config.h, which CUDA 13 wheels ship separately
    # (nvidia-cuda-crt): without it the headers are unusable.
    if(dir AND EXISTS "${dir}/include/cuda_runtime.h" AND EXISTS "${dir}/include/crt/host_config.h")
        set(include "${dir}/include")
        # The wheels ship only the versioned file (no libcudart.so symlink).
        foreach(name libcudart.so.13 libcudart.so.12)
            if(NOT library AND EXISTS "${dir}/lib/${name}")
                set(library "${dir}/lib/${name}")
            endif()
        endforeach()
    endif()
    set(missing "")
    if(NOT dir)
        set(missing "no CUDA runtime found (looked at HBMALLOC_CUDA_RUNTIME_DIR, "
                    ".whl/nvidia/cu13 and python3's nvidia wheels)")
    elseif(NOT include)
        set(missing "${dir} lacks include/cuda_runtime.h or include/crt/host_config.h")
    elseif(NOT library)
        set(missing "${dir} lacks lib/libcudart.so.13")
    endif()
    if(missing)
        set(include "")
        set(library "")
    endif()
    string(CONCAT missing ${missing})
    set(HBMALLOC_CUDA_RUNTIME_MISSING "${missing}" PARENT_SCOPE)
    set(${include_var} "${include}" PARENT_SCOPE)
    set(${library_var} "${library}" PARENT_SCOPE)
endfunction()
