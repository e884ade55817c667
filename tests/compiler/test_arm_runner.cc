// A minimal C++ host for an ember artifact, built for aarch64 by tests/compiler/test_arm.py and run there under
// qemu-aarch64 with the aarch64 libtvm_runtime.so of PyPI's apache-tvm wheel. It uses TVM's runtime only:
//
//   test_arm_runner MODEL.so PARAMS.bin INPUTS.bin OUTPUTS.bin
//
// PARAMS.bin is the artifact's params.bin (names p0, p1, ...); INPUTS.bin holds the inputs in the same format
// (names i0, i1, ...; written by tvm.runtime.save_param_dict_to_file). The Relax VM's main takes the inputs then
// the weights; every output is written to OUTPUTS.bin as o0, o1, ... so the x86 side reads them back with
// tvm.runtime.load_param_dict_from_file. Any failure prints the reason and exits 1.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cstdio>
#include <string>
#include <vector>

using namespace tvm::ffi;

static std::vector<Tensor> numbered(const Map<String, Tensor>& dict, const char* prefix) {
  std::vector<Tensor> out;
  for (size_t i = 0;; ++i) {
    auto it = dict.find(String(std::string(prefix) + std::to_string(i)));
    if (it == dict.end()) break;
    out.push_back((*it).second);
  }
  if (out.size() != dict.size()) throw std::runtime_error(std::string("tensor names are not ") + prefix + "0..N");
  return out;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s MODEL.so PARAMS.bin INPUTS.bin OUTPUTS.bin\n", argv[0]);
    return 2;
  }
  try {
    Module lib = Module::LoadFromFile(argv[1]);
    Module vm = lib->GetFunction("vm_load_executable").value()().cast<Module>();
    // (device type, id, allocator) for the CPU: kDLCPU = 1, the pooled allocator = 2 (as relax.VirtualMachine).
    vm->GetFunction("vm_initialization").value()(1, 0, 2);
    Function load = Function::GetGlobal("runtime.LoadParamsFromFile").value();
    std::vector<Tensor> params = numbered(load(String(argv[2])).cast<Map<String, Tensor>>(), "p");
    std::vector<Tensor> inputs = numbered(load(String(argv[3])).cast<Map<String, Tensor>>(), "i");
    std::vector<AnyView> args;
    for (auto& t : inputs) args.push_back(t);
    for (auto& t : params) args.push_back(t);
    Function main_fn = vm->GetFunction("main").value();
    Any result;
    main_fn.CallPacked(args.data(), static_cast<int>(args.size()), &result);
    Map<String, Tensor> outputs;
    if (auto t = result.as<Tensor>()) {
      outputs.Set("o0", *t);
    } else {
      Array<Any> items = result.cast<Array<Any>>();
      for (size_t i = 0; i < items.size(); ++i) outputs.Set("o" + std::to_string(i), items[i].cast<Tensor>());
    }
    Function::GetGlobal("runtime.SaveParamsToFile").value()(outputs, String(argv[4]));
    std::printf("ran main: %zu inputs, %zu weights, %zu outputs\n", inputs.size(), params.size(), outputs.size());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_arm_runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
