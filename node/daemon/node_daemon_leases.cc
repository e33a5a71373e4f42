#include "node/daemon/node_daemon.h"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>

#include "node/daemon/daemon_util.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

// Extra time a fence is given beyond its estimate (FenceLeadMs).
constexpr uint64_t kFenceSpareMs = 10;

// A fence that took at least this much measures the fence rate.
constexpr uint64_t kFenceRateSampleBytes = 16u << 20;

// The estimated time, with a quarter more and kFenceSpareMs, a fence of
// held_bytes takes.
uint64_t FenceNeedsMs(uint64_t held_bytes, uint64_t bytes_per_ms) {
  const uint64_t estimate = held_bytes / bytes_per_ms + 1;
  return estimate + estimate / 4 + kFenceSpareMs;
}

}  // namespace

uint64_t FenceLeadMs(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms) {
  DSVM_CHECK(bytes_per_ms > 0);
  const uint64_t needs = FenceNeedsMs(held_bytes, bytes_per_ms);
  const uint64_t after_lapse = lease_ms / 3 / 2;  // half the margin
  return needs <= after_lapse ? 0 : std::min(needs - after_lapse, lease_ms / 2);
}

bool FenceOutlastsMargin(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms) {
  DSVM_CHECK(bytes_per_ms > 0);
  return FenceNeedsMs(held_bytes, bytes_per_ms) > FenceLeadMs(held_bytes, bytes_per_ms, lease_ms) +
                                                       lease_ms / 3;
}

// ---------------------------------------------------------------------------
// Leases

std::optional<uint64_t> NodeDaemon::TakeHeartbeat(ShardLink& s, uint64_t rid) {
  auto it = std::find_if(s.heartbeats.begin(), s.heartbeats.end(),
                         [&](const auto& h) { return h.first == rid; });
  if (it == s.heartbeats.end()) return std::nullopt;
  const uint64_t sent_ms = it->second;
  s.heartbeats.erase(s.heartbeats.begin(), it + 1);
  return sent_ms;
}

bool NodeDaemon::LeaseLapsed(proto::PageAddr page) const {
  return NowMs() >= shards_[shard_map_.ShardOf(page)].lease_until_ms;
}

void NodeDaemon::RenewLease(size_t shard, uint64_t sent_ms) {
  ShardLink& s = shards_[shard];
  s.lease_until_ms = std::max(s.lease_until_ms, sent_ms + s.lease_ms);
  if (NowMs() >= s.lease_until_ms) return;
  // Accesses parked between the lapse and the fence wait too, fenced or not.
  if (!parked_.empty()) run_parked_ = true;
  // Pages an early fence took are mapped again at their next fault.
  s.fenced_early = false;
  if (!s.fenced) return;
  s.fenced = false;
  LogInfo("node " + std::to_string(id_) + ": the coordinator at " + s.address +
          " answers again: local processes use its pages again");
}

void NodeDaemon::UpdateHeldBytes() {
  // Every shard's pages together: all leases lapse at once when the node
  // is cut off (an over-estimate for one shard's lapse alone). A deleted
  // region kept for local mappings is not fenced.
  uint64_t held = 0;
  for (const auto& [base, store] : stores_) {
    if (deleted_mapped_.count(base) != 0) continue;
    Result<uint64_t> bytes = store->ResidentBytes();
    if (bytes.ok()) held += *bytes;  // an fstat that fails: that region counts as empty
  }
  held_bytes_ = held;
  // One shard's lease length stands for all: they come from one cluster's flags.
  const uint64_t lease_ms = shards_.empty() ? 0 : shards_[0].lease_ms;
  // Said again only when the node holds twice as much as when last said.
  if (lease_ms == 0 || held <= 2 * fence_warned_bytes_ ||
      !FenceOutlastsMargin(held, fence_bytes_per_ms_, lease_ms)) {
    return;
  }
  fence_warned_bytes_ = held;
  char text[320];
  std::snprintf(text, sizeof(text),
                "node %u holds %.1f MiB: at the %.3g MB/s a fence runs here it would not be over "
                "within the %llu ms the lease leaves after it lapses, even started %llu ms early; "
                "give the coordinator a longer --dead-after-ms",
                id_, static_cast<double>(held) / (1 << 20),
                static_cast<double>(fence_bytes_per_ms_) / 1000,
                static_cast<unsigned long long>(lease_ms / 3),
                static_cast<unsigned long long>(lease_ms / 2));
  LogWarning(text);
}

void NodeDaemon::NoteStall(uint64_t now) {
  const uint64_t gap = now - std::min(now, last_timer_ms_);
  last_timer_ms_ = now;
  // A loop held this long let a lease check, and a fence, come late by as
  // much (half the margin of the shortest lease).
  uint64_t lease_ms = 0;
  for (const ShardLink& s : shards_) {
    if (s.lease_ms != 0) lease_ms = lease_ms == 0 ? s.lease_ms : std::min(lease_ms, s.lease_ms);
  }
  if (lease_ms == 0 || gap <= lease_ms / 6) return;
  ++stats_.loop_stalls;
  stats_.longest_stall_ms = std::max(stats_.longest_stall_ms, gap);
  LogWarning("node " + std::to_string(id_) + ": the daemon's loop stood still for " +
             std::to_string(gap) + " ms, more than half the " + std::to_string(lease_ms / 3) +
             " ms a lease leaves for its fence: a lease that lapsed in that time was fenced up to that late");
}

uint64_t NodeDaemon::FenceLead(const ShardLink& s) const {
  return FenceLeadMs(held_bytes_, fence_bytes_per_ms_, s.lease_ms);
}

void NodeDaemon::CheckLeases() {
  for (size_t i = 0; i < shards_.size(); ++i) {
    ShardLink& s = shards_[i];
    if (s.fenced) continue;
    // Before the lapse, a node that holds more than it could fence after
    // it starts early (once); accesses go on meanwhile.
    const bool early = NowMs() < s.lease_until_ms;
    if (early && (s.fenced_early || NowMs() + FenceLead(s) < s.lease_until_ms)) continue;
    // A busy loop may not have read the answer that renews it yet.
    if (s.link.is_open()) OnCoordinatorReadable(i);
    if (s.fenced || (early && s.fenced_early)) continue;
    if (NowMs() >= s.lease_until_ms) {
      Fence(i, /*early=*/false);  // with an early fence before: the pages mapped since
    } else if (NowMs() + FenceLead(s) >= s.lease_until_ms) {
      Fence(i, /*early=*/true);
    }
  }
}

void NodeDaemon::Fence(size_t shard, bool early) {
  ShardLink& s = shards_[shard];
  if (early) {
    s.fenced_early = true;
    ++stats_.early_fences;
  } else {
    s.fenced = true;
    ++stats_.fences;
  }
  const uint64_t start_us = MonotonicUs();
  const uint64_t lapsed_ms = s.lease_until_ms;
  const uint64_t lead_ms = lapsed_ms - std::min(lapsed_ms, NowMs());  // an early fence's
  // Pages newly taken: a page a fence took before and nothing mapped since
  // costs the fence nothing, so it counts neither here nor in the rate.
  size_t taken = 0;
  uint64_t taken_bytes = 0;
  if (backend_) {  // without one, every access comes through AccessPage
    std::vector<proto::PageAddr> pages;
    for (proto::PageAddr p : agent_.AccessiblePages()) {
      if (shard_map_.ShardOf(p) == shard) pages.push_back(p);
    }
    std::sort(pages.begin(), pages.end());
    // Runs of neighbouring pages of one region go at once (UnmapRange): a
    // fence must be over within the lease's margin. Unmap is idempotent: a
    // page unmapped already stays so.
    for (size_t i = 0, j = 0; i < pages.size(); i = j) {
      PageStore* store = StoreOf(pages[i]);
      const uint64_t ps = store == nullptr ? 0 : store->page_size();
      for (j = i + 1; j < pages.size() && store != nullptr && pages[j] == pages[j - 1] + ps &&
                      StoreOf(pages[j]) == store;
           ++j) {
      }
      Status run = store == nullptr ? NotFound("no store") : backend_->UnmapRange(pages[i], j - i, ps);
      if (!run.ok()) {
        LogError("fence: taking pages from " + Hex(pages[i]) + " on from local processes: " +
                 run.ToString() + "; page by page");
        for (size_t k = i; k < j; ++k) {  // one by one, to name what fails
          Status st = backend_->Unmap(pages[k]);
          if (!st.ok()) {
            LogError("fence: taking page " + Hex(pages[k]) + " from local processes: " + st.ToString());
            continue;
          }
          if (fenced_pages_.insert(pages[k]).second) {
            ++taken;
            taken_bytes += ps;
          }
        }
        continue;
      }
      for (size_t k = i; k < j; ++k) {
        if (fenced_pages_.insert(pages[k]).second) {
          ++taken;
          taken_bytes += ps;
        }
      }
    }
  }
  const uint64_t took_us = MonotonicUs() - start_us;
  const uint64_t took_ms = took_us / 1000;
  if (options_.fence_bytes_per_ms == 0 && taken_bytes >= kFenceRateSampleBytes) {
    // What this machine does, for the next fence's lead (an early fence
    // measures it as well as a late one).
    fence_bytes_per_ms_ = std::max<uint64_t>(1, taken_bytes * 1000 / std::max<uint64_t>(took_us, 1));
  }
  if (early) {
    char held[32];
    std::snprintf(held, sizeof(held), "%.1f MiB", static_cast<double>(held_bytes_) / (1 << 20));
    LogWarning("node " + std::to_string(id_) + ": no answer from the coordinator at " + s.address +
               "; its lease lapses " + std::to_string(lead_ms) +
               " ms from the start of this fence, too late to fence the " + held +
               " this node holds after it: " + std::to_string(taken) +
               " pages were taken from local processes now (in " +
               std::to_string(took_ms) + " ms); they map them again until the lapse");
    return;
  }
  LogWarning("node " + std::to_string(id_) + ": no answer from the coordinator at " + s.address +
             " for " + std::to_string(s.lease_ms) + " ms: it may declare this node dead, so " +
             std::to_string(taken) + " pages were taken from local processes (in " +
             std::to_string(took_ms) + " ms), whose accesses wait until it answers");
  // The lease leaves a quarter of the deadline, a third of lease_ms, for
  // the fence: one over later than that after the lapse may have let
  // processes read pages the directory had handed on.
  const uint64_t late_ms = NowMs() - std::min(NowMs(), lapsed_ms);
  if (late_ms > s.lease_ms / 3) {
    LogError("node " + std::to_string(id_) + ": the fence was over " + std::to_string(late_ms) +
             " ms after the lease lapsed, more than the " + std::to_string(s.lease_ms / 3) +
             " ms the lease leaves for it; give the coordinator a longer --dead-after-ms "
             "for nodes that hold this much (or a loop held this long)");
  }
}

}  // namespace dsvm::node
