#include "coordinator/service/coordinator_service.h"

#include <algorithm>
#include <unordered_set>
#include <cstdio>
#include <utility>

#include "proto/auth.h"
#include "proto/log.h"

namespace dsvm::coordinator {

CoordinatorService::CoordinatorService(std::unique_ptr<Store> store, const ServiceOptions& options)
    : store_(std::move(store)),
      options_(options),
      shard_map_(options.shard_count),
      regions_(options.window),
      directory_(DirectoryOptions{options.retransmit_after_ms, 4096}) {}

Result<std::unique_ptr<CoordinatorService>> CoordinatorService::Create(
    std::unique_ptr<Store> store, const ServiceOptions& options, uint64_t now_ms) {
  if (options.shard_count == 0 || options.shard >= options.shard_count) {
    return InvalidArgument("shard " + std::to_string(options.shard) + " not below shard count " +
                           std::to_string(options.shard_count));
  }
  std::unique_ptr<CoordinatorService> s(new CoordinatorService(std::move(store), options));
  DSVM_RETURN_IF_ERROR(s->Load(now_ms));
  return s;
}

Status CoordinatorService::Load(uint64_t now_ms) {
  DSVM_ASSIGN_OR_RETURN(meta_, store_->LoadMeta());
  DSVM_ASSIGN_OR_RETURN(std::vector<RegionRecord> regions, store_->LoadRegions());
  for (const RegionRecord& r : regions) {
    Status st = regions_.Insert(r);
    if (!st.ok()) return Corruption("stored region table: " + st.message());
  }
  DSVM_ASSIGN_OR_RETURN(std::vector<NodeRecord> nodes, store_->LoadNodes());
  for (const NodeRecord& n : nodes) {
    if (n.id == proto::kNoNode) return Corruption("stored node with id 0");
    // Nodes live at the crash get a full heartbeat period to reconnect.
    members_[n.id] = Member{n, now_ms + options_.dead_after_ms, 0, {}};
    if (n.live) directory_.NodeUp(n.id);
  }
  uint64_t pages = 0;
  std::vector<proto::PageAddr> orphans;
  DSVM_RETURN_IF_ERROR(store_->LoadDirectory([&](const PageRecord& r) {
    if (regions_.FindByAddress(r.page) == nullptr) {
      orphans.push_back(r.page);  // left by a crash inside a region delete
      return Status::Ok();
    }
    directory_.Restore(r);
    ++pages;
    return Status::Ok();
  }));
  for (proto::PageAddr page : orphans) {
    DSVM_RETURN_IF_ERROR(store_->DeleteDirectoryRange(page, page + 1));
  }
  if (!orphans.empty()) {
    LogInfo("dropped " + std::to_string(orphans.size()) + " directory records of deleted regions");
  }
  // A node stored dead but still named by the directory: the process
  // stopped after persisting the death and before flushing the hand-over
  // of its pages (DeclareDead). Finish it; the records go out with the
  // first Flush, the messages by retransmission once the nodes are back.
  for (NodeId n : directory_.NodesNamed()) {
    auto m = members_.find(n);
    if (m != members_.end() && m->second.record.live) continue;
    LogWarning("node " + std::to_string(n) + " was declared dead before the last stop; " +
               "handing its pages on now");
    directory_.NodeDown(n, &outbox_);
  }
  outbox_.clear();  // no node is connected yet
  Status inv = directory_.CheckInvariants();
  if (!inv.ok()) return Corruption("stored directory is inconsistent: " + inv.message());
  LogInfo("loaded epoch " + std::to_string(store_->epoch()) + ": " + std::to_string(regions.size()) +
          " regions, " + std::to_string(nodes.size()) + " nodes, " + std::to_string(pages) +
          " directory pages (" + std::to_string(directory_.busy_count()) + " in flight)");
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Dispatch

Status CoordinatorService::OnFrame(ConnId conn, const proto::Frame& frame, uint64_t now_ms) {
  ++stats_.frames;
  const uint64_t rid = frame.header.request_id;
  Status st = std::visit(
      [&](const auto& m) -> Status {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, proto::JoinRequest>) {
          return HandleJoin(conn, rid, m, now_ms);
        } else if constexpr (std::is_same_v<T, proto::Heartbeat>) {
          return HandleHeartbeat(conn, rid, m, now_ms);
        } else if constexpr (std::is_same_v<T, proto::LeaveRequest>) {
          return HandleLeave(conn, rid, m);
        } else if constexpr (std::is_same_v<T, proto::RegionCreate> ||
                             std::is_same_v<T, proto::RegionOpen> ||
                             std::is_same_v<T, proto::RegionDelete>) {
          if (region_follower()) {
            ReplyStatus(conn, rid, NotTheRegionAuthority(proto::TypeName(T::kType)));
          } else if constexpr (std::is_same_v<T, proto::RegionCreate>) {
            HandleRegionCreate(conn, rid, m);
          } else if constexpr (std::is_same_v<T, proto::RegionOpen>) {
            HandleRegionOpen(conn, rid, m);
          } else {
            HandleRegionDelete(conn, rid, m);
          }
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::RegionWatch>) {
          HandleRegionWatch(conn, rid);
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::PageQuery>) {
          Status valid = CheckPage(m.page);  // a tool's mistake: answer, keep the connection
          if (!valid.ok()) {
            ReplyStatus(conn, rid, valid);
          } else {
            Reply(conn, rid, directory_.Query(m.page));
          }
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::NodeList>) {
          proto::NodeListReply r;
          for (auto it = members_.upper_bound(m.start_after); it != members_.end(); ++it) {
            if (r.nodes.size() == proto::kMaxListEntries) {
              r.more = 1;
              break;
            }
            const NodeRecord& n = it->second.record;
            r.nodes.push_back(proto::NodeEntry{n.id, n.live, n.address, n.host_memory_bytes,
                                               n.gpu_count, it->second.counters});
          }
          Reply(conn, rid, std::move(r));
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::RegionPages>) {
          const RegionRecord* r = regions_.FindByName(m.name);
          if (r == nullptr) {
            ReplyStatus(conn, rid, NotFound("no region '" + m.name + "'"));
            return Status::Ok();
          }
          proto::RegionPagesReply reply = directory_.Summarize(r->base, r->base + r->size);
          reply.region = r->id;
          reply.pages = r->size / r->page_size;
          Reply(conn, rid, std::move(reply));
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::RegionList>) {
          std::vector<RegionRecord> all = regions_.List();
          std::sort(all.begin(), all.end(),
                    [](const RegionRecord& a, const RegionRecord& b) { return a.id < b.id; });
          proto::RegionListReply r;
          for (const RegionRecord& g : all) {
            if (g.id <= m.start_after) continue;
            if (r.regions.size() == proto::kMaxListEntries) {
              r.more = 1;
              break;
            }
            r.regions.push_back(proto::RegionReply{g.id, g.base, g.size, g.page_size, g.name});
          }
          Reply(conn, rid, std::move(r));
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::Acquire>) {
          DSVM_RETURN_IF_ERROR(CheckSender(conn, m.node));
          const RegionRecord* region = regions_.FindByAddress(m.page);
          switch (MatchRegion(m, region)) {
            case RegionMatch::kServe:
              break;
            case RegionMatch::kWait:
              LogLine(LogLevel::kDebug, "Acquire of node " + std::to_string(m.node) + " for page " +
                                            std::to_string(m.page) + " of region " +
                                            std::to_string(m.region) +
                                            ", not heard of here yet: dropped");
              return Status::Ok();
            case RegionMatch::kGone:
              // Its region was deleted while the node still maps it: the
              // access fails there, and the node keeps its connection.
              RefuseGone(conn, m);
              return Status::Ok();
          }
          DSVM_RETURN_IF_ERROR(CheckPageOf(*region, m.page));
          directory_.HandleAcquire(m, now_ms, &outbox_);
          Route(outbox_);
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::InvalidateAck>) {
          DSVM_RETURN_IF_ERROR(CheckSender(conn, m.node));
          if (regions_.FindByAddress(m.page) == nullptr) return Status::Ok();  // deleted meanwhile
          DSVM_RETURN_IF_ERROR(CheckPage(m.page));
          directory_.HandleInvalidateAck(m, now_ms, &outbox_);
          Route(outbox_);
          return Status::Ok();
        } else if constexpr (std::is_same_v<T, proto::Done>) {
          DSVM_RETURN_IF_ERROR(CheckSender(conn, m.node));
          if (regions_.FindByAddress(m.page) == nullptr) return Status::Ok();  // deleted meanwhile
          DSVM_RETURN_IF_ERROR(CheckPage(m.page));
          directory_.HandleDone(m, now_ms, &outbox_);
          Route(outbox_);
          return Status::Ok();
        } else {
          return InvalidArgument(std::string(proto::TypeName(T::kType)) +
                                 " is not a message a coordinator accepts");
        }
      },
      frame.message);
  if (!st.ok()) {
    ++stats_.refused;
    ReplyStatus(conn, rid, st);
  }
  return st;
}

void CoordinatorService::OnDisconnect(ConnId conn) {
  watchers_.erase(conn);
  refused_join_.erase(conn);
  auto it = conn_node_.find(conn);
  if (it == conn_node_.end()) return;
  // The node stays a member until its heartbeats stop: it may reconnect.
  auto nc = node_conn_.find(it->second);
  if (nc != node_conn_.end() && nc->second == conn) node_conn_.erase(nc);
  conn_node_.erase(it);
}

void CoordinatorService::OnTick(uint64_t now_ms) {
  // A tick more than kStallTicks periods late means this process stood
  // still (stopped, paused, starved): a node whose heartbeats wait unread
  // in its socket is not silent. Each live node gets a heartbeat interval
  // from now, in which they are read (right after this tick), and no more:
  // one whose heartbeats were read first keeps the deadline they gave, and
  // one that stays silent is declared dead an interval after the stall.
  // For the same reason a node's connection is not quiet yet: a join for
  // its id from another connection is refused for kLiveBeats intervals
  // (CheckNotLiveElsewhere), however long the stall was.
  if (last_tick_ms_ != 0 && now_ms - last_tick_ms_ > kStallTicks * options_.tick_ms) {
    for (auto& [id, m] : members_) {
      if (m.record.live) {
        m.deadline_ms = std::max(m.deadline_ms, now_ms + options_.heartbeat_interval_ms);
        m.last_beat_ms = std::max(m.last_beat_ms, now_ms);
      }
    }
    LogWarning("the coordinator stood still for " + std::to_string(now_ms - last_tick_ms_) +
               " ms; every live node has a heartbeat interval from now to be heard");
  }
  last_tick_ms_ = now_ms;
  std::vector<proto::NodeId> dead;
  for (const auto& [id, m] : members_) {
    if (m.record.live && m.deadline_ms < now_ms) dead.push_back(id);
  }
  for (proto::NodeId id : dead) DeclareDead(id, "missed its heartbeats");
  directory_.Tick(now_ms, &outbox_);
  Route(outbox_);
}

Status CoordinatorService::Flush(std::vector<Send>* sends) {
  // Answers that wait for nothing unwritten leave even while the disk fails.
  for (Send& s : unheld_) sends->push_back(std::move(s));
  unheld_.clear();
  // A dead node's record goes before the directory records and messages of
  // the hand-over of its pages (DeclareDead).
  while (!deaths_unpersisted_.empty()) {
    const proto::NodeId node = *deaths_unpersisted_.begin();
    auto it = members_.find(node);
    DSVM_CHECK(it != members_.end() && !it->second.record.live);
    Status st = store_->PutNode(it->second.record);
    if (!st.ok()) {  // hold everything; the next Flush retries
      DropHeldRetransmissions();
      return st;
    }
    LogInfo("node " + std::to_string(node) + " is stored dead now; its pages are handed on");
    deaths_unpersisted_.erase(deaths_unpersisted_.begin());
  }
  const size_t left_over = unpersisted_.size();  // from a Flush that failed
  directory_.TakeDirty(&unpersisted_);
  if (left_over != 0) {
    // Only each page's newest record: while the disk fails, what waits is
    // bounded by the pages touched, not by how often they changed.
    std::unordered_set<proto::PageAddr> seen;
    std::vector<PageRecord> newest;
    for (auto it = unpersisted_.rbegin(); it != unpersisted_.rend(); ++it) {
      if (seen.insert(it->page).second) newest.push_back(std::move(*it));
    }
    std::reverse(newest.begin(), newest.end());
    unpersisted_ = std::move(newest);
  }
  if (!unpersisted_.empty()) {
    Status st = store_->WriteDirectory(unpersisted_);
    if (!st.ok()) {  // hold everything; the next Flush retries
      DropHeldRetransmissions();
      return st;
    }
    stats_.records_written += unpersisted_.size();
    unpersisted_.clear();
  }
  ++stats_.flushes;
  for (Send& s : held_) sends->push_back(std::move(s));
  held_.clear();
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Helpers

void CoordinatorService::Reply(ConnId conn, uint64_t request_id, proto::Message m) {
  held_.push_back(Send{conn, request_id, std::move(m)});
}

void CoordinatorService::ReplyStatus(ConnId conn, uint64_t request_id, const Status& s) {
  Reply(conn, request_id, proto::ToReply(s));
}

void CoordinatorService::Route(Outbox& out) {
  for (Outgoing& o : out) {
    auto it = node_conn_.find(o.to);
    // A node without a connection gets the message by retransmission once
    // it is back (or by its own resend after reconnecting).
    if (it != node_conn_.end()) held_.push_back(Send{it->second, 0, std::move(o.message)});
  }
  out.clear();
}

void CoordinatorService::DropHeldRetransmissions() {
  // Keyed by the connection and the message's bytes; the first of equal
  // ones is kept, so what is left keeps its order.
  std::unordered_set<std::string> seen;
  size_t kept = 0;
  for (size_t i = 0; i < held_.size(); ++i) {
    if (held_[i].request_id == 0) {
      const std::vector<uint8_t> bytes = proto::Encode(held_[i].message, 0);
      std::string key(reinterpret_cast<const char*>(&held_[i].conn), sizeof(ConnId));
      key.append(bytes.begin(), bytes.end());
      if (!seen.insert(std::move(key)).second) continue;
    }
    if (kept != i) held_[kept] = std::move(held_[i]);
    ++kept;
  }
  held_.resize(kept);
}

Status CoordinatorService::CheckSender(ConnId conn, proto::NodeId claimed) const {
  auto it = conn_node_.find(conn);
  if (it == conn_node_.end()) return PermissionDenied("directory request before JoinRequest");
  if (it->second != claimed) {
    return PermissionDenied("connection of node " + std::to_string(it->second) +
                            " sent a message as node " + std::to_string(claimed));
  }
  return Status::Ok();
}

void CoordinatorService::RefuseGone(ConnId conn, const proto::Acquire& m) {
  if (m.kind == proto::AccessKind::kEvict || m.kind == proto::AccessKind::kWriteback) {
    // Giving up a copy of a deleted page: done, drop it.
    Reply(conn, 0, proto::EvictReply{m.page, m.request_seq, 0, m.last_txn});
    return;
  }
  proto::Grant g;
  g.page = m.page;
  g.txn = m.last_txn;
  g.request_seq = m.request_seq;
  g.state = proto::PageState::kInvalid;
  g.source = proto::DataSource::kZero;
  g.status = static_cast<uint16_t>(StatusCode::kNotFound);
  Reply(conn, 0, g);
}

CoordinatorService::RegionMatch CoordinatorService::MatchRegion(const proto::Acquire& m,
                                                                const RegionRecord* r) const {
  if (r != nullptr && r->id == m.region) return RegionMatch::kServe;
  // Shard 0 decides every region: the node's is not at that address any
  // more (or never was), whatever holds the address now.
  if (!region_follower()) return RegionMatch::kGone;
  // Giving up a copy is answered at once: this shard granted no page of a
  // region it has not heard of.
  if (m.kind == proto::AccessKind::kEvict || m.kind == proto::AccessKind::kWriteback) {
    return RegionMatch::kGone;
  }
  // Ids only grow, and a region's addresses hold no other region while it
  // lives: a newer region there means the node's was deleted.
  if (r != nullptr && r->id > m.region) return RegionMatch::kGone;
  if (std::find(recent_deletes_.begin(), recent_deletes_.end(), m.region) !=
      recent_deletes_.end()) {
    return RegionMatch::kGone;
  }
  // Synced, this shard has applied every region shard 0 gave an id below
  // next_region_heard_ and its delete if it had one: the node's is deleted
  // (or did not fit here, which was logged). Otherwise it may not have
  // arrived yet; the node resends.
  if (synced_ && m.region < next_region_heard_) return RegionMatch::kGone;
  return RegionMatch::kWait;
}

Status CoordinatorService::NotTheRegionAuthority(const char* request) const {
  return FailedPrecondition("regions are managed by shard 0 at " + options_.region_authority +
                            ", not by this shard (" + std::to_string(options_.shard) + "); send " +
                            request + " there");
}

Status CoordinatorService::CheckPage(proto::PageAddr page) const {
  const RegionRecord* r = regions_.FindByAddress(page);
  if (r == nullptr) return NotFound("page address in no region");
  return CheckPageOf(*r, page);
}

Status CoordinatorService::CheckPageOf(const RegionRecord& region, proto::PageAddr page) const {
  if ((page - region.base) % region.page_size != 0) {
    return InvalidArgument("page address not aligned to region '" + region.name + "' page size");
  }
  if (shard_map_.ShardOf(page) != options_.shard) {
    return InvalidArgument("page belongs to shard " + std::to_string(shard_map_.ShardOf(page)) +
                           ", not this one (" + std::to_string(options_.shard) + ")");
  }
  // Node daemons are trusted with every page (they hold the cluster secret);
  // a region's access rules are enforced on the processes, at RegionOpen.
  return Status::Ok();
}

void CoordinatorService::DeclareDead(proto::NodeId node, const std::string& why) {
  auto it = members_.find(node);
  if (it == members_.end() || !it->second.record.live) return;
  ++stats_.nodes_declared_dead;
  it->second.record.live = 0;
  // Stored live with its pages handed on, the node would be taken back by
  // a restarted coordinator with the stale copies it resumes with. So until
  // its record says dead, the hand-over is held: Flush writes the record
  // first, and neither the hand-over's directory records nor its messages
  // leave before it is durable. Held, a crash before then leaves the
  // node's pages where they were, and the node may resume.
  Status st = store_->PutNode(it->second.record);
  if (!st.ok()) {
    LogError("persisting node " + std::to_string(node) + " as dead: " + st.ToString() +
             "; the hand-over of its pages waits until it is stored");
    deaths_unpersisted_.insert(node);
  }
  LogWarning("node " + std::to_string(node) + " " + why + ": declared dead");
  directory_.NodeDown(node, &outbox_);
  Route(outbox_);
  auto nc = node_conn_.find(node);
  if (nc != node_conn_.end()) {
    conn_node_.erase(nc->second);
    node_conn_.erase(nc);
  }
}

// ---------------------------------------------------------------------------
// Membership

Status CoordinatorService::HandleJoin(ConnId conn, uint64_t rid, const proto::JoinRequest& m,
                                      uint64_t now_ms) {
  if (m.address.empty()) return InvalidArgument("JoinRequest without an address");
  auto bound = conn_node_.find(conn);
  if (bound != conn_node_.end() && bound->second != m.node) {
    return PermissionDenied("connection already joined as node " + std::to_string(bound->second));
  }
  if (Status live = CheckNotLiveElsewhere(conn, m, now_ms); !live.ok()) {
    ReplyStatus(conn, rid, live);
    return Status::Ok();
  }
  proto::NodeId id = m.node;
  auto member = members_.find(id);
  if (member == members_.end() || !member->second.record.live) {
    // One more live node: the directory bounds its per-page queues and
    // records by kMaxNodes.
    size_t live = 0;
    for (const auto& [n, mb] : members_) live += mb.record.live != 0;
    if (live >= kMaxNodes) {
      ReplyStatus(conn, rid, ResourceExhausted("the cluster has " + std::to_string(live) +
                                               " live nodes, the most one directory serves"));
      return Status::Ok();
    }
  }
  if (id == proto::kNoNode && region_follower()) {
    ReplyStatus(conn, rid, FailedPrecondition("shard " + std::to_string(options_.shard) +
                                              " assigns no node ids: join shard 0 first for an id "
                                              "(at " + options_.region_authority + ")"));
    return Status::Ok();
  } else if (id == proto::kNoNode) {
    Meta next = meta_;
    id = static_cast<proto::NodeId>(next.next_node_id++);
    if (next.next_node_id > UINT32_MAX) {
      ReplyStatus(conn, rid, ResourceExhausted("node ids exhausted"));
      return Status::Ok();
    }
    Status st = store_->PutMeta(next);
    if (!st.ok()) {
      ReplyStatus(conn, rid, st);
      return Status::Ok();
    }
    meta_ = next;
  } else if (!members_.count(id)) {
    if (!region_follower()) {
      ReplyStatus(conn, rid, NotFound("node " + std::to_string(id) + " was never a member"));
      return Status::Ok();
    }
    // Shard 0 assigned the id. The node holds no page of this shard yet, so
    // it is a new member here whether or not it resumes.
  } else if (m.resume && !members_[id].record.live) {
    // Its pages were handed on when it was declared dead; what it still
    // holds is stale. It must start afresh.
    ReplyStatus(conn, rid, FailedPrecondition("node " + std::to_string(id) +
                                              " was declared dead; join as a new daemon"));
    return Status::Ok();
  } else if (!m.resume && members_[id].record.live) {
    DeclareDead(id, "restarted");  // a new process: the old one's pages are gone
  }
  NodeRecord rec;
  rec.id = id;
  rec.address = m.address;
  rec.host_memory_bytes = m.host_memory_bytes;
  rec.gpu_count = m.gpu_count;
  rec.transport_address = m.transport_address;
  rec.live = 1;
  Status st = store_->PutNode(rec);
  if (!st.ok()) {
    ReplyStatus(conn, rid, st);
    return Status::Ok();
  }
  // A death not stored yet is overtaken: the record now says live, for this
  // new process, which holds none of the old one's pages.
  deaths_unpersisted_.erase(id);
  members_[id] = Member{rec, now_ms + options_.dead_after_ms, now_ms, {}};
  auto old = node_conn_.find(id);
  if (old != node_conn_.end() && old->second != conn) conn_node_.erase(old->second);
  node_conn_[id] = conn;
  conn_node_[conn] = id;
  refused_join_.erase(conn);
  directory_.NodeUp(id);
  LogInfo("node " + std::to_string(id) + " joined from " + m.address);

  proto::JoinReply r;
  r.node = id;
  r.heartbeat_interval_ms = options_.heartbeat_interval_ms;
  r.dead_after_ms = options_.dead_after_ms;
  r.shard = options_.shard;
  r.shard_count = options_.shard_count;
  r.window_base = options_.window.base;
  r.window_size = options_.window.size;
  Reply(conn, rid, r);
  return Status::Ok();
}

Status CoordinatorService::CheckNotLiveElsewhere(ConnId conn, const proto::JoinRequest& m,
                                                 uint64_t now_ms) {
  if (m.node == proto::kNoNode) return Status::Ok();
  auto member = members_.find(m.node);
  auto bound = node_conn_.find(m.node);
  if (member == members_.end() || !member->second.record.live || bound == node_conn_.end() ||
      bound->second == conn) {
    return Status::Ok();  // unknown, dead, unbound (its connection closed), or this connection
  }
  // The bound connection is open. A resume (the same daemon, reconnected
  // before this coordinator saw its old connection close) takes it over
  // once it has been quiet for kLiveBeats intervals. A new daemon would
  // declare the node dead: it waits until the coordinator does so itself
  // (dead_after_ms without a heartbeat) or the connection closes, so that
  // a live daemon whose loop stood still for a while is not killed.
  const uint64_t last = member->second.last_beat_ms;
  const uint64_t quiet_ms = now_ms > last ? now_ms - last : 0;
  if (m.resume && quiet_ms > kLiveBeats * options_.heartbeat_interval_ms) {
    LogInfo("node " + std::to_string(m.node) + "'s connection has been quiet for " +
            std::to_string(quiet_ms) + " ms: its resume from another connection takes its place");
    return Status::Ok();
  }
  Status refused = Unavailable(
      "node " + std::to_string(m.node) + " is live on another connection (last heartbeat " +
      std::to_string(quiet_ms) + " ms ago); retry once " +
      (m.resume ? "it has gone quiet" : "it has closed or the node is declared dead"));
  auto [it, first] = refused_join_.try_emplace(conn, m.node);
  if (first || it->second != m.node) {
    it->second = m.node;
    LogWarning("refused a join as node " + std::to_string(m.node) + " (peer address " + m.address +
               ", resume " + std::to_string(m.resume) + "): " + refused.message());
  }
  return refused;
}

Status CoordinatorService::HandleHeartbeat(ConnId conn, uint64_t rid, const proto::Heartbeat& m,
                                           uint64_t now_ms) {
  DSVM_RETURN_IF_ERROR(CheckSender(conn, m.node));
  auto it = members_.find(m.node);
  // The answer says whether this coordinator counts the node live now,
  // which no unwritten record changes (a death not stored yet holds its
  // hand-over, not its news): it leaves at once, so that a disk that fails
  // for a while does not let every node's lease lapse. (A node declared
  // dead is unbound from its connection, so CheckSender refuses it first;
  // this is the defensive case.)
  if (it == members_.end() || !it->second.record.live) {
    // Declared dead meanwhile: it must join again and learn what it lost.
    unheld_.push_back(Send{conn, rid, proto::ToReply(FailedPrecondition(
                                          "node " + std::to_string(m.node) + " is not live"))});
    return Status::Ok();
  }
  it->second.deadline_ms = now_ms + options_.dead_after_ms;
  it->second.last_beat_ms = now_ms;
  it->second.counters = m.counters;
  unheld_.push_back(Send{conn, rid, proto::ToReply(Status::Ok())});
  return Status::Ok();
}

Status CoordinatorService::HandleLeave(ConnId conn, uint64_t rid, const proto::LeaveRequest& m) {
  DSVM_RETURN_IF_ERROR(CheckSender(conn, m.node));
  DeclareDead(m.node, "left");
  ReplyStatus(conn, rid, Status::Ok());
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Regions

Status CoordinatorService::CheckRegionAccess(const RegionRecord& r, const proto::Credentials& creds,
                                             const std::string& token, bool remove) {
  if (!creds.present || creds.uid == 0) return Status::Ok();  // a tool, or root
  if (creds.uid == r.owner_uid) {
    if (remove || (r.mode & 0600) == 0600) return Status::Ok();
  } else if (!remove) {
    if (creds.gid == r.owner_gid && (r.mode & 0060) == 0060) return Status::Ok();
    if ((r.mode & 0006) == 0006) return Status::Ok();
    if (!r.token_hash.empty() && !token.empty() && proto::TokenMatches(r.token_hash, token)) {
      return Status::Ok();
    }
  }
  char mode[16];
  std::snprintf(mode, sizeof(mode), "%04o", r.mode);
  return PermissionDenied("region '" + r.name + "' (owner uid " + std::to_string(r.owner_uid) +
                          " gid " + std::to_string(r.owner_gid) + ", mode " + mode +
                          (r.token_hash.empty() ? "" : ", token") + ") may not be " +
                          (remove ? "deleted" : "opened") + " by uid " +
                          std::to_string(creds.uid) + " gid " + std::to_string(creds.gid) +
                          (remove || token.empty() ? "" : " with that token"));
}

void CoordinatorService::HandleRegionCreate(ConnId conn, uint64_t rid, const proto::RegionCreate& m) {
  if (m.mode > proto::kMaxRegionMode) {
    return ReplyStatus(conn, rid, InvalidArgument("region mode " + std::to_string(m.mode) +
                                                  " has bits beyond 0777"));
  }
  Result<RegionRecord> plan = regions_.Plan(m.name, m.size, m.page_size);
  if (!plan.ok()) return ReplyStatus(conn, rid, plan.status());
  RegionRecord r = std::move(*plan);
  r.owner_uid = m.creds.present ? m.creds.uid : 0;
  r.owner_gid = m.creds.present ? m.creds.gid : 0;
  r.mode = m.mode;
  if (!m.token.empty()) r.token_hash = proto::TokenDigest(m.token);
  Meta next = meta_;
  r.id = next.next_region_id++;
  r.created_epoch = store_->epoch();
  Status st = store_->PutMeta(next);
  if (st.ok()) st = store_->PutRegion(r);
  if (!st.ok()) return ReplyStatus(conn, rid, st);
  meta_ = next;
  Status ins = regions_.Insert(r);
  DSVM_CHECK_MSG(ins.ok(), ins.ToString());
  Reply(conn, rid, proto::RegionReply{r.id, r.base, r.size, r.page_size, r.name});
  const proto::RegionCreated created{r.id, r.base, r.size, r.page_size, r.name};
  DSVM_CHECK(created.Validate().ok());  // RegionTable::Plan admits no other region
  for (ConnId w : watchers_) held_.push_back(Send{w, 0, created});
}

void CoordinatorService::HandleRegionOpen(ConnId conn, uint64_t rid, const proto::RegionOpen& m) {
  const RegionRecord* r = regions_.FindByName(m.name);
  if (r == nullptr) return ReplyStatus(conn, rid, NotFound("no region '" + m.name + "'"));
  if (Status st = CheckRegionAccess(*r, m.creds, m.token, false); !st.ok()) {
    return ReplyStatus(conn, rid, st);
  }
  Reply(conn, rid, proto::RegionReply{r->id, r->base, r->size, r->page_size, r->name});
}

void CoordinatorService::HandleRegionDelete(ConnId conn, uint64_t rid, const proto::RegionDelete& m) {
  const RegionRecord* found = regions_.FindByName(m.name);
  if (found == nullptr) return ReplyStatus(conn, rid, NotFound("no region '" + m.name + "'"));
  if (Status st = CheckRegionAccess(*found, m.creds, "", true); !st.ok()) {
    return ReplyStatus(conn, rid, st);
  }
  const RegionRecord r = *found;
  // One atomic write: refused, the region is whole, in memory and on disk.
  Status st = store_->DeleteRegionAndPages(r.id, r.base, r.size);
  if (!st.ok()) return ReplyStatus(conn, rid, st);
  regions_.Remove(m.name).status().IgnoreError();
  DropDirectoryRange(r.base, r.base + r.size);
  ReplyStatus(conn, rid, Status::Ok());
  // Tell the nodes now, so they free their copies instead of holding them
  // until the addresses are reused. Queued after the reply, so a deleter
  // that is a node hears OK first, and is told too. A node not connected
  // now is not told later: it learns lazily, from a NOT_FOUND grant or from
  // a new region over the same addresses.
  const proto::RegionDeleted notice{r.id, r.base, r.size};
  DSVM_CHECK(notice.Validate().ok());  // RegionTable::Insert admits no other region
  for (const auto& [node, node_conn] : node_conn_) {
    auto member = members_.find(node);
    if (member != members_.end() && member->second.record.live) {
      held_.push_back(Send{node_conn, 0, notice});
    }
  }
  for (ConnId w : watchers_) held_.push_back(Send{w, 0, notice});
}

void CoordinatorService::HandleRegionWatch(ConnId conn, uint64_t rid) {
  if (region_follower()) return ReplyStatus(conn, rid, NotTheRegionAuthority("RegionWatch"));
  std::vector<RegionRecord> all = regions_.List();
  std::sort(all.begin(), all.end(),
            [](const RegionRecord& a, const RegionRecord& b) { return a.id < b.id; });
  // One message per region: a table of any size fits, and every change made
  // after this turn of the loop is queued behind the snapshot.
  for (const RegionRecord& r : all) {
    Reply(conn, rid, proto::RegionCreated{r.id, r.base, r.size, r.page_size, r.name});
  }
  Reply(conn, rid, proto::RegionSnapshotDone{all.size(), meta_.next_region_id});
  if (watchers_.insert(conn).second) {
    LogInfo("a shard follows the region table (" + std::to_string(all.size()) + " regions sent)");
  }
}

// ---------------------------------------------------------------------------
// A follower's region table

namespace {

bool SameRegion(const RegionRecord& r, const proto::RegionCreated& m) {
  return r.id == m.region && r.base == m.base && r.size == m.size && r.page_size == m.page_size &&
         r.name == m.name;
}

}  // namespace

Status CoordinatorService::AddFollowedRegion(const proto::RegionCreated& m) {
  RegionRecord r;
  r.id = m.region;
  r.name = m.name;
  r.base = m.base;
  r.size = m.size;
  r.page_size = m.page_size;
  r.created_epoch = store_->epoch();
  // Owner, mode and token stay at shard 0, the only shard that opens regions.
  if (Status ins = regions_.Insert(r); !ins.ok()) {
    LogError("region '" + r.name + "' (id " + std::to_string(r.id) + ") of shard 0 at " +
             options_.region_authority + " does not fit this shard's table: " + ins.message() +
             "; its pages are not served here (do the shards have the same window?)");
    return Status::Ok();  // a fresh snapshot would not fit either
  }
  // Persisted, so the directory records of its pages are kept across a
  // restart (Load drops records of no region).
  if (Status st = store_->PutRegion(r); !st.ok()) {
    regions_.Remove(r.name).status().IgnoreError();
    return st;
  }
  return Status::Ok();
}

Status CoordinatorService::DropFollowedRegion(const RegionRecord& r) {
  Status st = store_->DeleteRegionAndPages(r.id, r.base, r.size);  // as HandleRegionDelete
  if (!st.ok()) return st;
  regions_.Remove(r.name).status().IgnoreError();
  DropDirectoryRange(r.base, r.base + r.size);
  RememberDeleted(r.id);
  return Status::Ok();
}

void CoordinatorService::DropDirectoryRange(proto::PageAddr begin, proto::PageAddr end) {
  directory_.DropRange(begin, end);
  // Records a failed Flush left for the next one must not bring the pages
  // back into the store, where a region made at these addresses would load
  // them as its own.
  std::erase_if(unpersisted_,
                [&](const PageRecord& r) { return r.page >= begin && r.page < end; });
}

void CoordinatorService::RememberDeleted(proto::RegionId id) {
  next_region_heard_ = std::max(next_region_heard_, id + 1);
  recent_deletes_.push_back(id);
  if (recent_deletes_.size() > kMaxRecentDeletes) recent_deletes_.pop_front();
  DSVM_CHECK(recent_deletes_.size() <= kMaxRecentDeletes);
}

Status CoordinatorService::OnRegionSnapshot(const std::vector<proto::RegionCreated>& regions,
                                            proto::RegionId next_region) {
  DSVM_CHECK(region_follower());
  next_region_heard_ = std::max(next_region_heard_, next_region);
  std::map<proto::RegionId, const proto::RegionCreated*> by_id;
  for (const proto::RegionCreated& m : regions) by_id[m.region] = &m;
  Status first;
  size_t dropped = 0, added = 0;
  for (const RegionRecord& r : regions_.List()) {
    auto it = by_id.find(r.id);
    if (it != by_id.end() && SameRegion(r, *it->second)) continue;
    Status st = DropFollowedRegion(r);  // deleted while this shard was not listening
    if (st.ok()) ++dropped;
    if (first.ok()) first = st;
  }
  for (const proto::RegionCreated& m : regions) {
    const RegionRecord* have = regions_.FindByName(m.name);
    if (have != nullptr && SameRegion(*have, m)) continue;
    Status st = AddFollowedRegion(m);
    if (st.ok()) ++added;
    if (first.ok()) first = st;
  }
  synced_ = first.ok();
  LogInfo("region table synced from shard 0 at " + options_.region_authority + ": " +
          std::to_string(regions.size()) + " regions (" + std::to_string(added) + " new, " +
          std::to_string(dropped) + " dropped)");
  return first;
}

Status CoordinatorService::OnRegionCreated(const proto::RegionCreated& m) {
  DSVM_CHECK(region_follower());
  next_region_heard_ = std::max(next_region_heard_, m.region + 1);
  const RegionRecord* have = regions_.FindByName(m.name);
  if (have != nullptr && SameRegion(*have, m)) return Status::Ok();
  Status st = AddFollowedRegion(m);
  if (!st.ok()) synced_ = false;
  return st;
}

Status CoordinatorService::OnRegionDeleted(const proto::RegionDeleted& m) {
  DSVM_CHECK(region_follower());
  const RegionRecord* r = regions_.FindByAddress(m.base);
  if (r == nullptr || r->id != m.region) {
    // Never heard of here (it did not fit): its pages are still NOT_FOUND.
    RememberDeleted(m.region);
    return Status::Ok();
  }
  Status st = DropFollowedRegion(RegionRecord(*r));
  if (!st.ok()) synced_ = false;
  return st;
}

}  // namespace dsvm::coordinator
