# Cross-build ember_run for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu (sysroot /usr/aarch64-linux-gnu).
# Pass TVM_ROOT / TVM_FFI_ROOT pointing at the tvm and tvm_ffi folders unpacked from the aarch64 wheels.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
