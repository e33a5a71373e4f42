// Store: the coordinator's durable state, kept in RocksDB. This is the only
// file set in dsvm that includes RocksDB; everything above it sees Status,
// Result<T> and plain record structs.
//
// What is kept, all in RocksDB's default column family, told apart by a
// one-byte key prefix (one column family means one memtable, one WAL and one
// flush path, and Open never fails on an unexpected column family set before
// it has read the format version and can say what is wrong):
//
//   "m"                        Meta: format version, epoch, id counters
//   "r" + region id  (u64 BE)  RegionRecord
//   "n" + node id    (u32 BE)  NodeRecord
//   "p" + page addr  (u64 BE)  coordinator::PageRecord (the directory)
//
// Big-endian ids make RocksDB's bytewise order the numeric order, so
// LoadDirectory streams pages in address order and a region's pages form one
// contiguous key range (DeleteDirectoryRange is a single range tombstone).
// Values are proto::EncodeFields of the struct's Visit(), little-endian. The
// id inside a value must match its key; a value that does not decode exactly,
// or disagrees with its key, is reported as kCorruption naming the key.
//
// Format version: Meta.format is the first field of the "m" value, and Open
// reads it (the first 8 bytes, little-endian) before decoding anything else,
// so a store written by a newer build with a different layout is refused with
// kCorruption and a message naming both versions instead of a decode error.
// Change the layout of any record => bump kStoreFormatVersion.
//
// Durability rules:
//   * Meta, region and node writes are synchronous (fsync of RocksDB's WAL
//     before the call returns): they survive a machine crash or power loss.
//   * Directory writes (WriteDirectory, DeleteDirectoryRange) follow
//     StoreOptions::sync_directory. With the default (false) a batch is
//     written to the WAL with write(2) but not fsynced: once the call returns
//     it survives the coordinator process being killed (kill -9, crash,
//     OOM kill), because the bytes are in the kernel's page cache, but NOT a
//     machine crash or power loss, which may lose the most recent batches.
//     With true, every batch is fsynced and survives both.
//   * Any synchronous write also makes every earlier write durable, since the
//     WAL is appended in order.
//   * Each call is atomic: after any crash a batch is there in full or not
//     at all. After a machine crash RocksDB recovers the WAL to the last
//     consistent point (kPointInTimeRecovery), so what survives is a prefix
//     of the acknowledged writes.
//
// Disk errors: a write that fails with kIoError may or may not be in the
// store afterwards (its bytes may have reached the WAL before a failed
// fsync), and RocksDB then refuses every later write (a background error)
// until it is resumed. The store recovers by itself: the next write first
// resumes RocksDB, or where RocksDB refuses to resume (a failed WAL write is
// fatal to it) closes and reopens the database, which replays the WAL. While
// the disk still fails, every write fails with kIoError naming the operation
// and the error. Reads are served meanwhile, except after a reopen that
// failed: they then fail with kIoError until a write reopens the database.
//
// Thread safety: every method may be called from any thread (RocksDB's DB is
// thread-safe); the recovery above, which may replace the database, is
// serialized against every other call by mu_. Only one process may have a
// store open: a second Open of the same directory fails with kIoError
// (RocksDB's LOCK file).
#ifndef DSVM_COORDINATOR_STORAGE_STORE_H_
#define DSVM_COORDINATOR_STORAGE_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace rocksdb {
class DB;
class Env;
class Status;
}  // namespace rocksdb

namespace dsvm::coordinator {

// The layout version this build reads and writes (see the file comment).
inline constexpr uint64_t kStoreFormatVersion = 1;

// Bound on RegionRecord::token_hash (an encoded hash of the region's secret).
inline constexpr uint32_t kMaxTokenHashLength = 255;

// The disk fault seam: the store's files fail as a broken or full disk
// makes them fail, under a real RocksDB (the faults are injected at its
// file-system boundary, so RocksDB's own error handling runs). For tests and
// the simulator; production passes none. Each switch holds until turned off.
// Thread-safe: RocksDB's background threads consult it too.
class DiskFaults {
 public:
  // Every write to a file the store writes (Append, Flush, Sync, ...) fails
  // with an IO error before any byte reaches the file.
  void FailWrites(bool on) { fail_writes_.store(on); }
  // Only syncs fail (fsync, fdatasync, range sync): a write's bytes reach
  // the OS, and may be found by the next open, but are never made durable.
  void FailSyncs(bool on) { fail_syncs_.store(on); }
  // Creating or reopening a file for writing fails (a new WAL, SST or
  // MANIFEST: RocksDB makes them when it flushes or recovers).
  void FailFileCreation(bool on) { fail_creation_.store(on); }
  void Clear() {
    FailWrites(false);
    FailSyncs(false);
    FailFileCreation(false);
  }
  // How many file operations have failed here so far.
  uint64_t injected() const { return injected_.load(); }

  // For the store's file system: whether this operation fails (counted).
  bool WriteFails() { return Inject(fail_writes_.load()); }
  bool SyncFails() { return Inject(fail_writes_.load() || fail_syncs_.load()); }
  bool CreationFails() { return Inject(fail_creation_.load()); }

 private:
  bool Inject(bool fail) {
    if (fail) injected_.fetch_add(1);
    return fail;
  }
  std::atomic<bool> fail_writes_{false};
  std::atomic<bool> fail_syncs_{false};
  std::atomic<bool> fail_creation_{false};
  std::atomic<uint64_t> injected_{0};
};

struct StoreOptions {
  // Fsync the WAL for every directory batch. false: a directory batch
  // survives a process kill but not a machine crash (see the file comment).
  bool sync_directory = false;
  // Create an empty store when `dir` holds none. false: Open of a missing
  // store fails with kNotFound.
  bool create_if_missing = true;
  // Faults to inject under RocksDB (tests); not owned, must outlive the
  // store. nullptr: the real disk only.
  DiskFaults* faults = nullptr;
};

// Cluster-wide metadata, one per store.
struct Meta {
  uint64_t format = kStoreFormatVersion;  // must stay the first field
  uint64_t epoch = 0;           // bumped (and synced) by every Open
  uint64_t next_region_id = 1;  // 0 is never a region
  uint64_t next_node_id = 1;    // 0 is never a node
  template <typename A> void Visit(A& a) {
    a.U64(format); a.U64(epoch); a.U64(next_region_id); a.U64(next_node_id);
  }
};

struct RegionRecord {
  uint64_t id = 0;
  std::string name;             // at most proto::kMaxNameLength bytes
  uint64_t base = 0;            // cluster-wide virtual address of the first page
  uint64_t size = 0;            // bytes, a multiple of page_size
  uint32_t page_size = 0;
  uint32_t owner_uid = 0;
  uint32_t owner_gid = 0;
  uint32_t mode = 0;            // permission bits, as for a file
  std::string token_hash;       // at most kMaxTokenHashLength bytes
  uint64_t created_epoch = 0;   // the coordinator epoch that created it
  template <typename A> void Visit(A& a) {
    a.U64(id); a.Str(name, proto::kMaxNameLength); a.U64(base); a.U64(size);
    a.U32(page_size); a.U32(owner_uid); a.U32(owner_gid); a.U32(mode);
    a.Str(token_hash, kMaxTokenHashLength); a.U64(created_epoch);
  }
};

struct NodeRecord {
  uint32_t id = 0;
  std::string address;                     // at most proto::kMaxAddressLength
  uint64_t host_memory_bytes = 0;
  uint32_t gpu_count = 0;
  std::vector<uint8_t> transport_address;  // at most proto::kMaxBlobLength
  uint8_t live = 0;                        // 0 or 1
  template <typename A> void Visit(A& a) {
    a.U32(id); a.Str(address, proto::kMaxAddressLength); a.U64(host_memory_bytes);
    a.U32(gpu_count); a.Blob(transport_address, proto::kMaxBlobLength); a.Flag(live);
  }
};

class Store {
 public:
  // Opens (or creates, per options) the store in directory `dir`, checks its
  // format version, bumps Meta.epoch and syncs it before returning.
  // Errors: kInvalidArgument (`dir` exists and is not a directory),
  // kNotFound (no store there and !create_if_missing), kCorruption (unknown
  // format version, undecodable metadata, records without metadata, or
  // RocksDB found corruption), kIoError (the OS refused; the store is locked
  // by another process), kInternal (any other RocksDB failure).
  static Result<std::unique_ptr<Store>> Open(const std::string& dir,
                                             const StoreOptions& options);

  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Closes the database and releases its lock (every acknowledged write is
  // already in the WAL). Any later call on this Store is a programmer error
  // (DSVM_CHECK). The destructor closes too, dropping the Status. Errors:
  // kIoError, kInternal.
  Status Close();

  // The epoch this Open wrote.
  uint64_t epoch() const { return epoch_; }
  const std::string& dir() const { return dir_; }

  // Errors: kCorruption (missing or undecodable), kIoError, kInternal.
  Result<Meta> LoadMeta() const;
  // Synchronous. Errors: kInvalidArgument (meta.format is not
  // kStoreFormatVersion), kIoError, kInternal.
  Status PutMeta(const Meta& meta);

  // Synchronous; replaces the region with the same id. Errors:
  // kInvalidArgument (id 0, a string over its bound), kIoError, kInternal.
  Status PutRegion(const RegionRecord& region);
  // Synchronous; deleting an absent id succeeds. Errors: kIoError, kInternal.
  // Deleting a region with its pages is DeleteRegionAndPages.
  Status DeleteRegion(uint64_t id);
  // Deletes region `id` and the directory records of [base, base + size) in
  // one synchronous atomic write: after any crash or disk error both are
  // gone or neither is. Errors: kInvalidArgument (base + size wraps),
  // kIoError, kInternal.
  Status DeleteRegionAndPages(uint64_t id, uint64_t base, uint64_t size);
  // In id order. Errors: kCorruption (naming the key), kIoError, kInternal.
  Result<std::vector<RegionRecord>> LoadRegions() const;

  // Synchronous; replaces the node with the same id. Errors:
  // kInvalidArgument (id 0, a field over its bound, live not 0 or 1),
  // kIoError, kInternal.
  Status PutNode(const NodeRecord& node);
  // Synchronous; deleting an absent id succeeds. Errors: kIoError, kInternal.
  Status DeleteNode(uint32_t id);
  // In id order. Errors: kCorruption (naming the key), kIoError, kInternal.
  Result<std::vector<NodeRecord>> LoadNodes() const;

  // Writes all records in one atomic batch, each replacing the record of its
  // page; synced per StoreOptions::sync_directory. Each record is checked to
  // decode back before anything is written, so the store never holds a page
  // the coordinator could not load at its next start. Errors:
  // kInvalidArgument (a record that would not decode; nothing written),
  // kIoError, kInternal.
  Status WriteDirectory(const std::vector<PageRecord>& records);
  // Removes the records of pages in [begin, end) in one atomic write; synced
  // per sync_directory. begin == end is a no-op. Errors: kInvalidArgument
  // (begin > end), kIoError, kInternal.
  Status DeleteDirectoryRange(uint64_t begin, uint64_t end);
  // Calls `each` for every record, in page-address order; `each` must not
  // call this store. A non-OK Status from `each` stops the scan and is
  // returned as is. Errors: kCorruption
  // (a record that does not decode or disagrees with its key; the message
  // names the key), kIoError, kInternal.
  Status LoadDirectory(const std::function<Status(const PageRecord&)>& each) const;

 private:
  using ReadLock = std::shared_lock<std::shared_mutex>;

  Store(std::string dir, StoreOptions options, std::unique_ptr<rocksdb::Env> env,
        std::unique_ptr<rocksdb::DB> db);

  // Reads, validates and bumps Meta; part of Open.
  Status BumpEpoch();
  // Takes mu_ shared into *lock for a read: the database is there. Errors:
  // kIoError (it was closed by a recovery that could not reopen it).
  Status BeginRead(std::string_view op, ReadLock* lock) const;
  // As BeginRead, for a write: first recovers from an earlier failed write
  // (see the file comment). Errors: kIoError (RocksDB still refuses).
  Status BeginWrite(std::string_view op, ReadLock* lock);
  // The Status of a write RocksDB answered with `s`; a failed one makes the
  // next write recover first.
  Status EndWrite(const rocksdb::Status& s, std::string_view op);
  // Resumes RocksDB after a failed write, or reopens it where it will not
  // resume. REQUIRES: mu_ held exclusively.
  Status Recover(std::string_view op);

  std::string dir_;
  StoreOptions options_;
  std::unique_ptr<rocksdb::Env> env_;  // under db_: outlives it
  // Shared by every call; exclusive while Recover or Close replace db_.
  mutable std::shared_mutex mu_;
  std::unique_ptr<rocksdb::DB> db_;  // null after Close, or after a failed reopen
  bool closed_ = false;              // Close was called; GUARDED_BY(mu_)
  std::atomic<bool> needs_recovery_{false};  // a write failed since the last recovery
  uint64_t epoch_ = 0;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_STORAGE_STORE_H_
