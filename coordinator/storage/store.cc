#include "coordinator/storage/store.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string_view>
#include <utility>

#include "proto/wire.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"
#include "rocksdb/io_status.h"
#include "rocksdb/iterator.h"
#include "rocksdb/memtablerep.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/status.h"
#include "rocksdb/write_batch.h"

namespace dsvm::coordinator {
namespace {

// Key prefixes; the layout is described in store.h.
constexpr char kMetaKey[] = "m";
constexpr char kRegionPrefix = 'r';
constexpr char kNodePrefix = 'n';
constexpr char kPagePrefix = 'p';

template <typename T>
std::string MakeKey(char prefix, T id) {
  std::string key(1 + sizeof(T), '\0');
  key[0] = prefix;
  for (size_t i = 0; i < sizeof(T); ++i) {
    key[1 + i] = static_cast<char>(static_cast<uint64_t>(id) >> (8 * (sizeof(T) - 1 - i)));
  }
  return key;
}

uint64_t ParseBigEndian(std::string_view bytes) {
  uint64_t v = 0;
  for (char c : bytes) v = (v << 8) | static_cast<uint8_t>(c);
  return v;
}

uint64_t ParseLittleEndian64(std::string_view bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v |= uint64_t{static_cast<uint8_t>(bytes[i])} << (8 * i);
  return v;
}

// "p/0000000000001000": the prefix, then the rest of the key in hex, so that
// a corrupt record can be found with `ldb get --key_hex`.
std::string DescribeKey(std::string_view key) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  size_t start = 0;
  if (!key.empty() && key[0] >= 'a' && key[0] <= 'z') {
    out.push_back(key[0]);
    out.push_back('/');
    start = 1;
  } else {
    out = "0x";
  }
  for (size_t i = start; i < key.size(); ++i) {
    uint8_t b = static_cast<uint8_t>(key[i]);
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 0xf]);
  }
  return out;
}

std::string Hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string_view AsView(const rocksdb::Slice& s) { return std::string_view(s.data(), s.size()); }

std::span<const uint8_t> AsBytes(const rocksdb::Slice& s) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

rocksdb::WriteOptions WriteOpts(bool sync) {
  rocksdb::WriteOptions w;
  w.sync = sync;
  return w;
}

// "Store::Op(/dir): " — every message names the operation and the store.
std::string Where(std::string_view op, const std::string& dir) {
  std::string s = "Store::";
  s += op;
  s += "(";
  s += dir;
  s += "): ";
  return s;
}

// The one place a RocksDB status becomes a dsvm Status.
Status FromRocks(const rocksdb::Status& s, std::string_view op, const std::string& dir) {
  std::string msg = Where(op, dir) + s.ToString();
  if (s.IsIOError() || s.IsNoSpace()) return IoError(std::move(msg));
  if (s.IsCorruption()) return Corruption(std::move(msg));
  return Internal(std::move(msg));
}

// Decodes the value under `key` into *out; kCorruption naming the key if the
// bytes do not decode exactly.
template <typename T>
Status DecodeRecord(const rocksdb::Slice& key, const rocksdb::Slice& value, T* out,
                    std::string_view op, const std::string& dir) {
  Status s = proto::DecodeFields(AsBytes(value), out);
  if (!s.ok()) {
    return Corruption(Where(op, dir) + "record under key " + DescribeKey(AsView(key)) +
                      " does not decode: " + s.message());
  }
  return Status::Ok();
}

// Checks that `key` is `prefix` followed by an id of `id_size` bytes and that
// the id equals `id_in_value`.
Status CheckKey(const rocksdb::Slice& key, size_t id_size, uint64_t id_in_value,
                std::string_view op, const std::string& dir) {
  if (key.size() != 1 + id_size) {
    return Corruption(Where(op, dir) + "key " + DescribeKey(AsView(key)) + " is " +
                      std::to_string(key.size()) + " bytes, expected " +
                      std::to_string(1 + id_size));
  }
  uint64_t id_in_key = ParseBigEndian(AsView(key).substr(1));
  if (id_in_key != id_in_value) {
    return Corruption(Where(op, dir) + "record under key " + DescribeKey(AsView(key)) +
                      " holds id " + Hex64(id_in_value) + ", not its key's");
  }
  return Status::Ok();
}

// Calls f(key, value) for every key that starts with `prefix`, in key order.
template <typename F>
Status ScanPrefix(rocksdb::DB* db, char prefix, std::string_view op,
                  const std::string& dir, F&& f) {
  const std::string lower(1, prefix);
  const std::string upper(1, static_cast<char>(prefix + 1));
  rocksdb::Slice upper_slice(upper);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper_slice;
  ro.fill_cache = false;  // a whole-prefix scan at startup; nothing to keep
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
  for (it->Seek(lower); it->Valid(); it->Next()) {
    DSVM_RETURN_IF_ERROR(f(it->key(), it->value()));
  }
  if (!it->status().ok()) return FromRocks(it->status(), op, dir);
  return Status::Ok();
}

// The disk fault seam (DiskFaults in store.h): RocksDB's own file system
// underneath, with the writes of every file it opens for writing failing on
// command.
rocksdb::IOStatus Injected(const char* what) {
  return rocksdb::IOStatus::IOError(std::string("injected disk fault: ") + what);
}

class FaultyWritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  FaultyWritableFile(std::unique_ptr<rocksdb::FSWritableFile> file, DiskFaults* faults)
      : FSWritableFileOwnerWrapper(std::move(file)), faults_(faults) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->WriteFails()) return Injected("append");
    return FSWritableFileOwnerWrapper::Append(data, o, dbg);
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           const rocksdb::DataVerificationInfo& v,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->WriteFails()) return Injected("append");
    return FSWritableFileOwnerWrapper::Append(data, o, v, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& o,
                                     rocksdb::IODebugContext* dbg) override {
    if (faults_->WriteFails()) return Injected("positioned append");
    return FSWritableFileOwnerWrapper::PositionedAppend(data, offset, o, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& o,
                                     const rocksdb::DataVerificationInfo& v,
                                     rocksdb::IODebugContext* dbg) override {
    if (faults_->WriteFails()) return Injected("positioned append");
    return FSWritableFileOwnerWrapper::PositionedAppend(data, offset, o, v, dbg);
  }
  rocksdb::IOStatus Flush(const rocksdb::IOOptions& o, rocksdb::IODebugContext* dbg) override {
    if (faults_->WriteFails()) return Injected("flush");
    return FSWritableFileOwnerWrapper::Flush(o, dbg);
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* dbg) override {
    if (faults_->SyncFails()) return Injected("sync");
    return FSWritableFileOwnerWrapper::Sync(o, dbg);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* dbg) override {
    if (faults_->SyncFails()) return Injected("fsync");
    return FSWritableFileOwnerWrapper::Fsync(o, dbg);
  }
  rocksdb::IOStatus RangeSync(uint64_t offset, uint64_t nbytes, const rocksdb::IOOptions& o,
                              rocksdb::IODebugContext* dbg) override {
    if (faults_->SyncFails()) return Injected("range sync");
    return FSWritableFileOwnerWrapper::RangeSync(offset, nbytes, o, dbg);
  }

 private:
  DiskFaults* faults_;
};

class FaultyFileSystem : public rocksdb::FileSystemWrapper {
 public:
  FaultyFileSystem(const std::shared_ptr<rocksdb::FileSystem>& base, DiskFaults* faults)
      : FileSystemWrapper(base), faults_(faults) {}

  static const char* kClassName() { return "DsvmFaultyFileSystem"; }
  const char* Name() const override { return kClassName(); }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override {
    if (faults_->CreationFails()) return Injected("create file");
    return Wrap(FileSystemWrapper::NewWritableFile(f, o, r, dbg), r);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* dbg) override {
    if (faults_->CreationFails()) return Injected("reopen file");
    return Wrap(FileSystemWrapper::ReopenWritableFile(f, o, r, dbg), r);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& f, const std::string& old,
                                      const rocksdb::FileOptions& o,
                                      std::unique_ptr<rocksdb::FSWritableFile>* r,
                                      rocksdb::IODebugContext* dbg) override {
    if (faults_->CreationFails()) return Injected("reuse file");
    return Wrap(FileSystemWrapper::ReuseWritableFile(f, old, o, r, dbg), r);
  }

 private:
  rocksdb::IOStatus Wrap(rocksdb::IOStatus s, std::unique_ptr<rocksdb::FSWritableFile>* r) {
    if (s.ok()) *r = std::make_unique<FaultyWritableFile>(std::move(*r), faults_);
    return s;
  }
  DiskFaults* faults_;
};

// RocksDB's options for the store; the same at Open and at a reopen after a
// disk error (Store::Recover).
rocksdb::Options RocksOptions(const StoreOptions& options, rocksdb::Env* env) {
  rocksdb::Options ro;
  ro.create_if_missing = options.create_if_missing;
  if (env != nullptr) ro.env = env;
  ro.paranoid_checks = true;
  // After a machine crash, keep the longest consistent prefix of the WAL:
  // a torn last batch is dropped whole, never applied in part.
  ro.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  // Each write reaches the OS before the call returns; the kill -9 rule in
  // store.h depends on it.
  ro.manual_wal_flush = false;
  ro.keep_log_file_num = 10;  // RocksDB's info LOG files, not the WAL
  // The store is written while the coordinator serves and read only when it
  // starts (Load*), so the memtable is an append-only vector, sorted once
  // when it is flushed, rather than the default skip list, whose ordered
  // inserts were most of the coordinator's time on the fault path (two
  // directory records per transaction). Reads of an unflushed vector
  // memtable sort a copy of it: fine at startup, wrong for a hot path.
  ro.memtable_factory = std::make_shared<rocksdb::VectorRepFactory>();
  ro.allow_concurrent_memtable_write = false;  // a vector memtable takes one writer at a time
  return ro;
}

}  // namespace

Store::Store(std::string dir, StoreOptions options, std::unique_ptr<rocksdb::Env> env,
             std::unique_ptr<rocksdb::DB> db)
    : dir_(std::move(dir)), options_(options), env_(std::move(env)), db_(std::move(db)) {}

Store::~Store() { Close().IgnoreError(); }

Result<std::unique_ptr<Store>> Store::Open(const std::string& dir, const StoreOptions& options) {
  if (dir.empty()) return InvalidArgument("Store::Open: empty directory path");

  // RocksDB's own messages for these cases ("While mkdir if missing: ...
  // File exists", "does not exist (create_if_missing is false)") do not say
  // what to do, so they are checked here first.
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return InvalidArgument(Where("Open", dir) + "path exists and is not a directory");
    }
    if (!options.create_if_missing) {
      std::string current = dir + "/CURRENT";
      if (::stat(current.c_str(), &st) != 0) {
        return NotFound(Where("Open", dir) +
                        "no store in this directory and create_if_missing is false");
      }
    }
  } else if (errno == ENOENT) {
    if (!options.create_if_missing) {
      return NotFound(Where("Open", dir) +
                      "directory does not exist and create_if_missing is false");
    }
  } else {
    return IoError(Where("Open", dir) + "stat: " + std::strerror(errno));
  }

  // With faults to inject, RocksDB's own file system runs underneath them.
  std::unique_ptr<rocksdb::Env> env;
  if (options.faults != nullptr) {
    env = rocksdb::NewCompositeEnv(
        std::make_shared<FaultyFileSystem>(rocksdb::FileSystem::Default(), options.faults));
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(RocksOptions(options, env.get()), dir, &raw);
  if (!s.ok()) {
    delete raw;
    return FromRocks(s, "Open", dir);
  }
  std::unique_ptr<Store> store(
      new Store(dir, options, std::move(env), std::unique_ptr<rocksdb::DB>(raw)));
  DSVM_RETURN_IF_ERROR(store->BumpEpoch());
  return store;
}

Status Store::BumpEpoch() {
  Meta meta;
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kMetaKey, &value);
  if (s.IsNotFound()) {
    // A new store is empty. Records without metadata mean this is not a dsvm
    // store, or it was damaged: never guess the counters.
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    it->SeekToFirst();
    if (it->Valid()) {
      return Corruption(Where("Open", dir_) + "store holds records (first key " +
                        DescribeKey(AsView(it->key())) +
                        ") but no metadata; not a dsvm store, or damaged");
    }
    if (!it->status().ok()) return FromRocks(it->status(), "Open", dir_);
  } else if (!s.ok()) {
    return FromRocks(s, "Open", dir_);
  } else {
    // The format version is read before the rest, so a layout this build
    // does not know is named as such rather than as a decode failure.
    if (value.size() < 8) {
      return Corruption(Where("Open", dir_) + "metadata record is " +
                        std::to_string(value.size()) +
                        " bytes, too short to hold a format version");
    }
    uint64_t format = ParseLittleEndian64(value);
    if (format != kStoreFormatVersion) {
      return Corruption(Where("Open", dir_) + "unknown store format version " +
                        std::to_string(format) + "; this build reads only version " +
                        std::to_string(kStoreFormatVersion) +
                        " (was the store written by another dsvm release?)");
    }
    DSVM_RETURN_IF_ERROR(DecodeRecord(kMetaKey, value, &meta, "Open", dir_));
  }
  if (meta.epoch == std::numeric_limits<uint64_t>::max()) {
    return Corruption(Where("Open", dir_) + "epoch is at its maximum and cannot be bumped");
  }
  meta.epoch += 1;
  DSVM_RETURN_IF_ERROR(PutMeta(meta));
  epoch_ = meta.epoch;
  return Status::Ok();
}

Status Store::Close() {
  std::unique_lock<std::shared_mutex> lock(mu_);
  closed_ = true;
  if (db_ == nullptr) return Status::Ok();
  rocksdb::Status s = db_->Close();
  db_.reset();
  if (!s.ok()) return FromRocks(s, "Close", dir_);
  return Status::Ok();
}

Status Store::BeginRead(std::string_view op, ReadLock* lock) const {
  *lock = ReadLock(mu_);
  DSVM_CHECK_MSG(!closed_, "Store used after Close");
  if (db_ == nullptr) {
    return IoError(Where(op, dir_) +
                   "the database is closed: reopening it after a disk error failed, and the "
                   "next write tries again");
  }
  return Status::Ok();
}

Status Store::BeginWrite(std::string_view op, ReadLock* lock) {
  if (needs_recovery_.load()) {
    std::unique_lock<std::shared_mutex> exclusive(mu_);
    DSVM_CHECK_MSG(!closed_, "Store used after Close");
    DSVM_RETURN_IF_ERROR(Recover(op));
  }
  return BeginRead(op, lock);
}

Status Store::EndWrite(const rocksdb::Status& s, std::string_view op) {
  if (s.ok()) return Status::Ok();
  // RocksDB now refuses every write (a background error) until resumed.
  needs_recovery_.store(true);
  return FromRocks(s, op, dir_);
}

Status Store::Recover(std::string_view op) {
  if (!needs_recovery_.load()) return Status::Ok();  // another writer recovered first
  if (db_ != nullptr) {
    // RocksDB resumes from the errors it can vouch for (a full disk: it
    // flushes the memtable and starts a new WAL).
    if (db_->Resume().ok()) {
      needs_recovery_.store(false);
      return Status::Ok();
    }
    // It will not resume after a failed WAL write: that error is fatal to
    // it, since it cannot tell how much of the WAL's tail reached the disk.
    // A reopen replays the WAL up to its last whole batch (point-in-time
    // recovery), so a write that failed may be there afterwards or not.
    db_->Close().PermitUncheckedError();  // the same error again
    db_.reset();
  }
  StoreOptions reopen = options_;
  reopen.create_if_missing = false;  // it was there: never start an empty one in its place
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(RocksOptions(reopen, env_.get()), dir_, &raw);
  if (!s.ok()) {
    delete raw;
    return IoError(Where(op, dir_) +
                   "an earlier write failed and the store cannot recover until the disk works "
                   "again (reopening: " + s.ToString() + ")");
  }
  db_.reset(raw);
  needs_recovery_.store(false);
  return Status::Ok();
}

Result<Meta> Store::LoadMeta() const {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginRead("LoadMeta", &lock));
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kMetaKey, &value);
  if (s.IsNotFound()) return Corruption(Where("LoadMeta", dir_) + "no metadata record");
  if (!s.ok()) return FromRocks(s, "LoadMeta", dir_);
  Meta meta;
  DSVM_RETURN_IF_ERROR(DecodeRecord(kMetaKey, value, &meta, "LoadMeta", dir_));
  if (meta.format != kStoreFormatVersion) {
    return Corruption(Where("LoadMeta", dir_) + "unknown store format version " +
                      std::to_string(meta.format));
  }
  return meta;
}

Status Store::PutMeta(const Meta& meta) {
  if (meta.format != kStoreFormatVersion) {
    return InvalidArgument(Where("PutMeta", dir_) + "format " + std::to_string(meta.format) +
                           " is not this build's " + std::to_string(kStoreFormatVersion));
  }
  std::vector<uint8_t> bytes = proto::EncodeFields(meta);
  rocksdb::Slice value(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("PutMeta", &lock));
  rocksdb::Status s = db_->Put(WriteOpts(true), kMetaKey, value);
  return EndWrite(s, "PutMeta");
}

Status Store::PutRegion(const RegionRecord& region) {
  if (region.id == 0) return InvalidArgument(Where("PutRegion", dir_) + "region id 0");
  if (region.name.size() > proto::kMaxNameLength) {
    return InvalidArgument(Where("PutRegion", dir_) + "name of " +
                           std::to_string(region.name.size()) + " bytes is over the bound");
  }
  if (region.token_hash.size() > kMaxTokenHashLength) {
    return InvalidArgument(Where("PutRegion", dir_) + "token_hash of " +
                           std::to_string(region.token_hash.size()) +
                           " bytes is over the bound");
  }
  std::vector<uint8_t> bytes = proto::EncodeFields(region);
  rocksdb::Slice value(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("PutRegion", &lock));
  rocksdb::Status s = db_->Put(WriteOpts(true), MakeKey(kRegionPrefix, region.id), value);
  return EndWrite(s, "PutRegion");
}

Status Store::DeleteRegion(uint64_t id) {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("DeleteRegion", &lock));
  rocksdb::Status s = db_->Delete(WriteOpts(true), MakeKey(kRegionPrefix, id));
  return EndWrite(s, "DeleteRegion");
}

Status Store::DeleteRegionAndPages(uint64_t id, uint64_t base, uint64_t size) {
  if (base + size < base) {
    return InvalidArgument(Where("DeleteRegionAndPages", dir_) + "base " + Hex64(base) +
                           " + size wraps");
  }
  rocksdb::WriteBatch batch;
  rocksdb::Status s = batch.Delete(MakeKey(kRegionPrefix, id));
  if (s.ok() && size != 0) {
    s = batch.DeleteRange(MakeKey(kPagePrefix, base), MakeKey(kPagePrefix, base + size));
  }
  if (!s.ok()) return FromRocks(s, "DeleteRegionAndPages", dir_);
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("DeleteRegionAndPages", &lock));
  s = db_->Write(WriteOpts(true), &batch);
  return EndWrite(s, "DeleteRegionAndPages");
}

Result<std::vector<RegionRecord>> Store::LoadRegions() const {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginRead("LoadRegions", &lock));
  std::vector<RegionRecord> regions;
  Status s = ScanPrefix(db_.get(), kRegionPrefix, "LoadRegions", dir_,
                        [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
                          RegionRecord r;
                          DSVM_RETURN_IF_ERROR(DecodeRecord(key, value, &r, "LoadRegions", dir_));
                          DSVM_RETURN_IF_ERROR(CheckKey(key, 8, r.id, "LoadRegions", dir_));
                          regions.push_back(std::move(r));
                          return Status::Ok();
                        });
  if (!s.ok()) return s;
  return regions;
}

Status Store::PutNode(const NodeRecord& node) {
  if (node.id == proto::kNoNode) return InvalidArgument(Where("PutNode", dir_) + "node id 0");
  if (node.address.size() > proto::kMaxAddressLength) {
    return InvalidArgument(Where("PutNode", dir_) + "address of " +
                           std::to_string(node.address.size()) + " bytes is over the bound");
  }
  if (node.transport_address.size() > proto::kMaxBlobLength) {
    return InvalidArgument(Where("PutNode", dir_) + "transport_address of " +
                           std::to_string(node.transport_address.size()) +
                           " bytes is over the bound");
  }
  if (node.live > 1) {
    return InvalidArgument(Where("PutNode", dir_) + "live is " + std::to_string(node.live) +
                           ", not 0 or 1");
  }
  std::vector<uint8_t> bytes = proto::EncodeFields(node);
  rocksdb::Slice value(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("PutNode", &lock));
  rocksdb::Status s = db_->Put(WriteOpts(true), MakeKey(kNodePrefix, node.id), value);
  return EndWrite(s, "PutNode");
}

Status Store::DeleteNode(uint32_t id) {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("DeleteNode", &lock));
  rocksdb::Status s = db_->Delete(WriteOpts(true), MakeKey(kNodePrefix, id));
  return EndWrite(s, "DeleteNode");
}

Result<std::vector<NodeRecord>> Store::LoadNodes() const {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginRead("LoadNodes", &lock));
  std::vector<NodeRecord> nodes;
  Status s = ScanPrefix(db_.get(), kNodePrefix, "LoadNodes", dir_,
                        [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
                          NodeRecord n;
                          DSVM_RETURN_IF_ERROR(DecodeRecord(key, value, &n, "LoadNodes", dir_));
                          DSVM_RETURN_IF_ERROR(CheckKey(key, 4, n.id, "LoadNodes", dir_));
                          nodes.push_back(std::move(n));
                          return Status::Ok();
                        });
  if (!s.ok()) return s;
  return nodes;
}

Status Store::WriteDirectory(const std::vector<PageRecord>& records) {
  if (records.empty()) return Status::Ok();
  rocksdb::WriteBatch batch;
  std::vector<uint8_t> bytes;
  for (const PageRecord& r : records) {
    // An enum the Reader refuses (state kReserved, say) would make the store
    // unloadable at the next start; refuse it now, while the caller can react.
    // The Checker applies the Reader's rules without decoding the bytes.
    proto::Checker check;
    const_cast<PageRecord&>(r).Visit(check);  // Visit() is shared with Reader, hence not const
    if (!check.ok()) {
      return InvalidArgument(Where("WriteDirectory", dir_) + "record of page " + Hex64(r.page) +
                             " would not load back (" + check.error() + "); nothing written");
    }
    bytes.clear();
    proto::Writer w(&bytes);
    const_cast<PageRecord&>(r).Visit(w);
    rocksdb::Slice value(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    rocksdb::Status s = batch.Put(MakeKey(kPagePrefix, r.page), value);
    if (!s.ok()) return FromRocks(s, "WriteDirectory", dir_);
  }
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("WriteDirectory", &lock));
  rocksdb::Status s = db_->Write(WriteOpts(options_.sync_directory), &batch);
  return EndWrite(s, "WriteDirectory");
}

Status Store::DeleteDirectoryRange(uint64_t begin, uint64_t end) {
  if (begin > end) {
    return InvalidArgument(Where("DeleteDirectoryRange", dir_) + "begin " + Hex64(begin) +
                           " is after end " + Hex64(end));
  }
  if (begin == end) return Status::Ok();
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginWrite("DeleteDirectoryRange", &lock));
  rocksdb::Status s =
      db_->DeleteRange(WriteOpts(options_.sync_directory), db_->DefaultColumnFamily(),
                       MakeKey(kPagePrefix, begin), MakeKey(kPagePrefix, end));
  return EndWrite(s, "DeleteDirectoryRange");
}

Status Store::LoadDirectory(const std::function<Status(const PageRecord&)>& each) const {
  ReadLock lock;
  DSVM_RETURN_IF_ERROR(BeginRead("LoadDirectory", &lock));
  PageRecord r;  // reused: decoding assigns every field
  return ScanPrefix(db_.get(), kPagePrefix, "LoadDirectory", dir_,
                    [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
                      DSVM_RETURN_IF_ERROR(DecodeRecord(key, value, &r, "LoadDirectory", dir_));
                      DSVM_RETURN_IF_ERROR(CheckKey(key, 8, r.page, "LoadDirectory", dir_));
                      return each(r);
                    });
}

}  // namespace dsvm::coordinator
