// Load an ember artifact (model.so + params.bin + manifest.json) with TVM's runtime and run it from C++.
//
// Only the tvm-ffi API is used (tvm::ffi::Module, Function, Tensor, json) plus functions that libtvm_runtime
// registers globally (runtime.LoadParamsFromFile, runtime.TVMTensorAllocWithScope, ...). The apache-tvm wheel's
// own tvm/runtime/tensor.h cannot be included: it needs tvm/support/io.h, which the wheel does not ship.
// tvm::ffi::Tensor is the same object as tvm::runtime::Tensor, so nothing is lost.
//
// What is shared and what is per thread (the same split as ember's Python CompiledModel):
//   Model   — the loaded library and the weights, read once; immutable after Load, share it between threads.
//   Session — one Relax VM (registers, frames); NOT thread-safe: create one Session per thread.
#pragma once

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "npy.h"

namespace ember_example {

// A dimension of a manifest shape: a fixed size, or a symbolic name ("batch") bound at call time.
struct Dim {
  int64_t size = -1;   // >= 0 when fixed
  std::string name;    // non-empty when symbolic
};

struct TensorSpec {
  std::string name;
  std::string dtype;
  bool rank_known = true;
  std::vector<Dim> shape;
  std::string Describe() const;
};

struct Manifest {
  std::string target_name, device, os, arch;
  std::vector<std::string> cpu_flags;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<std::string> param_names;
  std::map<std::string, int64_t> file_bytes;

  // Reads and checks <dir>/manifest.json; throws std::runtime_error with a sentence saying what to do.
  static Manifest Read(const std::string& dir);
};

class Model {
 public:
  // Checks the manifest against this machine (device kind, CPU arch and features, file sizes), loads the
  // library and moves the weights to `device` once.
  static std::shared_ptr<const Model> Load(const std::string& dir, DLDevice device);

  const Manifest& manifest() const { return manifest_; }
  DLDevice device() const { return device_; }
  const tvm::ffi::Module& library() const { return lib_; }
  const std::vector<tvm::ffi::Tensor>& params() const { return params_; }

  // Checks inputs (count, rank, sizes, dtypes, symbolic dims agreeing) in manifest order; throws on a mismatch.
  void CheckInputs(const std::vector<NpyArray>& inputs) const;
  // Host arrays -> tensors on the model's device.
  std::vector<tvm::ffi::Tensor> ToDevice(const std::vector<NpyArray>& inputs) const;
  // A tensor on any device -> host array.
  static NpyArray ToHost(const tvm::ffi::Tensor& t);

 private:
  Manifest manifest_;
  DLDevice device_{};
  tvm::ffi::Module lib_{tvm::ffi::UnsafeInit()};
  std::vector<tvm::ffi::Tensor> params_;
};

class Session {
 public:
  explicit Session(std::shared_ptr<const Model> model);
  // Runs "main" on inputs already on the device; returns the outputs (still on the device).
  std::vector<tvm::ffi::Tensor> Run(const std::vector<tvm::ffi::Tensor>& inputs);
  // Waits for the device's queued work (a no-op on CPU), so timings include the kernels.
  void Sync() const;

 private:
  std::shared_ptr<const Model> model_;
  tvm::ffi::Module vm_{tvm::ffi::UnsafeInit()};
  tvm::ffi::Function main_;
  std::vector<tvm::ffi::AnyView> args_;
};

// "cpu" -> kDLCPU etc.; throws on an unknown name.
DLDevice ParseDevice(const std::string& name);

}  // namespace ember_example
