#include "npy.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ember_example {
namespace {

struct DtypeCode {
  const char* name;   // ember / numpy name
  const char* descr;  // .npy descr without the byte-order character
  int bytes;
};

// The byte-order character is checked separately: '<' (little), '|' (not applicable) or '=' (native, which is
// little on every platform ember targets).
const DtypeCode kDtypes[] = {
    {"float32", "f4", 4}, {"float64", "f8", 8}, {"float16", "f2", 2}, {"int8", "i1", 1},
    {"int16", "i2", 2},   {"int32", "i4", 4},   {"int64", "i8", 8},   {"uint8", "u1", 1},
    {"uint16", "u2", 2},  {"uint32", "u4", 4},  {"uint64", "u8", 8},  {"bool", "b1", 1},
};

std::runtime_error Error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

// Value of `key` in the header dict, e.g. "'<f4'" for 'descr' or "(2, 32)" for 'shape'.
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw Error(path, "the .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  size_t end;
  if (header[start] == '(') {
    end = header.find(')', start) + 1;
  } else if (header[start] == '\'') {
    end = header.find('\'', start + 1) + 1;
  } else {
    end = header.find_first_of(",}", start);
  }
  return header.substr(start, end - start);
}

}  // namespace

int DtypeBytes(const std::string& dtype) {
  for (const auto& d : kDtypes)
    if (dtype == d.name) return d.bytes;
  return 0;
}

NpyArray LoadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path, "cannot open the file");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(path, "not a .npy file (save arrays with numpy.save)");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) throw Error(path, "truncated .npy header");

  std::string descr = HeaderField(header, "descr", path);  // e.g. '<f4'
  descr = descr.substr(1, descr.size() - 2);
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|' && descr[0] != '='))
    throw Error(path, "dtype '" + descr + "' is not a little-endian numeric type; re-save it with "
                      "arr.astype(arr.dtype.newbyteorder('<'))");
  NpyArray out;
  for (const auto& d : kDtypes)
    if (descr.substr(1) == d.descr) out.dtype = d.name;
  if (out.dtype.empty()) throw Error(path, "dtype '" + descr + "' is not supported by this example");
  if (HeaderField(header, "fortran_order", path) != "False")
    throw Error(path, "the array is in Fortran order; re-save it with numpy.ascontiguousarray");

  std::string shape = HeaderField(header, "shape", path);  // "(2, 32)", "(5,)" or "()"
  std::stringstream ss(shape.substr(1, shape.size() - 2));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    out.shape.push_back(std::stoll(item));
  }
  size_t nbytes = static_cast<size_t>(out.numel()) * DtypeBytes(out.dtype);
  out.data.resize(nbytes);
  if (nbytes && !f.read(out.data.data(), nbytes))
    throw Error(path, "the file is shorter than its header says (" + std::to_string(nbytes) + " data bytes)");
  return out;
}

void SaveNpy(const std::string& path, const NpyArray& a) {
  std::string descr;
  for (const auto& d : kDtypes)
    if (a.dtype == d.name) descr = std::string(a.dtype == "bool" || d.bytes == 1 ? "|" : "<") + d.descr;
  if (descr.empty()) throw Error(path, "cannot write dtype " + a.dtype);
  std::string shape = "(";
  for (size_t i = 0; i < a.shape.size(); ++i) shape += std::to_string(a.shape[i]) + ", ";
  if (a.shape.size() > 1) shape.resize(shape.size() - 2);
  if (a.shape.size() == 1) shape.resize(shape.size() - 1);  // "(5,)"
  shape += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Version 1.0: magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64 and
  // ending in '\n', so the data that follows is aligned.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  if (!f) throw Error(path, "cannot create the file");
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  char lb[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  f.write(lb, 2);
  f.write(header.data(), header.size());
  f.write(a.data.data(), a.data.size());
  if (!f) throw Error(path, "write failed");
}

}  // namespace ember_example
