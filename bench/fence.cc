#include "bench/fence.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <sys/uio.h>
#include <climits>
#include <string>
#include <vector>

#include "bench/bench_output.h"
#include "node/memory/page_store.h"

namespace dsvm::bench {
namespace {

constexpr node::PageAddr kBase = 0x200000000000;

uint64_t Word(uint64_t page, uint64_t i) { return (page * 0x9e3779b97f4a7c15ull) ^ i; }

Status Fill(node::PageStore& s) {
  const uint32_t ps = s.page_size();
  std::vector<uint8_t> buf(ps);
  for (uint64_t p = 0; p < s.page_count(); ++p) {
    auto* w = reinterpret_cast<uint64_t*>(buf.data());
    for (uint64_t i = 0; i < ps / 8; ++i) w[i] = Word(p, i);
    DSVM_RETURN_IF_ERROR(s.WritePage(kBase + p * ps, buf));
  }
  return Status::Ok();
}

// Restores every page and checks its bytes.
Status RestoreAndCheck(node::PageStore& s) {
  const uint32_t ps = s.page_size();
  std::vector<uint8_t> buf(ps);
  for (uint64_t p = 0; p < s.page_count(); ++p) {
    const node::PageAddr page = kBase + p * ps;
    if (!s.IsRetained(page)) return DataLoss("page " + std::to_string(p) + " was not retained");
    DSVM_RETURN_IF_ERROR(s.Restore(page));
    DSVM_RETURN_IF_ERROR(s.ReadPage(page, buf));
    const auto* w = reinterpret_cast<const uint64_t*>(buf.data());
    for (uint64_t i = 0; i < ps / 8; ++i) {
      if (w[i] != Word(p, i)) {
        return DataLoss("page " + std::to_string(p) + " word " + std::to_string(i) + " changed");
      }
    }
  }
  return Status::Ok();
}

std::string Tag(uint32_t page_size) {
  return page_size == 4096 ? "page4k" : page_size == 65536 ? "page64k" : "page2m";
}

}  // namespace

Status RunFence(const FenceOptions& o) {
  if (o.page_size != 4096 && o.page_size != 65536 && o.page_size != 2097152) {
    return InvalidArgument("page size " + std::to_string(o.page_size) +
                           " is none of 4096, 65536 and 2097152");
  }
  if (o.bytes == 0 || o.bytes % o.page_size != 0) {
    return InvalidArgument(std::to_string(o.bytes) + " bytes are not a positive multiple of " +
                           std::to_string(o.page_size));
  }
  // A plain memfd, as a node without reserved hugetlb pages has.
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::PageStore> s,
                        node::PageStore::Create(kBase, o.bytes, o.page_size, {.try_hugetlb = false}));
  const uint64_t pages = s->page_count();
  double range_s = 1e30, each_s = 1e30, copy_s = 1e30;
  for (int round = 0; round < o.rounds; ++round) {
    DSVM_RETURN_IF_ERROR(Fill(*s));
    Clock::time_point t0 = Clock::now();
    DSVM_RETURN_IF_ERROR(s->RetainRange(kBase, pages));
    range_s = std::min(range_s, SecondsBetween(t0, Clock::now()));
    for (uint64_t p = 0; p < pages; p += 61) {  // moved, not copied: the memfd has holes
      DSVM_ASSIGN_OR_RETURN(const bool present, s->IsPresent(kBase + p * o.page_size));
      if (present) return DataLoss("page " + std::to_string(p) + " is still in the memfd");
    }
    DSVM_RETURN_IF_ERROR(RestoreAndCheck(*s));

    t0 = Clock::now();
    for (uint64_t p = 0; p < pages; ++p) DSVM_RETURN_IF_ERROR(s->Retain(kBase + p * o.page_size));
    each_s = std::min(each_s, SecondsBetween(t0, Clock::now()));
    DSVM_RETURN_IF_ERROR(RestoreAndCheck(*s));

    // The floor: the same bytes read into fresh buffers of a page each as
    // RetainRange reads them (one preadv per run of up to 16 MiB), without
    // the punch that makes it a move.
    std::vector<std::unique_ptr<uint8_t[]>> copies(pages);
    const uint64_t run_pages = std::max<uint64_t>(1, std::min<uint64_t>(IOV_MAX, (16u << 20) / o.page_size));
    t0 = Clock::now();
    for (uint64_t p = 0; p < pages; p += run_pages) {
      const uint64_t n = std::min(run_pages, pages - p);
      std::vector<iovec> iov(n);
      for (uint64_t k = 0; k < n; ++k) {
        copies[p + k].reset(new uint8_t[o.page_size]);
        iov[k] = {copies[p + k].get(), o.page_size};
      }
      const ssize_t got = ::preadv(s->fd(), iov.data(), static_cast<int>(n),
                                   static_cast<off_t>(p * o.page_size));
      if (got != static_cast<ssize_t>(n * o.page_size)) return IoError("preadv of the memfd");
    }
    copy_s = std::min(copy_s, SecondsBetween(t0, Clock::now()));
    for (uint64_t p = 0; p < pages; ++p) {
      const auto* w = reinterpret_cast<const uint64_t*>(copies[p].get());
      for (uint64_t i = 0; i < o.page_size / 8; ++i) {
        if (w[i] != Word(p, i)) return DataLoss("the floor's copy of page " + std::to_string(p) + " is wrong");
      }
    }
  }
  const std::string tag = Tag(o.page_size);
  const double gb = static_cast<double>(o.bytes) / 1e9;
  EmitMetric("fence.retain_range." + tag + ".gbps", gb / range_s, "GB/s");
  EmitMetric("fence.retain_each." + tag + ".gbps", gb / each_s, "GB/s");
  EmitMetric("fence.copy_floor." + tag + ".gbps", gb / copy_s, "GB/s");
  EmitMetric("fence.retain_range." + tag + ".vs_retain_each", each_s / range_s, "ratio");
  EmitMetric("fence.retain_range." + tag + ".vs_copy_floor", copy_s / range_s, "ratio");
  EmitMetric("fence.retain_range." + tag + ".ms_per_gib",
             range_s * 1e3 * static_cast<double>(uint64_t{1} << 30) / static_cast<double>(o.bytes),
             "ms");
  EmitMetric("fence." + tag + ".bytes", static_cast<double>(o.bytes), "bytes");
  return Status::Ok();
}

}  // namespace dsvm::bench
