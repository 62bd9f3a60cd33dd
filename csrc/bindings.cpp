// The only file that knows pybind11. Arguments are plain integers (pointers, strides, dtype
// codes, a cudaStream_t handle), so one build serves any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "host_reader.h"
#include "pyloader/job_table.h"

namespace py = pybind11;
using namespace pyloader;

namespace {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller, just none
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyloader CUDA kernels (raw pointers in, no torch types)";
  m.attr("cuda_built") = true;
  m.attr("job_fields") = static_cast<int>(kJobFields);
  m.attr("max_jobs_per_launch") = kMaxJobsPerLaunch;
  m.attr("quant_fields") = static_cast<int>(kQuantFields);
  m.attr("max_quant_jobs_per_launch") = kMaxQuantJobs;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices (0 without a driver or device).");
  m.def(
      "multi_tensor_transform",
      [](uintptr_t packed_jobs, int64_t num_jobs, uintptr_t stream) {
        if (num_jobs < 0) throw std::invalid_argument("multi_tensor_transform: negative job count");
        if (num_jobs > 0 && packed_jobs == 0) throw std::invalid_argument("multi_tensor_transform: null job table");
        const int64_t* jobs = reinterpret_cast<const int64_t*>(packed_jobs);
        cudaError_t err;
        {
          py::gil_scoped_release release;
          err = launch_multi_tensor_transform(jobs, num_jobs, reinterpret_cast<cudaStream_t>(stream));
        }
        PYLOADER_CUDA_CHECK(err);
      },
      py::arg("packed_jobs"), py::arg("num_jobs"), py::arg("stream"),
      "Run num_jobs packed int64 job rows (job_fields values each) on the stream.");
  m.def(
      "multi_tensor_quantize",
      [](uintptr_t packed_jobs, int64_t num_jobs, uintptr_t stream) {
        if (num_jobs < 0) throw std::invalid_argument("multi_tensor_quantize: negative job count");
        if (num_jobs > 0 && packed_jobs == 0) throw std::invalid_argument("multi_tensor_quantize: null job table");
        const int64_t* jobs = reinterpret_cast<const int64_t*>(packed_jobs);
        cudaError_t err;
        {
          py::gil_scoped_release release;
          err = launch_multi_tensor_quantize(jobs, num_jobs, reinterpret_cast<cudaStream_t>(stream));
        }
        PYLOADER_CUDA_CHECK(err);
      },
      py::arg("packed_jobs"), py::arg("num_jobs"), py::arg("stream"),
      "Quantize num_jobs packed int64 job rows (quant_fields values each) blockwise to FP8 on the stream.");
  py::class_<HostReader>(m, "HostReader",
                         "A reader thread's ring of pinned buffers: file byte ranges to the device, a buffer at a time.")
      .def(py::init<int, std::vector<uintptr_t>, int64_t>(), py::arg("device"), py::arg("buffers"),
           py::arg("buffer_bytes"), "buffers: addresses of pinned host buffers of buffer_bytes (at least 16 KiB) each")
      .def(
          "read_to_device",
          [](HostReader& r, int fd, int64_t offset, int64_t nbytes, uintptr_t dst, uintptr_t stream,
             uintptr_t wait_before_copy, bool direct) {
            py::gil_scoped_release release;
            r.read_to_device(fd, offset, nbytes, reinterpret_cast<void*>(dst), reinterpret_cast<cudaStream_t>(stream),
                             reinterpret_cast<cudaEvent_t>(wait_before_copy), direct);
          },
          py::arg("fd"), py::arg("offset"), py::arg("nbytes"), py::arg("dst"), py::arg("stream"),
          py::arg("wait_before_copy"), py::arg("direct"),
          "Copy file[offset:offset + nbytes] (descriptor fd) to the device pointer dst on the stream; "
          "ValueError for a failed or short read, RuntimeError for a CUDA error.")
      .def(
          "read_ranges_to_device",
          [](HostReader& r, std::vector<int> fds, std::vector<int64_t> offsets, std::vector<int64_t> sizes,
             std::vector<int64_t> dst_offsets, uintptr_t dst, uintptr_t stream) {
            py::gil_scoped_release release;
            r.read_ranges_to_device(fds, offsets, sizes, dst_offsets, reinterpret_cast<void*>(dst),
                                    reinterpret_cast<cudaStream_t>(stream));
          },
          py::arg("fds"), py::arg("offsets"), py::arg("sizes"), py::arg("dst_offsets"), py::arg("dst"), py::arg("stream"),
          "Copy many small ranges (fds[i], offsets[i], sizes[i]) to dst + dst_offsets[i] (ascending) on the stream, "
          "packed into few copies; the bytes between destinations are overwritten. ValueError for a failed or short read.")
      .def(
          "synchronize",
          [](HostReader& r) {
            py::gil_scoped_release release;
            r.synchronize();
          },
          "Wait until no copy reads the buffers.")
      .def_property_readonly("buffers", &HostReader::buffers)
      .def_property_readonly("buffer_bytes", &HostReader::buffer_bytes);
}
