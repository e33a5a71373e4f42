// CoordinatorService: what dsvm-coordinator does, without its sockets.
//
// It owns the store, the region table, the membership and one directory
// shard. The network layer (coordinator/net) feeds it validated frames per
// connection and ticks; it answers with sends. Nothing leaves before it is
// durable: region and membership changes are written synchronously before
// their reply is queued, and directory changes are written in one batch per
// Flush() before that batch's messages are released (group commit, RocksDB
// WAL without fsync unless --directory-sync: survives kill -9).
//
// Single owner: every method runs on the coordinator's one event-loop thread.
#ifndef DSVM_COORDINATOR_SERVICE_COORDINATOR_SERVICE_H_
#define DSVM_COORDINATOR_SERVICE_COORDINATOR_SERVICE_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "coordinator/cluster/region_table.h"
#include "coordinator/directory/page_directory.h"
#include "coordinator/storage/store.h"
#include "proto/messages.h"
#include "proto/shard_map.h"

namespace dsvm::coordinator {

using ConnId = uint64_t;

struct ServiceOptions {
  uint32_t shard = 0;
  uint32_t shard_count = 1;
  uint32_t heartbeat_interval_ms = 500;
  uint32_t dead_after_ms = 3000;  // a node silent this long is declared dead
  // How often the server calls OnTick; a gap of more than kStallTicks of
  // these is this coordinator standing still (OnTick).
  uint32_t tick_ms = 50;
  uint64_t retransmit_after_ms = 200;
  WindowOptions window;
  // Shards other than 0 of a cluster of several: shard 0's "host:port".
  // This coordinator then follows shard 0's region table (fed by a
  // RegionFollower through the OnRegion* calls), refuses region requests,
  // and takes node ids as shard 0 assigned them (PROTOCOL.md, Shards).
  // Empty: this coordinator decides its regions and node ids itself.
  std::string region_authority;
};

struct Send {
  ConnId conn = 0;
  uint64_t request_id = 0;  // the request answered; 0 for directory messages
  proto::Message message;
};

struct ServiceStats {
  uint64_t frames = 0;
  uint64_t refused = 0;          // frames that closed their connection
  uint64_t flushes = 0;
  uint64_t records_written = 0;
  uint64_t nodes_declared_dead = 0;
};

class CoordinatorService {
 public:
  // Loads everything from `store`. Errors: kCorruption (a stored record is
  // damaged: the coordinator refuses to start), kIoError.
  static Result<std::unique_ptr<CoordinatorService>> Create(std::unique_ptr<Store> store,
                                                            const ServiceOptions& options,
                                                            uint64_t now_ms);

  // A frame from `conn`. A non-OK Status means the peer broke the protocol
  // (impersonation, a message only a coordinator sends, a page of another
  // shard...): the caller logs it and closes that connection only.
  Status OnFrame(ConnId conn, const proto::Frame& frame, uint64_t now_ms);
  void OnDisconnect(ConnId conn);
  // Retransmits, and declares nodes dead that missed their heartbeats.
  // After a gap of more than kStallTicks tick periods since the last tick
  // (this coordinator stood still, and heartbeats may wait unread), every
  // live node has at least a heartbeat interval from now.
  void OnTick(uint64_t now_ms);
  static constexpr uint64_t kStallTicks = 4;

  // Hands over the answers that wait for nothing unwritten (heartbeats'),
  // persists pending changes (the records of nodes declared dead whose
  // DeclareDead could not store them, then the directory's), then hands
  // over every other send. On a storage error only the former are handed
  // over, and the Status (kIoError, ...) says what failed; the next Flush
  // retries. While it fails, the directory's retransmissions would pile up
  // behind it, one more copy of each message every retransmit period and
  // every resent request: a failed Flush keeps one of each (the held sends
  // grow with the messages outstanding, not with the outage's length).
  Status Flush(std::vector<Send>* sends);
  bool has_unflushed() const {
    return !held_.empty() || !unheld_.empty() || !unpersisted_.empty() ||
           !deaths_unpersisted_.empty();
  }

  // A follower shard (options.region_authority set) learns the region
  // table from shard 0: a whole snapshot, made exactly this shard's table
  // (regions it lacks, or has with other values, are dropped with their
  // directory records), then each change. Every call persists what it
  // changes before it returns. Errors: kIoError and the store's others, after
  // which this shard's table may differ from shard 0's: the caller asks for
  // a fresh snapshot. A region this shard cannot place (its address window
  // differs from shard 0's: a misconfiguration) is logged and left out.
  // `next_region`: the id shard 0 gives next (every id below it was given).
  Status OnRegionSnapshot(const std::vector<proto::RegionCreated>& regions,
                          proto::RegionId next_region);
  Status OnRegionCreated(const proto::RegionCreated& m);
  Status OnRegionDeleted(const proto::RegionDeleted& m);
  // The connection to shard 0 broke: changes may be missed until the next
  // snapshot, so a page in no region may belong to a region not heard of.
  void OnRegionAuthorityLost() { synced_ = false; }
  bool region_follower() const { return !options_.region_authority.empty(); }
  bool region_table_synced() const { return synced_; }

  const ServiceStats& stats() const { return stats_; }
  const PageDirectory& directory() const { return directory_; }

 private:
  struct Member {
    NodeRecord record;
    uint64_t deadline_ms = 0;
    // When the node was last heard on its connection (its join, then each
    // heartbeat): a join for its id from another connection is refused
    // while this is within kLiveBeats heartbeat intervals
    // (CheckNotLiveElsewhere).
    uint64_t last_beat_ms = 0;
    proto::NodeCounters counters;  // from the latest heartbeat; statistics, not persisted
  };
  // Heartbeat intervals a node's connection may be silent and still hold
  // its id against a resume from another connection.
  static constexpr uint64_t kLiveBeats = 2;

  CoordinatorService(std::unique_ptr<Store> store, const ServiceOptions& options);
  Status Load(uint64_t now_ms);

  void Reply(ConnId conn, uint64_t request_id, proto::Message m);
  void ReplyStatus(ConnId conn, uint64_t request_id, const Status& s);
  void Route(Outbox& out);
  // Drops every held directory message (request id 0) equal to an earlier
  // one to the same connection: a retransmission of what already waits.
  void DropHeldRetransmissions();
  // The node bound to `conn`, after checking it is the node the message names.
  Status CheckSender(ConnId conn, proto::NodeId claimed) const;
  Status CheckPage(proto::PageAddr page) const;
  // CheckPage for a page of `region`, found already.
  Status CheckPageOf(const RegionRecord& region, proto::PageAddr page) const;
  // Answers an Acquire for a page of no region (deleted while the node maps
  // it): a NOT_FOUND grant, or for a give-up an OK EvictReply.
  void RefuseGone(ConnId conn, const proto::Acquire& m);
  // Whether the Acquire's region is the one at its page here (kServe); if
  // not, whether it was deleted (kGone: RefuseGone) or, at a follower, may
  // exist at shard 0 and not have reached this shard yet (kWait: dropped,
  // the node resends).
  // `r`: the region at m.page here, or nullptr.
  enum class RegionMatch { kServe, kWait, kGone };
  RegionMatch MatchRegion(const proto::Acquire& m, const RegionRecord* r) const;
  // A follower's refusal of `request`, which only shard 0 serves.
  Status NotTheRegionAuthority(const char* request) const;
  Status AddFollowedRegion(const proto::RegionCreated& m);
  Status DropFollowedRegion(const RegionRecord& r);
  // A deleted region's pages leave the directory, and the records waiting
  // to be written (unpersisted_).
  void DropDirectoryRange(proto::PageAddr begin, proto::PageAddr end);
  // The node is gone (`why`: missed heartbeats, or left): the directory hands its pages on.
  void DeclareDead(proto::NodeId node, const std::string& why);

  Status HandleJoin(ConnId conn, uint64_t rid, const proto::JoinRequest& m, uint64_t now_ms);
  // Refuses (kUnavailable) a join for id m.node from `conn` while that
  // node is live and bound to another connection: neither a second daemon
  // with the same id nor a holder of the secret may take over a live node.
  // A connection that closed gives the id up; for a resume, so does one
  // quiet for kLiveBeats heartbeat intervals (its daemon reconnected); a
  // new daemon's join waits until the node is declared dead.
  Status CheckNotLiveElsewhere(ConnId conn, const proto::JoinRequest& m, uint64_t now_ms);
  Status HandleHeartbeat(ConnId conn, uint64_t rid, const proto::Heartbeat& m, uint64_t now_ms);
  Status HandleLeave(ConnId conn, uint64_t rid, const proto::LeaveRequest& m);
  // Whether the request's sender may open (or, `remove`, delete) region r.
  static Status CheckRegionAccess(const RegionRecord& r, const proto::Credentials& creds,
                                  const std::string& token, bool remove);
  void HandleRegionCreate(ConnId conn, uint64_t rid, const proto::RegionCreate& m);
  void HandleRegionOpen(ConnId conn, uint64_t rid, const proto::RegionOpen& m);
  void HandleRegionDelete(ConnId conn, uint64_t rid, const proto::RegionDelete& m);
  void HandleRegionWatch(ConnId conn, uint64_t rid);

  std::unique_ptr<Store> store_;
  ServiceOptions options_;
  proto::ShardMap shard_map_;
  RegionTable regions_;
  PageDirectory directory_;
  Meta meta_;
  std::map<proto::NodeId, Member> members_;
  uint64_t last_tick_ms_ = 0;  // 0: no tick yet
  std::unordered_map<proto::NodeId, ConnId> node_conn_;
  std::unordered_map<ConnId, proto::NodeId> conn_node_;
  // The id each connection was last refused for by CheckNotLiveElsewhere,
  // so that a joiner retrying is logged once; one entry per connection at
  // most, dropped when it closes or joins.
  std::unordered_map<ConnId, proto::NodeId> refused_join_;
  Outbox outbox_;
  std::vector<Send> held_;                 // waiting for their records to be durable
  std::vector<Send> unheld_;               // heartbeat answers: wait for no record
  // Taken from the directory, not yet written (a Flush failed); one per page.
  std::vector<PageRecord> unpersisted_;
  // Declared dead, stored live still: their records are written (Flush)
  // before anything else, since the hand-over of their pages must not be.
  std::set<proto::NodeId> deaths_unpersisted_;
  ServiceStats stats_;

  // Shard 0: connections of follower shards watching the region table; each
  // gets every change after its snapshot.
  std::set<ConnId> watchers_;
  // A follower: whether the table is shard 0's as of the last snapshot and
  // every change since (false from start until the first snapshot, and
  // while the connection to shard 0 is down).
  bool synced_ = false;
  // A follower: the regions it saw deleted, newest last, so a node still
  // asking about their pages is told NOT_FOUND while the table is not
  // synced. Bounded: synced, next_region_heard_ tells the rest.
  static constexpr size_t kMaxRecentDeletes = 1024;
  std::deque<proto::RegionId> recent_deletes_;
  void RememberDeleted(proto::RegionId id);
  // A follower: one past the highest region id it has heard of (from the
  // last snapshot's next_region, or a change pushed since). Only grows.
  proto::RegionId next_region_heard_ = 1;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_SERVICE_COORDINATOR_SERVICE_H_
