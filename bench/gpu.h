// dsvm-bench gpu (issue #5): page migration between host memory and a GPU's
// HBM through the GPU tier (node/memory/device_tier.h: the tier table's
// steps, batched copies through pinned staging on two streams), against a
// raw copy of the same bytes through the same device backend (one
// cudaMemcpyAsync of the whole size from pinned memory, on the cuda
// backend), in the same run.
//
// Metrics (JSON lines; `<b>` is the backend, `<p>` the page size tag):
//   gpu.<b>.raw_h2d.gbps, gpu.<b>.raw_d2h.gbps          the floor
//   gpu.<b>.migrate_h2d<p>.gbps, .migrate_d2h<p>.gbps   through the tier
//   gpu.<b>.migrate_h2d<p>.vs_raw, .migrate_d2h<p>.vs_raw
// The target (#5): migration >= 85% of the raw copy for batches of 2 MiB
// and more. On the emulated backend (no GPU) both sides are host memcpy by
// copy threads: the ratio then measures the tier's own overhead only.
#ifndef DSVM_BENCH_GPU_H_
#define DSVM_BENCH_GPU_H_

#include <cstdint>
#include <string>

#include "proto/status.h"

namespace dsvm::bench {

struct GpuBenchOptions {
  // "cuda", "emulated", or "auto": cuda where a GPU answers, else emulated
  // (said on stderr).
  std::string backend = "auto";
  uint64_t bytes = uint64_t{256} << 20;  // moved each way per pass
  uint32_t page_size = 2u << 20;         // 4096, 65536 or 2097152
  int passes = 3;                        // timed passes; the best counts
};

// Errors: kInvalidArgument (options), kUnavailable (the backend asked for
// cannot run here), kInternal (a wrong byte after the round trip), and the
// tier's and backend's errors.
Status RunGpu(const GpuBenchOptions& options);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_GPU_H_
