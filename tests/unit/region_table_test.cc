// Unit tests for coordinator::RegionTable and ValidateRegionName
// (coordinator/cluster/region_table.h): name and size validation, placement
// in the cluster-wide window (2 MiB aligned, first fit), overlap refusal and
// address lookup.
#include "coordinator/cluster/region_table.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "proto/shard_map.h"
#include "proto/status.h"

namespace dsvm::coordinator {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGranule = proto::kShardGranule;  // 2 MiB

class RegionTableTest : public ::testing::Test {
 protected:
  // Plans and inserts; returns the record.
  RegionRecord Create(const std::string& name, uint64_t size, uint32_t page_size) {
    Result<RegionRecord> r = table_.Plan(name, size, page_size);
    EXPECT_TRUE(r.ok()) << name << ": " << r.status().ToString();
    if (!r.ok()) return RegionRecord{};
    const Status s = table_.Insert(*r);
    EXPECT_TRUE(s.ok()) << name << ": " << s.ToString();
    return *r;
  }

  RegionTable table_;
  const uint64_t base_ = table_.window().base;
};

TEST(RegionNameTest, Validation) {
  EXPECT_EQ(ValidateRegionName("").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateRegionName(std::string(256, 'a')).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateRegionName(std::string(255, 'a')).ok());
  EXPECT_EQ(ValidateRegionName(".hidden").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateRegionName(".").code(), StatusCode::kInvalidArgument);
  for (const char* bad : {"a/b", "a b", "a:b", "tab\t", "caf\xc3\xa9", "a\n", "x*"}) {
    EXPECT_EQ(ValidateRegionName(bad).code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(ValidateRegionName(std::string("a\0b", 3)).code(), StatusCode::kInvalidArgument);
  for (const char* good : {"a", "Z", "0", "matrix-A_1.bin", "a.", "a..b", "-x", "_"}) {
    EXPECT_TRUE(ValidateRegionName(good).ok()) << good;
  }
}

TEST_F(RegionTableTest, PlanRefusesBadNames) {
  EXPECT_EQ(table_.Plan("", 4096, 4096).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(table_.Plan(".x", 4096, 4096).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(table_.Plan("a b", 4096, 4096).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(RegionTableTest, PageSizes) {
  for (uint32_t ps : {4096u, 65536u, 2097152u}) {
    Result<RegionRecord> r = table_.Plan("r", 1, ps);
    ASSERT_TRUE(r.ok()) << ps << ": " << r.status().ToString();
    EXPECT_EQ(r->page_size, ps);
    EXPECT_EQ(r->size, ps) << "size rounds up to one page";
  }
  for (uint32_t ps : {0u, 1u, 512u, 4095u, 8192u, 16384u, 1048576u, 4194304u}) {
    EXPECT_EQ(table_.Plan("r", 1 << 22, ps).status().code(), StatusCode::kInvalidArgument) << ps;
  }
}

TEST_F(RegionTableTest, SizeZeroAndOversizeRefused) {
  EXPECT_EQ(table_.Plan("r", 0, 4096).status().code(), StatusCode::kInvalidArgument);
  RegionTable small(WindowOptions{base_, 8 * kMiB});
  EXPECT_EQ(small.Plan("r", 8 * kMiB + 1, 4096).status().code(),
            StatusCode::kResourceExhausted);
  Result<RegionRecord> all = small.Plan("r", 8 * kMiB, 4096);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  ASSERT_TRUE(small.Insert(*all).ok());
  EXPECT_EQ(small.Plan("s", 4096, 4096).status().code(), StatusCode::kResourceExhausted);
}

TEST_F(RegionTableTest, PlacementIsAlignedAndReusesFreedRangeFirstFit) {
  const RegionRecord a = Create("a", 1, 4096);
  EXPECT_EQ(a.base, base_);
  EXPECT_EQ(a.size, 4096u);

  const RegionRecord b = Create("b", 3 * kMiB, 65536);  // spans two granules
  EXPECT_EQ(b.base, base_ + kGranule);
  EXPECT_EQ(b.size, 3 * kMiB);

  const RegionRecord c = Create("c", 5000, 4096);
  EXPECT_EQ(c.base, base_ + 3 * kGranule);
  EXPECT_EQ(c.size, 8192u);

  for (const RegionRecord& r : table_.List()) {
    EXPECT_EQ(r.base % kGranule, 0u) << r.name;
    EXPECT_EQ(r.size % r.page_size, 0u) << r.name;
  }

  Result<RegionRecord> removed = table_.Remove("b");
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(removed->base, b.base);
  EXPECT_EQ(table_.FindByName("b"), nullptr);

  // Too large for b's 4 MiB hole: goes after c.
  const RegionRecord d = Create("d", 4 * kMiB + 1, 4096);
  EXPECT_EQ(d.base, base_ + 4 * kGranule);
  EXPECT_EQ(d.size, 4 * kMiB + 4096);
  // Fits the hole exactly: first fit takes it.
  const RegionRecord e = Create("e", 4 * kMiB, proto::kMaxPageSize);
  EXPECT_EQ(e.base, base_ + kGranule);

  std::vector<std::string> names;
  for (const RegionRecord& r : table_.List()) names.push_back(r.name);
  EXPECT_EQ(names, std::vector<std::string>({"a", "e", "c", "d"}));  // address order
}

TEST_F(RegionTableTest, InsertRefusesOverlapAndDuplicates) {
  const RegionRecord a = Create("a", 4 * kMiB, 4096);  // [base, base + 4 MiB)

  RegionRecord dup = a;
  dup.base = base_ + 10 * kGranule;
  EXPECT_EQ(table_.Insert(dup).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(table_.Plan("a", 4096, 4096).status().code(), StatusCode::kAlreadyExists);

  RegionRecord r;
  r.name = "r";
  r.page_size = 4096;
  r.size = kGranule;
  r.base = base_;  // same start as a
  EXPECT_EQ(table_.Insert(r).code(), StatusCode::kCorruption);
  r.base = base_ + kGranule;  // inside a
  EXPECT_EQ(table_.Insert(r).code(), StatusCode::kCorruption);
  r.base = base_ + 4 * kGranule;  // free: a new, later region
  ASSERT_TRUE(table_.Insert(r).ok());

  RegionRecord before;  // ends inside r
  before.name = "before";
  before.page_size = 4096;
  before.base = base_ + 3 * kGranule;
  before.size = kGranule + 4096;
  EXPECT_EQ(table_.Insert(before).code(), StatusCode::kCorruption);
  before.size = kGranule;  // ends where r starts: no overlap
  EXPECT_TRUE(table_.Insert(before).ok());

  RegionRecord outside;
  outside.name = "outside";
  outside.page_size = 4096;
  outside.size = kGranule;
  outside.base = base_ - kGranule;
  EXPECT_EQ(table_.Insert(outside).code(), StatusCode::kCorruption);
  outside.base = base_ + table_.window().size;  // past the window's end
  EXPECT_EQ(table_.Insert(outside).code(), StatusCode::kCorruption);
  outside.base = base_ + 20 * kGranule + 4096;  // not granule aligned
  EXPECT_EQ(table_.Insert(outside).code(), StatusCode::kCorruption);

  EXPECT_EQ(table_.List().size(), 3u);
  EXPECT_EQ(table_.Remove("nope").status().code(), StatusCode::kNotFound);
}

TEST_F(RegionTableTest, FindByAddressAtBothEnds) {
  const RegionRecord a = Create("a", 3 * kMiB, 4096);
  const RegionRecord b = Create("b", 4096, 4096);
  ASSERT_EQ(b.base, base_ + 2 * kGranule);

  EXPECT_EQ(table_.FindByAddress(base_ - 1), nullptr);
  ASSERT_NE(table_.FindByAddress(a.base), nullptr);
  EXPECT_EQ(table_.FindByAddress(a.base)->name, "a");
  ASSERT_NE(table_.FindByAddress(a.base + a.size - 1), nullptr);
  EXPECT_EQ(table_.FindByAddress(a.base + a.size - 1)->name, "a");
  EXPECT_EQ(table_.FindByAddress(a.base + a.size), nullptr);  // the alignment gap
  EXPECT_EQ(table_.FindByAddress(b.base - 1), nullptr);
  ASSERT_NE(table_.FindByAddress(b.base), nullptr);
  EXPECT_EQ(table_.FindByAddress(b.base)->name, "b");
  ASSERT_NE(table_.FindByAddress(b.base + 4095), nullptr);
  EXPECT_EQ(table_.FindByAddress(b.base + 4095)->name, "b");
  EXPECT_EQ(table_.FindByAddress(b.base + 4096), nullptr);

  ASSERT_TRUE(table_.Remove("a").ok());
  EXPECT_EQ(table_.FindByAddress(a.base), nullptr);
}

}  // namespace
}  // namespace dsvm::coordinator
