// Tests of coordinator::Store: round trips across reopen, the epoch rule,
// directory range deletes, refusal of corrupt or foreign stores, and the
// kill -9 durability rule for unsynced directory batches.
#include "coordinator/storage/store.h"

#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "proto/wire.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"

namespace dsvm::coordinator {
namespace {

// Contains(message, part): the failure shows the whole message.
::testing::AssertionResult Contains(const std::string& message, const std::string& part) {
  if (message.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << message << "\" lacks \"" << part << "\"";
}

constexpr uint64_t kPage = 4096;

// Key layout documented in store.h; written here independently so a change
// of layout (which needs a format version bump) breaks these tests.
std::string BigEndianKey(char prefix, uint64_t id, int bytes) {
  std::string key(1, prefix);
  for (int i = bytes - 1; i >= 0; --i) key.push_back(static_cast<char>(id >> (8 * i)));
  return key;
}
std::string PageKey(uint64_t page) { return BigEndianKey('p', page, 8); }

template <typename T>
std::string Encoded(const T& v) {
  std::vector<uint8_t> b = proto::EncodeFields(v);
  return std::string(b.begin(), b.end());
}

PageRecord MakePage(uint64_t page, uint64_t version) {
  PageRecord r;
  r.page = page;
  r.state = version % 2 ? proto::PageState::kShared : proto::PageState::kModified;
  r.owner = 2;
  r.sharers.push_back(Sharer{2, version});
  if (r.state == proto::PageState::kShared) r.sharers.push_back(Sharer{3, version + 1});
  r.version = version;
  r.txn = version * 3;
  r.busy = version % 3 == 0;
  if (r.busy) {
    r.tx.txn = r.txn;
    r.tx.requester = 3;
    r.tx.request_seq = version + 7;
    r.tx.source = proto::DataSource::kOwner;
    r.tx.fetch_from = 2;
    r.tx.pending_acks = {3, 4};
  }
  return r;
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/dsvm_store_test.XXXXXX";
    char* root = ::mkdtemp(tmpl);
    ASSERT_NE(root, nullptr);
    root_ = root;
    dir_ = root_ + "/store";
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }

  std::unique_ptr<Store> OpenOk(StoreOptions options = {}) {
    Result<std::unique_ptr<Store>> r = Store::Open(dir_, options);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return nullptr;
    return std::move(r).value();
  }

  // Writes raw bytes under `key` with RocksDB directly, as damage would.
  void PutRaw(const std::string& key, const std::string& value) {
    rocksdb::Options options;
    options.create_if_missing = true;
    rocksdb::DB* db = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(options, dir_, &db);
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::unique_ptr<rocksdb::DB> owned(db);
    s = owned->Put(rocksdb::WriteOptions(), key, value);
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = owned->Close();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  std::map<uint64_t, std::string> LoadAll(Store& store) {
    std::map<uint64_t, std::string> pages;
    std::vector<uint64_t> order;
    Status s = store.LoadDirectory([&](const PageRecord& r) {
      order.push_back(r.page);
      pages[r.page] = Encoded(r);
      return Status::Ok();
    });
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(std::is_sorted(order.begin(), order.end()));
    EXPECT_EQ(order.size(), pages.size()) << "a page was streamed twice";
    return pages;
  }

  std::string root_;
  std::string dir_;
};

TEST_F(StoreTest, NewStoreHasDefaultMetaAndEpochOne) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->epoch(), 1u);
  Result<Meta> meta = store->LoadMeta();
  ASSERT_TRUE(meta.ok()) << meta.status().ToString();
  EXPECT_EQ(meta->format, kStoreFormatVersion);
  EXPECT_EQ(meta->epoch, 1u);
  EXPECT_EQ(meta->next_region_id, 1u);
  EXPECT_EQ(meta->next_node_id, 1u);
}

TEST_F(StoreTest, EpochIncreasesByExactlyOnePerOpen) {
  for (uint64_t expected = 1; expected <= 5; ++expected) {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->epoch(), expected);
    Result<Meta> meta = store->LoadMeta();
    ASSERT_TRUE(meta.ok()) << meta.status().ToString();
    EXPECT_EQ(meta->epoch, expected);
    if (expected % 2 == 0) {
      ASSERT_TRUE(store->Close().ok());  // the others close in the destructor
    }
  }
}

TEST_F(StoreTest, MetaRoundTripsAcrossReopen) {
  {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    Meta meta;
    meta.epoch = store->epoch();
    meta.next_region_id = 42;
    meta.next_node_id = 0x1234567890ull;
    ASSERT_TRUE(store->PutMeta(meta).ok());
  }
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Result<Meta> meta = store->LoadMeta();
  ASSERT_TRUE(meta.ok()) << meta.status().ToString();
  EXPECT_EQ(meta->format, kStoreFormatVersion);
  EXPECT_EQ(meta->epoch, 2u);
  EXPECT_EQ(meta->next_region_id, 42u);
  EXPECT_EQ(meta->next_node_id, 0x1234567890ull);
}

TEST_F(StoreTest, PutMetaRefusesAnotherFormat) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Meta meta;
  meta.format = kStoreFormatVersion + 1;
  EXPECT_EQ(store->PutMeta(meta).code(), StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, RegionsRoundTripAcrossReopen) {
  RegionRecord a{5, "alpha", 0x7f0000000000ull, 1 << 20, 4096, 1000, 100, 0640,
                 std::string("h\0sh", 4), 1};
  RegionRecord b{1, std::string(proto::kMaxNameLength, 'n'), 0x10000, 2u << 21, 2u << 20, 0, 0,
                 0600, std::string(kMaxTokenHashLength, 'x'), 1};
  RegionRecord c{300, "gone", 0x20000, 4096, 4096, 1, 1, 0644, "t", 1};
  {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutRegion(a).ok());
    ASSERT_TRUE(store->PutRegion(b).ok());
    ASSERT_TRUE(store->PutRegion(c).ok());
    a.size = 2 << 20;  // replaces the record with the same id
    ASSERT_TRUE(store->PutRegion(a).ok());
    ASSERT_TRUE(store->DeleteRegion(300).ok());
    ASSERT_TRUE(store->DeleteRegion(999).ok());  // absent: still OK
  }
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Result<std::vector<RegionRecord>> regions = store->LoadRegions();
  ASSERT_TRUE(regions.ok()) << regions.status().ToString();
  ASSERT_EQ(regions->size(), 2u);
  EXPECT_EQ(Encoded((*regions)[0]), Encoded(b));  // id order
  EXPECT_EQ(Encoded((*regions)[1]), Encoded(a));
}

TEST_F(StoreTest, PutRegionRefusesBadRecords) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  RegionRecord r{0, "zero", 0, 4096, 4096, 0, 0, 0600, "", 1};
  EXPECT_EQ(store->PutRegion(r).code(), StatusCode::kInvalidArgument);
  r.id = 1;
  r.name.assign(proto::kMaxNameLength + 1, 'n');
  EXPECT_EQ(store->PutRegion(r).code(), StatusCode::kInvalidArgument);
  r.name = "ok";
  r.token_hash.assign(kMaxTokenHashLength + 1, 't');
  EXPECT_EQ(store->PutRegion(r).code(), StatusCode::kInvalidArgument);
  Result<std::vector<RegionRecord>> regions = store->LoadRegions();
  ASSERT_TRUE(regions.ok());
  EXPECT_TRUE(regions->empty());
}

TEST_F(StoreTest, NodesRoundTripAcrossReopen) {
  NodeRecord a{7, "10.0.0.7:7000", 64ull << 30, 8, {1, 2, 3, 0, 255}, 1};
  NodeRecord b{2, "10.0.0.2:7000", 16ull << 30, 0,
               std::vector<uint8_t>(proto::kMaxBlobLength, 0xab), 0};
  NodeRecord c{0xfffffffe, "h:1", 1, 1, {}, 1};
  {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutNode(a).ok());
    ASSERT_TRUE(store->PutNode(b).ok());
    ASSERT_TRUE(store->PutNode(c).ok());
    ASSERT_TRUE(store->DeleteNode(0xfffffffe).ok());
    a.live = 0;
    ASSERT_TRUE(store->PutNode(a).ok());
  }
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Result<std::vector<NodeRecord>> nodes = store->LoadNodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status().ToString();
  ASSERT_EQ(nodes->size(), 2u);
  EXPECT_EQ(Encoded((*nodes)[0]), Encoded(b));
  EXPECT_EQ(Encoded((*nodes)[1]), Encoded(a));

  NodeRecord bad = a;
  bad.live = 2;
  EXPECT_EQ(store->PutNode(bad).code(), StatusCode::kInvalidArgument);
  bad = a;
  bad.id = 0;
  EXPECT_EQ(store->PutNode(bad).code(), StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, UnsyncedDirectoryRoundTripsAcrossReopenInAddressOrder) {
  // Addresses chosen so that little-endian keys would stream out of order.
  const std::vector<uint64_t> addrs = {0x100000, 0x1000, 0x8000000000000000ull, 0x2000,
                                       0xfffffffff000ull, 0x0};
  std::map<uint64_t, std::string> expected;
  {
    StoreOptions options;
    options.sync_directory = false;
    auto store = OpenOk(options);
    ASSERT_NE(store, nullptr);
    std::vector<PageRecord> batch;
    for (size_t i = 0; i < addrs.size(); ++i) batch.push_back(MakePage(addrs[i], i + 1));
    ASSERT_TRUE(store->WriteDirectory(batch).ok());
    // A later batch replaces records; the last record of a page in a batch wins.
    std::vector<PageRecord> second = {MakePage(0x2000, 50), MakePage(0x2000, 51),
                                      MakePage(0x3000, 52)};
    ASSERT_TRUE(store->WriteDirectory(second).ok());
    ASSERT_TRUE(store->WriteDirectory({}).ok());
    for (const PageRecord& r : batch) expected[r.page] = Encoded(r);
    expected[0x2000] = Encoded(MakePage(0x2000, 51));
    expected[0x3000] = Encoded(MakePage(0x3000, 52));
  }
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(LoadAll(*store), expected);
}

// The memtable is an unsorted vector while the store serves (store.cc); a
// load from the same open store must still stream the newest record of each
// page, in address order.
TEST_F(StoreTest, LoadWithoutReopenSeesNewestRecordsInAddressOrder) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  std::map<uint64_t, std::string> expected;
  for (uint64_t round = 1; round <= 3; ++round) {
    std::vector<PageRecord> batch;
    for (uint64_t i = 0; i < 64; ++i) {
      uint64_t page = ((i * 37) % 64) << 12;  // written out of address order
      batch.push_back(MakePage(page, round * 100 + i));
      expected[page] = Encoded(batch.back());
    }
    ASSERT_TRUE(store->WriteDirectory(batch).ok());
  }
  EXPECT_EQ(LoadAll(*store), expected);
}

TEST_F(StoreTest, SyncedDirectoryRoundTripsAcrossReopen) {
  StoreOptions options;
  options.sync_directory = true;
  {
    auto store = OpenOk(options);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->WriteDirectory({MakePage(0x1000, 1), MakePage(0x5000, 2)}).ok());
  }
  auto store = OpenOk(options);
  ASSERT_NE(store, nullptr);
  std::map<uint64_t, std::string> expected = {{0x1000, Encoded(MakePage(0x1000, 1))},
                                              {0x5000, Encoded(MakePage(0x5000, 2))}};
  EXPECT_EQ(LoadAll(*store), expected);
}

TEST_F(StoreTest, DeleteDirectoryRangeRemovesExactlyTheRange) {
  std::map<uint64_t, std::string> expected;
  {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    std::vector<PageRecord> batch;
    for (uint64_t i = 0; i < 20; ++i) batch.push_back(MakePage(i * kPage, i + 1));
    ASSERT_TRUE(store->WriteDirectory(batch).ok());
    // [5, 10) pages: page 5 (== begin) goes, page 10 (== end) stays.
    ASSERT_TRUE(store->DeleteDirectoryRange(5 * kPage, 10 * kPage).ok());
    ASSERT_TRUE(store->DeleteDirectoryRange(3 * kPage, 3 * kPage).ok());  // empty: no-op
    EXPECT_EQ(store->DeleteDirectoryRange(12 * kPage, 11 * kPage).code(),
              StatusCode::kInvalidArgument);
    for (uint64_t i = 0; i < 20; ++i) {
      if (i < 5 || i >= 10) expected[i * kPage] = Encoded(batch[i]);
    }
    EXPECT_EQ(LoadAll(*store), expected);
    // A page written after the delete, inside the range, is kept.
    ASSERT_TRUE(store->WriteDirectory({MakePage(7 * kPage, 99)}).ok());
    expected[7 * kPage] = Encoded(MakePage(7 * kPage, 99));
  }
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(LoadAll(*store), expected);
}

TEST_F(StoreTest, WriteDirectoryRefusesRecordThatWouldNotLoad) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  // Each breaks one rule the decoder enforces, at the top or in the nested
  // transaction.
  std::vector<std::function<void(PageRecord&)>> breaks = {
      [](PageRecord& r) { r.state = proto::PageState::kReserved; },  // value 0
      [](PageRecord& r) { r.state = static_cast<proto::PageState>(proto::kMaxPageState + 1); },
      [](PageRecord& r) { r.busy = 2; },  // a flag is 0 or 1
      [](PageRecord& r) { r.tx.source = static_cast<proto::DataSource>(proto::kMaxDataSource + 1); },
      [](PageRecord& r) { r.tx.grant_sent = 7; },
  };
  for (size_t i = 0; i < breaks.size(); ++i) {
    PageRecord bad = MakePage(0x2000, 2);
    breaks[i](bad);
    Status s = store->WriteDirectory({MakePage(0x1000, 1), bad});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << i;
    EXPECT_TRUE(Contains(s.message(), "0x2000")) << i << ": " << s.message();
    EXPECT_TRUE(LoadAll(*store).empty()) << i << ": part of a refused batch was written";
  }
}

TEST_F(StoreTest, LoadDirectoryStopsAtCallbackError) {
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(
      store->WriteDirectory({MakePage(0x1000, 1), MakePage(0x2000, 2), MakePage(0x3000, 4)})
          .ok());
  int calls = 0;
  Status s = store->LoadDirectory([&](const PageRecord& r) {
    ++calls;
    return r.page == 0x2000 ? Unavailable("stop here") : Status::Ok();
  });
  EXPECT_EQ(s, Unavailable("stop here"));
  EXPECT_EQ(calls, 2);
}

TEST_F(StoreTest, CorruptDirectoryRecordIsCorruptionNamingTheKey) {
  {
    auto store = OpenOk();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->WriteDirectory({MakePage(0x1000, 1), MakePage(0x5000, 2)}).ok());
  }
  PutRaw(PageKey(0x3000), std::string("\x01\x02\xff garbage", 11));
  auto store = OpenOk();  // metadata is intact; only the directory is damaged
  ASSERT_NE(store, nullptr);
  Status s = store->LoadDirectory([](const PageRecord&) { return Status::Ok(); });
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(s.message(), "p/0000000000003000"));
  EXPECT_TRUE(Contains(s.message(), dir_));
}

TEST_F(StoreTest, DirectoryRecordUnderAnotherPagesKeyIsCorruption) {
  { ASSERT_NE(OpenOk(), nullptr); }
  PutRaw(PageKey(0x6000), Encoded(MakePage(0x5000, 1)));
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Status s = store->LoadDirectory([](const PageRecord&) { return Status::Ok(); });
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(s.message(), "p/0000000000006000"));
}

TEST_F(StoreTest, DirectoryKeyOfWrongLengthIsCorruption) {
  { ASSERT_NE(OpenOk(), nullptr); }
  PutRaw(std::string("p\x01\x02", 3), Encoded(MakePage(0x5000, 1)));
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Status s = store->LoadDirectory([](const PageRecord&) { return Status::Ok(); });
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(s.message(), "p/0102"));
}

TEST_F(StoreTest, CorruptRegionAndNodeRecordsAreCorruption) {
  { ASSERT_NE(OpenOk(), nullptr); }
  PutRaw(BigEndianKey('r', 9, 8), "xx");
  PutRaw(BigEndianKey('n', 4, 4), std::string(3, '\0'));
  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  Result<std::vector<RegionRecord>> regions = store->LoadRegions();
  ASSERT_FALSE(regions.ok());
  EXPECT_EQ(regions.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(regions.status().message(), "r/0000000000000009"));
  Result<std::vector<NodeRecord>> nodes = store->LoadNodes();
  ASSERT_FALSE(nodes.ok());
  EXPECT_EQ(nodes.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(nodes.status().message(), "n/00000004"));
}

TEST_F(StoreTest, UnknownFormatVersionIsRefused) {
  { ASSERT_NE(OpenOk(), nullptr); }
  Meta future;
  future.format = 99;
  future.epoch = 1;
  // A future layout may have more fields: only the leading format is read.
  PutRaw("m", Encoded(future) + "more fields");
  Result<std::unique_ptr<Store>> r = Store::Open(dir_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(r.status().message(), "unknown store format version 99"));
  EXPECT_TRUE(Contains(r.status().message(), dir_));
}

TEST_F(StoreTest, UndecodableMetaIsRefused) {
  { ASSERT_NE(OpenOk(), nullptr); }
  PutRaw("m", "abc");
  Result<std::unique_ptr<Store>> r = Store::Open(dir_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);

  Meta current;
  PutRaw("m", Encoded(current) + "x");  // right version, trailing bytes
  r = Store::Open(dir_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
}

TEST_F(StoreTest, RecordsWithoutMetaAreRefused) {
  PutRaw("some", "other database");
  Result<std::unique_ptr<Store>> r = Store::Open(dir_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(Contains(r.status().message(), "no metadata"));
}

TEST_F(StoreTest, RegularFileIsRefusedWithClearError) {
  FILE* f = std::fopen(dir_.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs("not a store", f);
  std::fclose(f);
  Result<std::unique_ptr<Store>> r = Store::Open(dir_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status().message(), dir_));
  EXPECT_TRUE(Contains(r.status().message(), "not a directory"));
  EXPECT_TRUE(std::filesystem::is_regular_file(dir_));
}

TEST_F(StoreTest, PathUnderARegularFileIsIoError) {
  FILE* f = std::fopen(dir_.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  Result<std::unique_ptr<Store>> r = Store::Open(dir_ + "/sub", {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIoError);
  EXPECT_TRUE(Contains(r.status().message(), dir_ + "/sub"));
}

TEST_F(StoreTest, MissingStoreWithoutCreateIsNotFound) {
  StoreOptions options;
  options.create_if_missing = false;
  Result<std::unique_ptr<Store>> r = Store::Open(dir_, options);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  std::filesystem::create_directory(dir_);
  r = Store::Open(dir_, options);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  { ASSERT_NE(OpenOk(), nullptr); }
  EXPECT_NE(OpenOk(options), nullptr);
}

TEST_F(StoreTest, SecondOpenOfAnOpenStoreIsRefused) {
  auto first = OpenOk();
  ASSERT_NE(first, nullptr);
  Result<std::unique_ptr<Store>> second = Store::Open(dir_, {});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kIoError);
  EXPECT_TRUE(Contains(second.status().message(), dir_));
}

// Reads one 4-byte marker; false at EOF. Fails the test on a 10 s stall.
bool ReadMarker(int fd, uint32_t* marker) {
  size_t got = 0;
  auto* p = reinterpret_cast<char*>(marker);
  while (got < sizeof(*marker)) {
    pollfd pfd{fd, POLLIN, 0};
    int n = ::poll(&pfd, 1, 10000);
    if (n <= 0) {
      ADD_FAILURE() << "no marker from the writer for 10 s";
      return false;
    }
    ssize_t r = ::read(fd, p + got, sizeof(*marker) - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      EXPECT_EQ(got, 0u) << "torn marker";
      return false;
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

// The rule in store.h: a directory batch acknowledged with sync_directory =
// false survives kill -9 of the process; a batch is present whole or not at
// all. The child is forked while this process has no store open, so it
// inherits no RocksDB lock.
TEST_F(StoreTest, AcknowledgedUnsyncedBatchesSurviveKill9) {
  constexpr uint32_t kBatches = 1000000;  // never finishes: it is killed first
  constexpr uint32_t kPerBatch = 16;
  constexpr uint32_t kKillAfter = 300;
  auto page_of = [](uint32_t batch, uint32_t i) {
    return (uint64_t{batch} * kPerBatch + i) * kPage;
  };

  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    StoreOptions options;
    options.sync_directory = false;
    Result<std::unique_ptr<Store>> r = Store::Open(dir_, options);
    if (!r.ok()) ::_exit(2);
    std::vector<PageRecord> batch(kPerBatch);
    for (uint32_t b = 0; b < kBatches; ++b) {
      for (uint32_t i = 0; i < kPerBatch; ++i) batch[i] = MakePage(page_of(b, i), b + 1);
      if (!(*r)->WriteDirectory(batch).ok()) ::_exit(3);
      if (::write(fds[1], &b, sizeof(b)) != sizeof(b)) ::_exit(4);
    }
    ::_exit(5);
  }
  ::close(fds[1]);

  int64_t last_acked = -1;
  uint32_t marker = 0;
  for (uint32_t n = 0; n < kKillAfter && ReadMarker(fds[0], &marker); ++n) {
    EXPECT_EQ(int64_t{marker}, last_acked + 1);
    last_acked = marker;
  }
  ::kill(pid, SIGKILL);
  // Markers already in the pipe were acknowledged before the kill.
  while (ReadMarker(fds[0], &marker)) {
    EXPECT_EQ(int64_t{marker}, last_acked + 1);
    last_acked = marker;
  }
  ::close(fds[0]);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
      << "writer was not killed mid-stream; exit status " << WEXITSTATUS(wstatus);
  ASSERT_GE(last_acked, int64_t{kKillAfter} - 1);

  auto store = OpenOk();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->epoch(), 2u);
  std::map<uint64_t, uint64_t> version_of;
  Status s = store->LoadDirectory([&](const PageRecord& r) {
    version_of[r.page] = r.version;
    return Status::Ok();
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (uint32_t b = 0; b <= static_cast<uint32_t>(last_acked); ++b) {
    for (uint32_t i = 0; i < kPerBatch; ++i) {
      auto it = version_of.find(page_of(b, i));
      ASSERT_NE(it, version_of.end()) << "acknowledged batch " << b << " lost page " << i;
      ASSERT_EQ(it->second, b + 1u);
    }
  }
  // At most the batch written but not yet acknowledged may follow, and whole.
  size_t acked_pages = (static_cast<size_t>(last_acked) + 1) * kPerBatch;
  ASSERT_TRUE(version_of.size() == acked_pages || version_of.size() == acked_pages + kPerBatch)
      << version_of.size() << " pages for " << last_acked + 1 << " acknowledged batches";
  if (version_of.size() > acked_pages) {
    uint32_t b = static_cast<uint32_t>(last_acked) + 1;
    for (uint32_t i = 0; i < kPerBatch; ++i) ASSERT_EQ(version_of.count(page_of(b, i)), 1u);
  }
}

}  // namespace
}  // namespace dsvm::coordinator
