#include "ember_model.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/json.h>

#include <algorithm>
#include <fstream>
#include <cstdlib>
#include <set>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>
#include <utility>
#if defined(__linux__)
#include <sched.h>
#endif

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

namespace ffi = tvm::ffi;

namespace ember_example {
namespace {

// The allocator the VM uses for its intermediate buffers: pooled (kPooled in TVM's memory manager), as Python's
// relax.VirtualMachine does by default.
constexpr int kPooledAllocator = 2;

ffi::Any Field(const ffi::json::Object& obj, const char* key, const std::string& where) {
  auto v = obj.Get(ffi::String(key));
  if (!v.has_value()) throw std::runtime_error(where + ": manifest.json has no '" + key + "'; re-export the artifact");
  return *v;
}

std::string Str(const ffi::Any& v) { return std::string(v.cast<ffi::String>()); }

TensorSpec ParseSpec(const ffi::Any& v) {
  auto obj = v.cast<ffi::json::Object>();
  TensorSpec s;
  s.name = Str(Field(obj, "name", "spec"));
  s.dtype = Str(Field(obj, "dtype", "spec"));
  ffi::Any shape = Field(obj, "shape", "spec");
  if (shape == nullptr) {  // rank unknown until run time (outputs only)
    s.rank_known = false;
    return s;
  }
  for (const ffi::Any& d : shape.cast<ffi::json::Array>()) {
    Dim dim;
    if (auto n = d.as<int64_t>()) {
      dim.size = *n;
    } else {
      dim.name = Str(d);
    }
    s.shape.push_back(dim);
  }
  return s;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The host CPU's feature flags from /proc/cpuinfo (Linux: "flags" on x86, "Features" on AArch64); empty when
// unknown, and then nothing is checked.
std::set<std::string> HostCpuFlags() {
  // Only the line of this binary's own architecture: under user-mode emulation (qemu-aarch64 on x86) the file
  // describes the host CPU, whose x86 flags say nothing about the emulated one.
#if defined(__aarch64__)
  const char* kCpuinfoKey = "Features";
#else
  const char* kCpuinfoKey = "flags";
#endif
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(kCpuinfoKey, 0) == 0) {
      std::stringstream ss(line.substr(line.find(':') + 1));
      std::set<std::string> flags;
      std::string flag;
      while (ss >> flag) flags.insert(flag);
      return flags;
    }
  }
  return {};
}

// Python's platform.system().lower(), which the manifest's target "os" is written as.
std::string HostOs() {
#if defined(__linux__)
  return "linux";
#elif defined(__APPLE__)
  return "darwin";
#elif defined(_WIN32)
  return "windows";
#else
  return "";
#endif
}

std::string HostArch() {
#if defined(__x86_64__) || defined(_M_X64)
  return "x86_64";
#elif defined(__aarch64__) || defined(_M_ARM64)
  return "aarch64";
#else
  return "";
#endif
}

const char* DeviceName(DLDeviceType t) {
  switch (t) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLROCM: return "rocm";
    case kDLMetal: return "metal";
    default: return "?";
  }
}

// libtvm_runtime holds the CPU device only; the CUDA device API is the wheel's sidecar libtvm_runtime_cuda, which
// registers itself when loaded. dlopen searches this binary's rpath (the wheel's lib folder, or $ORIGIN).
void LoadDeviceRuntime(DLDevice device) {
  if (device.device_type != kDLCUDA) return;
#if !defined(_WIN32)
  if (ffi::Function::GetGlobal("device_api.cuda").has_value()) return;
  if (!dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL))
    throw std::runtime_error(std::string("cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so next to "
                                         "libtvm_runtime): ") + dlerror() + "; is the NVIDIA driver installed?");
#endif
}

ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value())
    throw std::runtime_error(std::string("TVM runtime function ") + name + " is not registered: is libtvm_runtime "
                             "linked (with --no-as-needed) and of the same version as the artifact's TVM?");
  return *f;
}

}  // namespace

std::string TensorSpec::Describe() const {
  std::string out = name + ": " + dtype + "[";
  if (!rank_known) return out + "...]";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + (shape[i].name.empty() ? std::to_string(shape[i].size) : shape[i].name);
  }
  return out + "]";
}

Manifest Manifest::Read(const std::string& dir) {
  std::string path = dir + "/manifest.json";
  std::ifstream probe(path);
  if (!probe)
    throw std::runtime_error(dir + ": no manifest.json; this is not an ember artifact directory (export one with "
                             "`ember compile MODEL -o DIR`; a .tar artifact must be unpacked first)");
  ffi::String error;
  ffi::Any root = ffi::json::Parse(ReadFile(path), &error);
  if (!error.empty()) throw std::runtime_error(path + " is not valid JSON (" + std::string(error) + ")");
  auto obj = root.cast<ffi::json::Object>();
  if (Str(Field(obj, "format", path)) != "ember-artifact")
    throw std::runtime_error(path + " is not an ember manifest");
  if (Field(obj, "format_version", path).cast<int64_t>() > 1)
    throw std::runtime_error(path + ": artifact format is newer than this example reads (1); update the example");
  Manifest m;
  auto target = Field(obj, "target", path).cast<ffi::json::Object>();
  m.target_name = Str(Field(target, "name", path));
  m.device = Str(Field(target, "device", path));
  if (auto arch = target.Get(ffi::String("arch")); arch.has_value() && *arch != nullptr) m.arch = Str(*arch);
  if (auto os = target.Get(ffi::String("os")); os.has_value() && *os != nullptr) m.os = Str(*os);
  if (auto flags = target.Get(ffi::String("cpu_flags")); flags.has_value() && *flags != nullptr)
    for (const ffi::Any& f : flags->cast<ffi::json::Array>()) m.cpu_flags.push_back(Str(f));
  for (const ffi::Any& s : Field(obj, "inputs", path).cast<ffi::json::Array>()) m.inputs.push_back(ParseSpec(s));
  for (const ffi::Any& s : Field(obj, "outputs", path).cast<ffi::json::Array>()) m.outputs.push_back(ParseSpec(s));
  auto params = Field(obj, "params", path).cast<ffi::json::Object>();
  for (const ffi::Any& n : Field(params, "names", path).cast<ffi::json::Array>()) m.param_names.push_back(Str(n));
  for (const auto& kv : Field(obj, "files", path).cast<ffi::json::Object>()) {
    auto info = kv.second.cast<ffi::json::Object>();
    m.file_bytes[Str(kv.first)] = Field(info, "bytes", path).cast<int64_t>();
  }
  return m;
}

// TVM's CPU thread pool takes hardware_concurrency()/2 threads on x86-64 unless TVM_NUM_THREADS (or
// OMP_NUM_THREADS) says otherwise, assuming two hyper-threads per core; on VMs with one thread per core that
// halves the cores ember's kernels use. Same policy as Python's `import ember` (ember/cpu_threads.py): default
// to the physical cores this process may run on, counting SMT siblings once; a user's setting wins. TVM reads the
// variable when the pool first starts, so this runs before the first call.
static void DefaultCpuThreads() {
  if (std::getenv("TVM_NUM_THREADS") || std::getenv("OMP_NUM_THREADS")) return;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return;
  std::set<std::pair<std::string, std::string>> cores;
  int cpus = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    ++cpus;
    std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(topo + "physical_package_id"), core(topo + "core_id");
    std::string p, c;
    if (!(pkg >> p) || !(core >> c)) { cores.clear(); break; }  // no topology: every CPU counts
    cores.insert({p, c});
  }
  int n = cores.empty() ? cpus : static_cast<int>(cores.size());
  if (n > 0) setenv("TVM_NUM_THREADS", std::to_string(n).c_str(), 0);
#endif
}

DLDevice ParseDevice(const std::string& name) {
  if (name == "cpu") return {kDLCPU, 0};
  if (name == "cuda") return {kDLCUDA, 0};
  if (name == "rocm") return {kDLROCM, 0};
  if (name == "metal") return {kDLMetal, 0};
  throw std::runtime_error("--device " + name + ": unknown device; use cpu, cuda, rocm or metal");
}

std::shared_ptr<const Model> Model::Load(const std::string& dir, DLDevice device) {
  DefaultCpuThreads();
  auto model = std::make_shared<Model>();
  Manifest& m = model->manifest_;
  m = Manifest::Read(dir);
  model->device_ = device;

  // The checks ember.load makes before touching the library (except sha256: file sizes catch truncation).
  std::string want = DeviceName(device.device_type);
  if (m.device != want)
    throw std::runtime_error(dir + ": compiled for target '" + m.target_name + "' which runs on '" + m.device +
                             "', but --device " + want + " was asked; pass --device " + m.device + " or recompile");
  if (!m.os.empty() && !HostOs().empty() && m.os != HostOs())
    throw std::runtime_error(dir + ": compiled for " + m.os + " (target '" + m.target_name + "'), this program runs "
                             "on " + HostOs() + "; recompile with a target for this machine (e.g. --target host)");
  if (!m.arch.empty() && !HostArch().empty() && m.arch != HostArch())
    throw std::runtime_error(dir + ": compiled for " + m.arch + " CPUs, this program runs on " + HostArch() +
                             "; recompile with a target for this machine (ember compile --target ...)");
  std::set<std::string> flags = HostCpuFlags();
  if (!flags.empty()) {
    std::string missing;
    for (const auto& f : m.cpu_flags)
      if (!flags.count(f)) missing += (missing.empty() ? "" : ", ") + f;
    if (!missing.empty())
      throw std::runtime_error(dir + ": its code uses CPU features this CPU lacks (" + missing + "); it would "
                               "crash with 'Illegal instruction'. Recompile with --target host on this machine.");
  }
  for (const auto& kv : m.file_bytes) {
    struct stat st;
    std::string f = dir + "/" + kv.first;
    if (stat(f.c_str(), &st) != 0) throw std::runtime_error(f + " is missing; the artifact is incomplete");
    if (st.st_size != kv.second)
      throw std::runtime_error(f + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                               std::to_string(kv.second) + "; the artifact was changed or truncated — re-export it");
  }

  LoadDeviceRuntime(device);
  // model.so holds the Relax VM executable and every kernel; libtvm_runtime registers its loader.
  model->lib_ = ffi::Module::LoadFromFile(dir + "/model.so");

  // params.bin is in TVM's param-dict format; LoadParamsFromFile reads each tensor straight into CPU memory.
  auto loaded = Global("runtime.LoadParamsFromFile")(ffi::String(dir + "/params.bin"))
                    .cast<ffi::Map<ffi::String, ffi::Tensor>>();
  if (loaded.size() != m.param_names.size())
    throw std::runtime_error(dir + ": params.bin holds " + std::to_string(loaded.size()) + " tensors, the manifest "
                             "lists " + std::to_string(m.param_names.size()) + "; re-export the artifact");
  ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  ffi::Function copy_from = Global("runtime.TVMTensorCopyFromBytes");
  for (const auto& name : m.param_names) {
    auto it = loaded.find(ffi::String(name));
    if (it == loaded.end()) throw std::runtime_error(dir + ": params.bin has no tensor '" + name + "'");
    ffi::Tensor cpu = (*it).second;
    if (device.device_type == kDLCPU) {
      model->params_.push_back(cpu);  // already where the kernels read it: no second copy
    } else {
      ffi::Tensor dev = alloc(ffi::Shape(cpu.shape().begin(), cpu.shape().end()), cpu.dtype(), device,
                              ffi::Optional<ffi::String>())
                            .cast<ffi::Tensor>();
      copy_from(dev, cpu.data_ptr(), static_cast<int64_t>(ffi::GetDataSize(*cpu.GetDLTensorPtr())));
      model->params_.push_back(dev);
    }
  }
  return model;
}

void Model::CheckInputs(const std::vector<NpyArray>& inputs) const {
  const auto& specs = manifest_.inputs;
  if (inputs.size() != specs.size())
    throw std::runtime_error("this model takes " + std::to_string(specs.size()) + " input(s), got " +
                             std::to_string(inputs.size()));
  std::map<std::string, int64_t> bound;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const NpyArray& a = inputs[i];
    if (a.dtype != s.dtype)
      throw std::runtime_error("input '" + s.name + "' must be " + s.dtype + ", got " + a.dtype +
                               " (convert it with numpy's .astype before saving)");
    if (a.shape.size() != s.shape.size())
      throw std::runtime_error("input '" + s.name + "' must have " + std::to_string(s.shape.size()) +
                               " dimensions (" + s.Describe() + "), got " + std::to_string(a.shape.size()));
    for (size_t d = 0; d < s.shape.size(); ++d) {
      const Dim& want = s.shape[d];
      int64_t got = a.shape[d];
      if (want.name.empty() && want.size != got)
        throw std::runtime_error("input '" + s.name + "' dimension " + std::to_string(d) + " must be " +
                                 std::to_string(want.size) + " (" + s.Describe() + "), got " + std::to_string(got));
      if (!want.name.empty()) {
        if (got < 1) throw std::runtime_error("input '" + s.name + "' dimension '" + want.name + "' must be >= 1");
        auto ins = bound.emplace(want.name, got);
        if (ins.first->second != got)
          throw std::runtime_error("dimension '" + want.name + "' is " + std::to_string(ins.first->second) +
                                   " in an earlier input but " + std::to_string(got) + " in '" + s.name + "'");
      }
    }
  }
}

std::vector<ffi::Tensor> Model::ToDevice(const std::vector<NpyArray>& inputs) const {
  static ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  static ffi::Function copy_from = Global("runtime.TVMTensorCopyFromBytes");
  std::vector<ffi::Tensor> out;
  for (const NpyArray& a : inputs) {
    ffi::Tensor t = alloc(ffi::Shape(a.shape), ffi::StringToDLDataType(ffi::String(a.dtype)), device_,
                          ffi::Optional<ffi::String>())
                        .cast<ffi::Tensor>();
    copy_from(t, static_cast<void*>(const_cast<char*>(a.data.data())), static_cast<int64_t>(a.data.size()));
    out.push_back(t);
  }
  return out;
}

NpyArray Model::ToHost(const ffi::Tensor& t) {
  static ffi::Function copy_to = Global("runtime.TVMTensorCopyToBytes");
  NpyArray a;
  a.dtype = std::string(ffi::DLDataTypeToString(t.dtype()));
  a.shape.assign(t.shape().begin(), t.shape().end());
  a.data.resize(ffi::GetDataSize(*t.GetDLTensorPtr()));
  if (!a.data.empty()) copy_to(t, static_cast<void*>(a.data.data()), static_cast<int64_t>(a.data.size()));
  return a;
}

Session::Session(std::shared_ptr<const Model> model) : model_(std::move(model)) {
  // Each Session gets its own VM over the shared executable; the weights are not copied (see Run).
  vm_ = model_->library()->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  DLDevice dev = model_->device();
  ffi::Function init = vm_->GetFunction("vm_initialization").value();
  if (dev.device_type == kDLCPU) {
    init(static_cast<int>(dev.device_type), dev.device_id, kPooledAllocator);
  } else {  // the VM runs shape computations on the CPU, so it always gets the CPU as well
    init(static_cast<int>(dev.device_type), dev.device_id, kPooledAllocator, static_cast<int>(kDLCPU), 0,
         kPooledAllocator);
  }
  main_ = vm_->GetFunction("main").value();
  // ember's "main" takes the inputs first, then the weights: the weight half of the argument list is fixed.
  args_.resize(model_->manifest().inputs.size());
  for (const ffi::Tensor& p : model_->params()) args_.emplace_back(p);
}

std::vector<ffi::Tensor> Session::Run(const std::vector<ffi::Tensor>& inputs) {
  size_t n = model_->manifest().inputs.size();
  if (inputs.size() != n) throw std::runtime_error("Session::Run: expected " + std::to_string(n) + " inputs");
  for (size_t i = 0; i < n; ++i) args_[i] = inputs[i];
  ffi::Any rv;
  main_.CallPacked(args_.data(), static_cast<int32_t>(args_.size()), &rv);
  for (size_t i = 0; i < n; ++i) args_[i] = ffi::AnyView();  // do not keep views of the caller's tensors
  std::vector<ffi::Tensor> outs;
  if (auto t = rv.as<ffi::Tensor>()) {
    outs.push_back(*t);
  } else {
    for (const ffi::Any& o : rv.cast<ffi::Array<ffi::Any>>()) outs.push_back(o.cast<ffi::Tensor>());
  }
  return outs;
}

void Session::Sync() const {
  DLDevice dev = model_->device();
  if (dev.device_type == kDLCPU) return;
  static ffi::Function sync = Global("runtime.Device_StreamSync");
  sync(dev, static_cast<int64_t>(0));  // (device, stream handle as an integer; 0 = the default stream)
}

}  // namespace ember_example
