// ember_run: load an ember artifact with libtvm_runtime, feed inputs by name, write the outputs, time it.
//
//   ember_run ARTIFACT_DIR [--input NAME=FILE.npy]... [--dim NAME=SIZE]... [--device cpu]
//             [--output-dir DIR] [--warmup 5] [--repeat 30] [--min-seconds 0.5] [--seed 0] [--json]
//             [--threads N --iterations 20]
//
// Inputs not given with --input are random (floats ~ N(0, 1), integers in [0, 100), as `ember bench` makes them);
// their symbolic dimensions take the size given by --dim (default 1). Outputs are printed and, with
// --output-dir, written as DIR/<output name>.npy. The latency is the median over the timed runs of "main" on
// inputs already on the device (the same measure as ember's Python CompiledModel.benchmark).
// --threads N: afterwards N threads, each with its own Session over the one shared Model, run the same inputs
// --iterations times at once and every result is compared with the first run's outputs (exit 1 on a mismatch).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <tvm/ffi/error.h>

#include "ember_model.h"
#include "npy.h"

using ember_example::Model;
using ember_example::NpyArray;
using ember_example::Session;

namespace {

struct Options {
  std::string artifact;
  std::map<std::string, std::string> input_files;
  std::map<std::string, int64_t> dims;
  std::string device = "cpu";
  std::string output_dir;
  int warmup = 5;
  int repeat = 30;
  double min_seconds = 0.5;
  uint64_t seed = 0;
  bool json = false;
  int threads = 0;
  int iterations = 20;
};

const char* kUsage =
    "usage: ember_run ARTIFACT_DIR [--input NAME=FILE.npy]... [--dim NAME=SIZE]... [--device cpu|cuda|rocm|metal]\n"
    "                 [--output-dir DIR] [--warmup N] [--repeat N] [--min-seconds S] [--seed N] [--json]\n"
    "                 [--threads N] [--iterations N]\n";

std::pair<std::string, std::string> SplitEq(const std::string& flag, const std::string& v) {
  size_t eq = v.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == v.size())
    throw std::runtime_error(flag + " " + v + ": write NAME=VALUE");
  return {v.substr(0, eq), v.substr(eq + 1)};
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (a == "--input") {
      auto kv = SplitEq(a, value());
      o.input_files[kv.first] = kv.second;
    } else if (a == "--dim") {
      auto kv = SplitEq(a, value());
      char* end = nullptr;
      long long n = std::strtoll(kv.second.c_str(), &end, 10);
      if (*end || n < 1) throw std::runtime_error("--dim " + kv.first + "=" + kv.second + ": SIZE must be >= 1");
      o.dims[kv.first] = n;
    } else if (a == "--device") {
      o.device = value();
    } else if (a == "--output-dir") {
      o.output_dir = value();
    } else if (a == "--warmup") {
      o.warmup = std::stoi(value());
    } else if (a == "--repeat") {
      o.repeat = std::max(1, std::stoi(value()));
    } else if (a == "--min-seconds") {
      o.min_seconds = std::stod(value());
    } else if (a == "--seed") {
      o.seed = std::stoull(value());
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--threads") {
      o.threads = std::stoi(value());
    } else if (a == "--iterations") {
      o.iterations = std::max(1, std::stoi(value()));
    } else if (!a.empty() && a[0] == '-') {
      throw std::runtime_error("unknown option " + a + "\n" + kUsage);
    } else if (o.artifact.empty()) {
      o.artifact = a;
    } else {
      throw std::runtime_error("one artifact directory only (got '" + o.artifact + "' and '" + a + "')");
    }
  }
  if (o.artifact.empty()) throw std::runtime_error(std::string("no artifact directory given\n") + kUsage);
  return o;
}

NpyArray RandomInput(const ember_example::TensorSpec& s, const std::map<std::string, int64_t>& dims,
                     std::mt19937_64& rng) {
  NpyArray a;
  a.dtype = s.dtype;
  for (const auto& d : s.shape) {
    if (d.name.empty()) {
      a.shape.push_back(d.size);
    } else {
      auto it = dims.find(d.name);
      a.shape.push_back(it == dims.end() ? 1 : it->second);
    }
  }
  int bytes = ember_example::DtypeBytes(s.dtype);
  if (!bytes) throw std::runtime_error("input '" + s.name + "' has dtype " + s.dtype + "; give it with --input");
  a.data.resize(static_cast<size_t>(a.numel()) * bytes);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> ints(0, 99);
  for (int64_t i = 0; i < a.numel(); ++i) {
    char* p = a.data.data() + i * bytes;
    if (s.dtype == "float32") {
      *reinterpret_cast<float*>(p) = normal(rng);
    } else if (s.dtype == "float64") {
      *reinterpret_cast<double*>(p) = normal(rng);
    } else if (s.dtype == "int64") {
      *reinterpret_cast<int64_t*>(p) = ints(rng);
    } else if (s.dtype == "int32") {
      *reinterpret_cast<int32_t*>(p) = static_cast<int32_t>(ints(rng));
    } else if (s.dtype == "bool") {
      *p = static_cast<char>(ints(rng) % 2);
    } else {
      throw std::runtime_error("input '" + s.name + "' (" + s.dtype + "): no random generator; use --input");
    }
  }
  return a;
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string FirstValues(const NpyArray& a, int n) {
  std::string s = "[";
  char buf[64];
  for (int64_t i = 0; i < std::min<int64_t>(n, a.numel()); ++i) {
    const char* p = a.data.data();
    if (a.dtype == "float32") std::snprintf(buf, sizeof buf, "%.5g", reinterpret_cast<const float*>(p)[i]);
    else if (a.dtype == "float64") std::snprintf(buf, sizeof buf, "%.5g", reinterpret_cast<const double*>(p)[i]);
    else if (a.dtype == "int64") std::snprintf(buf, sizeof buf, "%lld", (long long)reinterpret_cast<const int64_t*>(p)[i]);
    else if (a.dtype == "int32") std::snprintf(buf, sizeof buf, "%d", reinterpret_cast<const int32_t*>(p)[i]);
    else std::snprintf(buf, sizeof buf, "?");
    s += (i ? " " : "") + std::string(buf);
  }
  return s + "]";
}

// Resident memory now and at its peak, in MiB, from /proc/self/status (Linux); -1 where unknown.
std::pair<double, double> ResidentMiB() {
  std::ifstream f("/proc/self/status");
  std::string line;
  double rss = -1, hwm = -1;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stod(line.substr(6)) / 1024.0;
    if (line.rfind("VmHWM:", 0) == 0) hwm = std::stod(line.substr(6)) / 1024.0;
  }
  return {rss, hwm};
}

// Runs `threads` Sessions at once (released together), each `iterations` times on the same device inputs, and
// counts results that differ from `expected` (relative 1e-5 for floats, exact otherwise).
int CheckConcurrent(const std::shared_ptr<const Model>& model, const std::vector<tvm::ffi::Tensor>& inputs,
                    const std::vector<NpyArray>& expected, int threads, int iterations) {
  std::atomic<int> bad{0}, ready{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&]() {
      try {
        Session session(model);  // per thread: a VM; the weights stay the Model's
        ready++;
        while (ready.load() < threads) std::this_thread::yield();
        for (int i = 0; i < iterations; ++i) {
          std::vector<tvm::ffi::Tensor> outs = session.Run(inputs);
          session.Sync();
          for (size_t k = 0; k < outs.size(); ++k) {
            NpyArray got = Model::ToHost(outs[k]);
            bool same = got.shape == expected[k].shape && got.data.size() == expected[k].data.size();
            if (same && got.dtype == "float32") {
              auto* a = reinterpret_cast<const float*>(got.data.data());
              auto* b = reinterpret_cast<const float*>(expected[k].data.data());
              for (int64_t j = 0; j < got.numel() && same; ++j)
                same = std::fabs(a[j] - b[j]) <= 1e-5f * std::max(1.0f, std::fabs(b[j]));
            } else if (same) {
              same = got.data == expected[k].data;
            }
            if (!same) bad++;
          }
        }
      } catch (const std::exception& e) {
        std::cerr << "ember_run: thread failed: " << e.what() << "\n";
        bad++;
      }
    });
  }
  for (auto& th : pool) th.join();
  return bad.load();
}

int Run(const Options& o) {
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };

  auto t0 = Clock::now();
  std::shared_ptr<const Model> model = Model::Load(o.artifact, ember_example::ParseDevice(o.device));
  Session session(model);
  double load_ms = ms(Clock::now() - t0);
  const auto& m = model->manifest();

  for (const auto& kv : o.input_files) {
    bool known = std::any_of(m.inputs.begin(), m.inputs.end(), [&](const auto& s) { return s.name == kv.first; });
    if (!known) {
      std::string names;
      for (const auto& s : m.inputs) names += (names.empty() ? "" : ", ") + s.name;
      throw std::runtime_error("--input " + kv.first + ": this model has no input of that name (inputs: " + names + ")");
    }
  }
  // Inputs by name, in the order "main" takes them.
  std::mt19937_64 rng(o.seed);
  std::vector<NpyArray> host_inputs;
  for (const auto& s : m.inputs) {
    auto it = o.input_files.find(s.name);
    host_inputs.push_back(it != o.input_files.end() ? ember_example::LoadNpy(it->second)
                                                    : RandomInput(s, o.dims, rng));
  }
  model->CheckInputs(host_inputs);
  std::vector<tvm::ffi::Tensor> inputs = model->ToDevice(host_inputs);

  std::vector<tvm::ffi::Tensor> outputs = session.Run(inputs);
  session.Sync();
  if (!o.json) {
    std::cout << "artifact " << o.artifact << " (target " << m.target_name << ", " << m.param_names.size()
              << " weight tensors) loaded in " << load_ms << " ms\n";
    for (size_t i = 0; i < m.inputs.size(); ++i)
      std::cout << "input  " << m.inputs[i].name << ": " << host_inputs[i].dtype << ShapeStr(host_inputs[i].shape)
                << (o.input_files.count(m.inputs[i].name) ? " from " + o.input_files.at(m.inputs[i].name) : " random")
                << "\n";
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    NpyArray host = Model::ToHost(outputs[i]);
    std::string name = i < m.outputs.size() ? m.outputs[i].name : "output" + std::to_string(i);
    if (!o.json)
      std::cout << "output " << name << ": " << host.dtype << ShapeStr(host.shape) << " first values "
                << FirstValues(host, 6) << "\n";
    if (!o.output_dir.empty()) ember_example::SaveNpy(o.output_dir + "/" + name + ".npy", host);
  }

  if (o.threads > 0) {
    std::vector<NpyArray> expected;
    for (const auto& t : outputs) expected.push_back(Model::ToHost(t));
    int bad = CheckConcurrent(model, inputs, expected, o.threads, o.iterations);
    if (!o.json)
      std::cout << o.threads << " threads x " << o.iterations << " runs, one Session each over the shared Model: "
                << (bad ? std::to_string(bad) + " wrong results" : "all outputs equal the single-thread run") << "\n";
    if (bad) return 1;
  }

  for (int i = 0; i < o.warmup; ++i) session.Run(inputs);
  session.Sync();
  std::vector<double> times;
  auto start = Clock::now();
  // At least `repeat` runs and at least `min_seconds` (capped at 100x repeat), like CompiledModel.benchmark.
  while (static_cast<int>(times.size()) < o.repeat ||
         (ms(Clock::now() - start) < o.min_seconds * 1e3 && static_cast<int>(times.size()) < 100 * o.repeat)) {
    auto t = Clock::now();
    session.Run(inputs);
    session.Sync();
    times.push_back(ms(Clock::now() - t));
  }
  std::sort(times.begin(), times.end());
  size_t n = times.size();
  double median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
  double p90 = times[std::min(n - 1, static_cast<size_t>(0.9 * n))];
  // The CPU thread pool's size (TVM_NUM_THREADS, or the physical-core default Model::Load sets).
  auto num_threads = tvm::ffi::Function::GetGlobal("runtime.NumThreads");
  int cpu_threads = num_threads.has_value() ? (*num_threads)().cast<int>() : -1;
  if (o.json) {
    auto mem = ResidentMiB();
    std::printf("{\"median_ms\": %.6f, \"p90_ms\": %.6f, \"min_ms\": %.6f, \"runs\": %zu, \"load_ms\": %.3f, "
                "\"rss_mib\": %.1f, \"peak_rss_mib\": %.1f, \"cpu_threads\": %d}\n",
                median, p90, times[0], n, load_ms, mem.first, mem.second, cpu_threads);
  } else {
    std::printf("latency: median %.3f ms, p90 %.3f ms, min %.3f ms over %zu runs (%d CPU threads)\n", median, p90,
                times[0], n, cpu_threads);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(Parse(argc, argv));
  } catch (const tvm::ffi::Error& e) {
    // TVM errors carry a kind (ValueError, ...) and a message; their backtrace is noise for a user.
    std::cerr << "ember_run: error: TVM " << e.kind() << ": " << e.message() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "ember_run: error: " << e.what() << "\n";
  }
  return 1;
}
