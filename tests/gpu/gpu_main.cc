// main() of dsvm_gpu_tests (label gpu): runs the device backend suite on the
// cuda backend when a GPU is present, else prints "SKIP: no GPU: <reason>"
// and exits 0, which CTest reports as skipped (tests/gpu/CMakeLists.txt).
#include <gtest/gtest.h>

#include <cstdio>

#include "node/memory/device_backend.h"
#include "proto/status.h"

int main(int argc, char** argv) {
  {
    auto backend = dsvm::node::MakeDeviceBackend("cuda");
    if (!backend.ok()) {
      if (backend.status().code() == dsvm::StatusCode::kUnavailable) {
        std::printf("SKIP: no GPU: %s\n", backend.status().message().c_str());
        return 0;
      }
      std::fprintf(stderr, "dsvm_gpu_tests: %s\n", backend.status().ToString().c_str());
      return 1;
    }
    std::printf("dsvm_gpu_tests: cuda backend with %u device(s)\n", (*backend)->device_count());
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
