// dsvm-bench gpu (issue #5): page migration between host memory and a GPU's
// HBM through the GPU tier (node/memory/device_tier.h: the tier table's
// steps, batched copies, direct or through pinned staging), against a
// raw copy of the same bytes through the same device backend (one
// cudaMemcpyAsync of the whole size from pinned memory, on the cuda
// backend), in the same run.
//
// Metrics (JSON lines; `<b>` is the backend, `<p>` the page size tag):
//   gpu.<b>.raw_h2d.gbps, gpu.<b>.raw_d2h.gbps          the floor
//   gpu.<b>.migrate_h2d<p>.gbps, .migrate_d2h<p>.gbps   through the tier
//   gpu.<b>.migrate_h2d<p>.vs_raw, .migrate_d2h<p>.vs_raw
//   gpu.<b>.copy_threads                                the tier's (--copy-threads)
//   gpu.<b>.migrate_h2d<p>.cold.gbps    the first pass alone (with direct
//                                       copies it pins the pages: registration)
//   gpu.<b>.migrate<p>.direct_share     pages that went direct, of all moved
// With --direct-copies both (the default) the tier runs twice, direct
// copies on (the names above) and off (the same with `.staged` after the
// page tag: gpu.<b>.migrate_h2d<p>.staged.gbps, ...), then
//   gpu.<b>.migrate_h2d<p>.direct_vs_staged, .migrate_d2h<p>.direct_vs_staged
// (ratios of GB/s). "on" or "off" runs the tier once that way, under the
// names above.
// The target (#5): migration >= 85% of the raw copy for batches of 2 MiB
// and more. On the emulated backend (no GPU) both sides are host memcpy by
// copy threads: the ratio then measures the tier's own overhead only.
//
// Then the oversubscribed workload (unless skipped): the embedding-bag
// gather of examples/embedding_bag.h over a table `oversub_factor` times a
// GPU budget, three ways on the same batches in the same run:
//   dsvm       a coordinator and one dsvm-node (--device-backend <b>
//              --gpu-budget) started here; this process is their client: the
//              table lives in a region and each batch maps the chunks it
//              needs with dsvm_gpu_map (read), gathers, and unmaps
//   dsvm_pipelined  the same, but while chunk j is gathered a second thread
//              places chunk j+1 with dsvm_gpu_prefetch (its copies overlap
//              the kernel; the map of j+1 then finds it in place)
//   zero_copy  the kernel reads the table straight from host memory
//              (cuda: cudaHostAlloc'd mapped memory; emulated: the plain table)
//   staging    a hand-written loop: each chunk cudaMemcpy'd (emulated:
//              memcpy'd) into one device buffer, then gathered
// Every batch's sums are checked bitwise against the CPU's. Metrics:
//   gpu.<b>.oversub.{table_bytes,budget_bytes,chunk_bytes}
//   gpu.<b>.oversub.{dsvm,zero_copy,staging}.ms_per_batch   best pass
//   gpu.<b>.oversub.speedup_vs_zero_copy   zero_copy / dsvm time (target >= 2)
//   gpu.<b>.oversub.time_vs_staging        dsvm / staging time (target <= 1.25)
//   gpu.<b>.oversub.dsvm_pipelined.ms_per_batch, .pipelined.speedup_vs_zero_copy,
//   .pipelined.time_vs_staging             the same for dsvm_pipelined
// On the emulated backend the "device" is host memory and the kernel a CPU
// loop: zero-copy then reads only the rows it needs while dsvm copies whole
// chunks, so these figures measure dsvm's overhead, not a GPU (said on
// stderr).
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
  // The tier's copy threads (DeviceTierOptions::copy_threads), here and in
  // the daemon of the oversubscribed part; 0: DefaultCopyThreads().
  uint32_t copy_threads = 0;
  // DeviceTierOptions::direct_copies for the migration: "on", "off" or
  // "both" (one run each way); the oversubscribed part's daemon runs with
  // them unless "off".
  std::string direct_copies = "both";

  bool migration = true;  // the migration part (--skip-migration: false)
  // The oversubscribed workload.
  bool oversub = true;
  uint64_t gpu_budget = uint64_t{256} << 20;  // the daemon's --gpu-budget
  uint32_t oversub_factor = 3;                // table bytes / budget (>= 2)
  uint64_t chunk_bytes = uint64_t{64} << 20;  // per dsvm_gpu_map / staging copy
  uint32_t region_page_size = 2u << 20;
  uint32_t dim = 128;  // floats per row
  uint32_t batches = 4;
  // Lookups per batch: bags * bag_size rows. Their bytes over the table's
  // (the "reuse" metric) decide the oversubscribed race: zero-copy reads
  // just the rows looked up, dsvm moves every chunk a batch needs once and
  // reads it in HBM; below a reuse of about 1 zero-copy moves fewer bytes.
  uint32_t bags = 8192;
  uint32_t bag_size = 64;
  std::string node_binary;         // empty: ../node/dsvm-node beside the bench
  std::string coordinator_binary;  // empty: ../coordinator/dsvm-coordinator
};

// Errors: kInvalidArgument (options), kUnavailable (the backend asked for
// cannot run here), kInternal (a wrong byte after the round trip, a wrong
// sum), kNotFound (the daemon's binaries, for the oversubscribed part), and
// the tier's, backend's and dsvm calls' errors. The oversubscribed part is
// skipped, with a note, where userfaultfd cannot be used.
Status RunGpu(const GpuBenchOptions& options);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_GPU_H_
