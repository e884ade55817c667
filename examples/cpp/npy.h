// Minimal reader/writer for NumPy .npy files (format versions 1.0, 2.0 and 3.0, C order only).
//
// Only what an inference app needs: little-endian numeric and bool arrays. Big-endian or Fortran-order files
// and object arrays are refused with a message saying how to re-save them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ember_example {

struct NpyArray {
  std::string dtype;            // ember/numpy dtype name: "float32", "int64", "bool", ...
  std::vector<int64_t> shape;   // empty for a 0-d array
  std::vector<char> data;       // raw bytes, C order

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Bytes per element of an ember dtype name, or 0 if it is not one this example handles.
int DtypeBytes(const std::string& dtype);

// Throws std::runtime_error naming the file and the problem.
NpyArray LoadNpy(const std::string& path);
void SaveNpy(const std::string& path, const NpyArray& array);

}  // namespace ember_example
