// Unit tests for node::PageStore, the memfd that holds a node's copy of a
// region, and its bounded side area of stashes and retained pages.
#include "node/memory/page_store.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "proto/status.h"

namespace dsvm::node {
namespace {

constexpr PageAddr kBase = 0x200000000000ull;
constexpr uint32_t kPage = 4096;
constexpr uint64_t kPages = 8;

std::vector<uint8_t> Pattern(uint8_t seed, size_t n = kPage) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

std::vector<uint8_t> Read(PageStore& s, PageAddr page) {
  std::vector<uint8_t> v(s.page_size(), 0xee);
  EXPECT_TRUE(s.ReadPage(page, v).ok());
  return v;
}

bool IsZero(const std::vector<uint8_t>& v) {
  for (uint8_t b : v) {
    if (b != 0) return false;
  }
  return true;
}

std::unique_ptr<PageStore> MakeStore(PageStoreOptions options = {}) {
  auto s = PageStore::Create(kBase, kPages * kPage, kPage, options);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return std::move(s).value();
}

bool Present(PageStore& s, PageAddr page) {
  auto r = s.IsPresent(page);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() && *r;
}

TEST(PageStoreTest, CreateRefusesBadGeometry) {
  EXPECT_EQ(PageStore::Create(kBase, kPage, 8192).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(kBase, 0, kPage).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(kBase, kPage + 1, kPage).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(kBase + 512, kPage, kPage).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(0, kPage, kPage).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(~0ull - kPage + 1, 2 * kPage, kPage).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PageStore::Create(kBase, 64 * 1024, 64 * 1024, {.max_stashes = 0}).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(PageStoreTest, RoundTripAndHolesStayHoles) {
  auto s = MakeStore();
  EXPECT_EQ(s->page_count(), kPages);
  EXPECT_GE(s->fd(), 0);
  const PageAddr p = kBase + 3 * kPage;
  EXPECT_TRUE(IsZero(Read(*s, p)));
  EXPECT_FALSE(Present(*s, p)) << "reading a hole must not allocate it";

  ASSERT_TRUE(s->WritePage(p, Pattern(1)).ok());
  EXPECT_EQ(Read(*s, p), Pattern(1));
  EXPECT_TRUE(Present(*s, p));
  EXPECT_FALSE(Present(*s, p + kPage));

  ASSERT_TRUE(s->ZeroPage(p + kPage).ok());
  EXPECT_TRUE(IsZero(Read(*s, p + kPage)));
  EXPECT_TRUE(Present(*s, p + kPage));

  // In-place receive: bytes written through MappedPage are the page's.
  auto view = s->MappedPage(kBase);
  ASSERT_EQ(view.size(), kPage);
  std::memcpy(view.data(), Pattern(9).data(), kPage);
  EXPECT_EQ(Read(*s, kBase), Pattern(9));
}

// Neighbouring pages written at once land where WritePage would put them,
// retained copies of them are dropped, and a wrong size is refused whole.
TEST(PageStoreTest, WritePagesWritesARun) {
  auto s = MakeStore();
  const PageAddr first = kBase + 2 * kPage;
  ASSERT_TRUE(s->WritePage(first + kPage, Pattern(40)).ok());
  ASSERT_TRUE(s->Retain(first + kPage).ok());
  std::vector<std::vector<uint8_t>> bytes = {Pattern(1), Pattern(2), Pattern(3), Pattern(4)};
  std::vector<std::span<const uint8_t>> spans(bytes.begin(), bytes.end());
  ASSERT_TRUE(s->WritePages(first, spans).ok());
  for (size_t i = 0; i < bytes.size(); ++i) EXPECT_EQ(Read(*s, first + i * kPage), bytes[i]) << i;
  EXPECT_FALSE(s->IsRetained(first + kPage));
  EXPECT_TRUE(IsZero(Read(*s, first - kPage)));
  EXPECT_TRUE(IsZero(Read(*s, first + 4 * kPage)));
  std::vector<uint8_t> short_page(kPage - 1);
  std::vector<std::span<const uint8_t>> bad = {Pattern(5), short_page};
  EXPECT_EQ(s->WritePages(kBase, bad).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(IsZero(Read(*s, kBase))) << "nothing of a refused run is written";
  std::vector<std::span<const uint8_t>> past = {Pattern(6), Pattern(7)};
  EXPECT_EQ(s->WritePages(kBase + (kPages - 1) * kPage, past).code(), StatusCode::kInvalidArgument);
}

// The GPU tier's copy threads write pages back at once, and read others.
TEST(PageStoreTest, WriteUnretainedRunsOnSeveralThreadsAtOnce) {
  auto s = MakeStore();
  ASSERT_TRUE(s->WritePage(kBase + 7 * kPage, Pattern(70)).ok());
  std::vector<std::thread> threads;
  std::vector<Status> results(6);
  std::vector<std::vector<uint8_t>> read(6);
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 200 && results[t].ok(); ++round) {
        results[t] = s->WriteUnretained(kBase + t * kPage, Pattern(t + round));
      }
      read[t].resize(kPage);
      if (results[t].ok()) results[t] = s->ReadForCopy(kBase + 7 * kPage, read[t]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < 6; ++t) {
    ASSERT_TRUE(results[t].ok()) << results[t].ToString();
    EXPECT_EQ(Read(*s, kBase + t * kPage), Pattern(t + 199)) << t;
    EXPECT_EQ(read[t], Pattern(70)) << t;
    EXPECT_TRUE(Present(*s, kBase + t * kPage)) << t;
  }
  EXPECT_EQ(s->WriteUnretained(kBase + 3, Pattern(1)).code(), StatusCode::kInvalidArgument);
}

// The copy threads copy through the daemon's mapping once a page is mapped
// there; a read of a hole there would allocate it, so holes must stay holes
// through every path: never mapped by a read, and unmapped by every punch.
TEST(PageStoreTest, CopiesThroughTheMappingLeaveHolesHoles) {
  auto s = MakeStore();
  std::vector<uint8_t> buf(kPage);
  auto read_for_copy = [&](PageAddr page) {
    std::fill(buf.begin(), buf.end(), 0xee);
    EXPECT_TRUE(s->ReadForCopy(page, buf).ok());
    return buf;
  };
  // Page 2 is a hole in a block with pages: neither the block nor it is mapped.
  ASSERT_TRUE(s->WritePage(kBase + kPage, Pattern(1)).ok());
  EXPECT_EQ(read_for_copy(kBase + kPage), Pattern(1));
  EXPECT_TRUE(IsZero(read_for_copy(kBase + 2 * kPage)));
  EXPECT_FALSE(Present(*s, kBase + 2 * kPage));
  EXPECT_FALSE(s->IsMapped(kBase + 2 * kPage));
  // A write-back maps the hole it fills.
  ASSERT_TRUE(s->WriteUnretained(kBase + 3 * kPage, Pattern(3)).ok());
  EXPECT_TRUE(Present(*s, kBase + 3 * kPage));
  if (!s->IsMapped(kBase + 3 * kPage)) {
    GTEST_SKIP() << "this kernel maps no page for copies (MADV_POPULATE_WRITE, Linux 5.14)";
  }
  EXPECT_TRUE(s->IsMapped(kBase + kPage)) << "read: present, so mapped";
  EXPECT_EQ(read_for_copy(kBase + 3 * kPage), Pattern(3));
  // A client's write through its own mapping is seen through the daemon's.
  void* m = mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd(), 0);
  ASSERT_NE(m, MAP_FAILED);
  static_cast<uint8_t*>(m)[3 * kPage + 9] = 99;
  EXPECT_EQ(read_for_copy(kBase + 3 * kPage)[9], 99);
  munmap(m, kPages * kPage);
  // Each punch unmaps: Discard, Retain (whose bytes are still read), DiscardAll.
  ASSERT_TRUE(s->Discard(kBase + kPage).ok());
  EXPECT_FALSE(s->IsMapped(kBase + kPage));
  EXPECT_TRUE(IsZero(read_for_copy(kBase + kPage)));
  EXPECT_FALSE(Present(*s, kBase + kPage));
  ASSERT_TRUE(s->Retain(kBase + 3 * kPage).ok());
  EXPECT_FALSE(s->IsMapped(kBase + 3 * kPage));
  EXPECT_EQ(read_for_copy(kBase + 3 * kPage)[9], 99);
  EXPECT_FALSE(Present(*s, kBase + 3 * kPage));
  ASSERT_TRUE(s->Restore(kBase + 3 * kPage).ok());
  // A block whose every page is present is mapped whole by one read...
  for (uint64_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(s->WritePage(kBase + i * kPage, Pattern(static_cast<uint8_t>(i))).ok());
  }
  EXPECT_EQ(read_for_copy(kBase), Pattern(0));
  for (uint64_t i = 0; i < kPages; ++i) EXPECT_TRUE(s->IsMapped(kBase + i * kPage)) << i;
  // ...and a page of it punched later reads as a hole, through every read.
  ASSERT_TRUE(s->Discard(kBase + 5 * kPage).ok());
  EXPECT_TRUE(IsZero(read_for_copy(kBase + 5 * kPage)));
  EXPECT_TRUE(IsZero(Read(*s, kBase + 5 * kPage)));
  EXPECT_FALSE(Present(*s, kBase + 5 * kPage));
  EXPECT_EQ(read_for_copy(kBase + 6 * kPage), Pattern(6));
  // Writes of a mapped page (the loop's WritePage too) land in the memfd.
  ASSERT_TRUE(s->WritePage(kBase + 6 * kPage, Pattern(60)).ok());
  EXPECT_EQ(Read(*s, kBase + 6 * kPage), Pattern(60));
  ASSERT_TRUE(s->DiscardAll().ok());
  for (uint64_t i = 0; i < kPages; ++i) {
    EXPECT_FALSE(s->IsMapped(kBase + i * kPage)) << i;
    EXPECT_TRUE(IsZero(read_for_copy(kBase + i * kPage))) << i;
    EXPECT_FALSE(Present(*s, kBase + i * kPage)) << i;
  }
  EXPECT_EQ(s->ReadForCopy(kBase + 3, buf).code(), StatusCode::kInvalidArgument);
}

TEST(PageStoreTest, ClientsMappingTheMemfdShareTheBytes) {
  auto s = MakeStore();
  void* m = mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd(), 0);
  ASSERT_NE(m, MAP_FAILED);
  auto* bytes = static_cast<uint8_t*>(m);
  ASSERT_TRUE(s->WritePage(kBase + kPage, Pattern(4)).ok());
  EXPECT_EQ(std::memcmp(bytes + kPage, Pattern(4).data(), kPage), 0);
  bytes[2 * kPage + 5] = 77;
  EXPECT_EQ(Read(*s, kBase + 2 * kPage)[5], 77);
  munmap(m, kPages * kPage);
}

TEST(PageStoreTest, DiscardPunchesAHoleThatReadsZero) {
  auto s = MakeStore();
  const PageAddr p = kBase + kPage;
  ASSERT_TRUE(s->WritePage(p, Pattern(2)).ok());
  ASSERT_TRUE(s->WritePage(p + kPage, Pattern(3)).ok());
  ASSERT_TRUE(s->Discard(p).ok());
  EXPECT_TRUE(IsZero(Read(*s, p)));
  EXPECT_FALSE(Present(*s, p));
  EXPECT_EQ(Read(*s, p + kPage), Pattern(3)) << "the punch reaches one page only";
  EXPECT_TRUE(s->Discard(p).ok()) << "discarding a hole is harmless";
}

TEST(PageStoreTest, StashInstallAndDrop) {
  auto s = MakeStore();
  const PageAddr p = kBase + 2 * kPage;
  ASSERT_TRUE(s->WritePage(p, Pattern(5)).ok());
  ASSERT_TRUE(s->Stash(p, 7).ok());
  EXPECT_TRUE(s->HasStash(p, 7));
  EXPECT_EQ(s->stash_count(), 1u);
  EXPECT_FALSE(Present(*s, p)) << "stashing moves the bytes out of the memfd";
  EXPECT_TRUE(IsZero(Read(*s, p)));
  EXPECT_EQ(s->Stash(p, 7).code(), StatusCode::kAlreadyExists);

  std::vector<uint8_t> out(kPage);
  ASSERT_TRUE(s->ReadStash(p, 7, out).ok());
  EXPECT_EQ(out, Pattern(5));
  EXPECT_EQ(s->ReadStash(p, 8, out).code(), StatusCode::kNotFound);

  ASSERT_TRUE(s->InstallStash(p, 7).ok());
  EXPECT_EQ(Read(*s, p), Pattern(5));
  EXPECT_TRUE(Present(*s, p));
  EXPECT_EQ(s->stash_count(), 0u);
  EXPECT_EQ(s->InstallStash(p, 7).code(), StatusCode::kNotFound);

  ASSERT_TRUE(s->Stash(p, 9).ok());
  ASSERT_TRUE(s->DropStash(p, 9).ok());
  EXPECT_EQ(s->stash_count(), 0u);
  EXPECT_EQ(s->DropStash(p, 9).code(), StatusCode::kNotFound);
  EXPECT_TRUE(IsZero(Read(*s, p)));
}

TEST(PageStoreTest, RetainKeepsBytesAwayFromTheMemfd) {
  auto s = MakeStore();
  const PageAddr p = kBase + 4 * kPage;
  ASSERT_TRUE(s->WritePage(p, Pattern(6)).ok());
  ASSERT_TRUE(s->Retain(p).ok());
  ASSERT_TRUE(s->Retain(p).ok()) << "idempotent";
  EXPECT_TRUE(s->IsRetained(p));
  EXPECT_FALSE(Present(*s, p));
  EXPECT_EQ(Read(*s, p), Pattern(6)) << "the page's bytes are the retained ones";

  ASSERT_TRUE(s->Restore(p).ok());
  EXPECT_FALSE(s->IsRetained(p));
  EXPECT_TRUE(Present(*s, p));
  EXPECT_EQ(Read(*s, p), Pattern(6));

  // A stash of a retained page takes the retained bytes.
  ASSERT_TRUE(s->Retain(p).ok());
  ASSERT_TRUE(s->Stash(p, 3).ok());
  EXPECT_FALSE(s->IsRetained(p));
  EXPECT_EQ(s->side_count(), 1u);
  std::vector<uint8_t> out(kPage);
  ASSERT_TRUE(s->ReadStash(p, 3, out).ok());
  EXPECT_EQ(out, Pattern(6));

  // Writing a page replaces retained bytes; discarding drops them.
  ASSERT_TRUE(s->WritePage(p + kPage, Pattern(1)).ok());
  ASSERT_TRUE(s->Retain(p + kPage).ok());
  ASSERT_TRUE(s->WritePage(p + kPage, Pattern(2)).ok());
  EXPECT_FALSE(s->IsRetained(p + kPage));
  EXPECT_EQ(Read(*s, p + kPage), Pattern(2));
  ASSERT_TRUE(s->Retain(p + kPage).ok());
  ASSERT_TRUE(s->Discard(p + kPage).ok());
  EXPECT_FALSE(s->IsRetained(p + kPage));
  EXPECT_TRUE(IsZero(Read(*s, p + kPage)));
}

TEST(PageStoreTest, StashesAreBoundedAndRetainedPagesAreNot) {
  auto s = MakeStore({.max_stashes = 2});
  for (uint64_t i = 0; i < kPages; ++i) ASSERT_TRUE(s->WritePage(kBase + i * kPage, Pattern(i)).ok());
  ASSERT_TRUE(s->Stash(kBase, 1).ok());
  ASSERT_TRUE(s->Stash(kBase + kPage, 1).ok());
  EXPECT_EQ(s->Stash(kBase + 2 * kPage, 1).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(Read(*s, kBase + 2 * kPage), Pattern(2)) << "a refused stash leaves the page alone";
  // Every other page can be retained, past the stashes' bound.
  for (uint64_t i = 2; i < kPages; ++i) ASSERT_TRUE(s->Retain(kBase + i * kPage).ok()) << i;
  EXPECT_EQ(s->retained_count(), kPages - 2);
  // Moving a retained page into a stash needs no room.
  ASSERT_TRUE(s->Stash(kBase + 2 * kPage, 2).ok());
  EXPECT_EQ(s->stash_count(), 3u);
  for (uint64_t i = 3; i < kPages; ++i) {
    ASSERT_TRUE(s->Restore(kBase + i * kPage).ok());
    EXPECT_EQ(Read(*s, kBase + i * kPage), Pattern(i)) << i;
  }
}

// RetainRange moves runs of pages aside as Retain moves one: their bytes
// kept, the memfd's pages punched; pages retained already are left alone.
TEST(PageStoreTest, RetainRangeRetainsEveryPageOfTheRange) {
  auto s = MakeStore();
  for (uint64_t i = 0; i < kPages; ++i) ASSERT_TRUE(s->WritePage(kBase + i * kPage, Pattern(i)).ok());
  ASSERT_TRUE(s->Retain(kBase + 3 * kPage).ok());
  ASSERT_TRUE(s->WritePage(kBase + 3 * kPage, Pattern(30)).ok());  // present again, new bytes
  ASSERT_TRUE(s->Retain(kBase + 3 * kPage).ok());
  ASSERT_TRUE(s->Discard(kBase + 5 * kPage).ok());                   // a hole
  ASSERT_TRUE(s->RetainRange(kBase + kPage, kPages - 2).ok());
  EXPECT_FALSE(s->IsRetained(kBase));
  EXPECT_FALSE(s->IsRetained(kBase + (kPages - 1) * kPage));
  EXPECT_EQ(s->retained_count(), kPages - 2);
  for (uint64_t i = 1; i < kPages - 1; ++i) {
    const PageAddr p = kBase + i * kPage;
    EXPECT_TRUE(s->IsRetained(p)) << i;
    EXPECT_FALSE(Present(*s, p)) << i;
    const std::vector<uint8_t> expect = i == 3 ? Pattern(30) : i == 5 ? std::vector<uint8_t>(kPage) : Pattern(i);
    EXPECT_EQ(Read(*s, p), expect) << i;
    ASSERT_TRUE(s->Restore(p).ok());
    EXPECT_EQ(Read(*s, p), expect) << i;
  }
  EXPECT_TRUE(Present(*s, kBase)) << "outside the range";
  EXPECT_EQ(s->RetainRange(kBase + kPage, kPages).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(s->RetainRange(kBase, 0).ok());
}

TEST(PageStoreTest, AddressesAreValidated) {
  auto s = MakeStore();
  std::vector<uint8_t> buf(kPage);
  const PageAddr end = kBase + kPages * kPage;
  for (PageAddr bad : {kBase - kPage, end, end + kPage, kBase + 1, kBase + kPage / 2}) {
    Status st = s->ReadPage(bad, buf);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("page 0x"), std::string::npos) << st.message();
    EXPECT_EQ(s->WritePage(bad, buf).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->ZeroPage(bad).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->Discard(bad).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->Stash(bad, 1).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->InstallStash(bad, 1).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->DropStash(bad, 1).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->Retain(bad).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->Restore(bad).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->IsPresent(bad).status().code(), StatusCode::kInvalidArgument);
  }
  std::vector<uint8_t> small(kPage - 1);
  EXPECT_EQ(s->ReadPage(kBase, small).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s->WritePage(kBase, small).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s->ReadStash(kBase, 1, small).code(), StatusCode::kInvalidArgument);
}

constexpr uint32_t kHuge = 2u << 20;

// Two pages of 2 MiB, hugetlb-backed where the machine has them reserved.
std::unique_ptr<PageStore> MakeTwoMiBStore() {
  auto s = PageStore::Create(kBase, 2 * kHuge, kHuge);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  if (s.ok()) std::printf("2 MiB pages backed by %s\n", (*s)->hugetlb() ? "hugetlb" : "a plain memfd");
  return s.ok() ? std::move(s).value() : nullptr;
}

TEST(PageStoreTest, TwoMiBPagesWorkWithOrWithoutHugetlb) {
  auto s = MakeTwoMiBStore();
  ASSERT_NE(s, nullptr);
  const PageAddr p = kBase + kHuge;
  ASSERT_TRUE(s->WritePage(p, Pattern(3, kHuge)).ok());
  EXPECT_EQ(Read(*s, p), Pattern(3, kHuge));
  EXPECT_TRUE(Present(*s, p));
  std::vector<uint8_t> buf(kHuge);
  EXPECT_EQ(s->ReadPage(kBase + 4096, buf).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(s->Discard(p).ok());
  EXPECT_FALSE(Present(*s, p));
  EXPECT_TRUE(IsZero(Read(*s, p)));
}


// --- Zero-copy views (page_views.h) -------------------------------------------

std::vector<uint8_t> Copy(const uint8_t* bytes, size_t n = kPage) {
  return std::vector<uint8_t>(bytes, bytes + n);
}

TEST(PageStoreViewsTest, ASendViewIsThePageAndKeepsItsBytesWhenThePageChanges) {
  auto s = MakeStore();
  const PageAddr p = kBase + kPage;
  // Only a present page that is not retained can be lent.
  EXPECT_EQ(s->LendForSend(p).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(Present(*s, p));  // and asking allocated nothing
  ASSERT_TRUE(s->WritePage(p, Pattern(1)).ok());
  auto lent = s->LendForSend(p);
  ASSERT_TRUE(lent.ok()) << lent.status().ToString();
  EXPECT_EQ(Copy(lent->get()), Pattern(1));
  EXPECT_EQ(s->view_count(), 1u);

  // A write detaches the view: the send still reads the bytes it was lent.
  ASSERT_TRUE(s->WritePage(p, Pattern(2)).ok());
  EXPECT_EQ(s->view_count(), 0u);
  EXPECT_EQ(s->views_detached(), 1u);
  EXPECT_EQ(Copy(lent->get()), Pattern(1));
  EXPECT_EQ(Read(*s, p), Pattern(2));

  // A punch detaches too, and reading the view does not bring the page back.
  auto again = s->LendForSend(p);
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE(s->Discard(p).ok());
  EXPECT_EQ(Copy(again->get()), Pattern(2));
  EXPECT_FALSE(Present(*s, p));
  lent->reset();
  again->reset();
  EXPECT_FALSE(Present(*s, p));

  ASSERT_TRUE(s->WritePage(p, Pattern(3)).ok());
  ASSERT_TRUE(s->Retain(p).ok());
  EXPECT_EQ(s->LendForSend(p).status().code(), StatusCode::kFailedPrecondition);
}

TEST(PageStoreViewsTest, StashRetainAndDiscardAllDetachViews) {
  auto s = MakeStore();
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(s->WritePage(kBase + i * kPage, Pattern(static_cast<uint8_t>(10 + i))).ok());
  }
  auto a = s->LendForSend(kBase);
  auto b = s->LendForSend(kBase + kPage);
  auto c = s->LendForSend(kBase + 2 * kPage);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_TRUE(s->Stash(kBase, 7).ok());
  ASSERT_TRUE(s->RetainRange(kBase + kPage, 1).ok());
  EXPECT_EQ(s->view_count(), 1u);
  ASSERT_TRUE(s->DiscardAll().ok());
  EXPECT_EQ(s->view_count(), 0u);
  EXPECT_EQ(Copy(a->get()), Pattern(10));
  EXPECT_EQ(Copy(b->get()), Pattern(11));
  EXPECT_EQ(Copy(c->get()), Pattern(12));
  for (uint64_t i = 0; i < 3; ++i) EXPECT_FALSE(Present(*s, kBase + i * kPage));
}

TEST(PageStoreViewsTest, APageReceivedInPlaceIsInstalledByAdoptingIt) {
  auto s = MakeStore();
  const PageAddr p = kBase + 2 * kPage;
  auto view = s->ReceiveInPlace(p);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  // One receiver, and no sender meanwhile.
  EXPECT_EQ(s->ReceiveInPlace(p).status().code(), StatusCode::kFailedPrecondition);
  const std::vector<uint8_t> bytes = Pattern(4);
  std::memcpy(view->get(), bytes.data(), kPage);
  EXPECT_EQ(s->LendForSend(p).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(s->Adopt(p, view->get() + 1));
  EXPECT_FALSE(s->Adopt(p + kPage, view->get()));
  EXPECT_TRUE(s->Adopt(p, view->get()));
  view->reset();
  EXPECT_TRUE(Present(*s, p));
  EXPECT_EQ(Read(*s, p), bytes);
  // A present page is not received in place.
  EXPECT_EQ(s->ReceiveInPlace(p).status().code(), StatusCode::kFailedPrecondition);
}

TEST(PageStoreViewsTest, APageReceivedInPlaceButNotAdoptedIsAHoleAgain) {
  auto s = MakeStore();
  const PageAddr p = kBase + 3 * kPage;
  {
    auto view = s->ReceiveInPlace(p);
    ASSERT_TRUE(view.ok());
    std::memcpy(view->get(), Pattern(5).data(), kPage);
    EXPECT_TRUE(Present(*s, p));  // present while it arrives
  }
  EXPECT_FALSE(Present(*s, p));
  EXPECT_EQ(s->view_count(), 0u);
}

TEST(PageStoreViewsTest, AnInstallDuringAReceiveInPlaceWinsAndTheReceiveGoesElsewhere) {
  auto s = MakeStore();
  const PageAddr p = kBase + 4 * kPage;
  auto view = s->ReceiveInPlace(p);
  ASSERT_TRUE(view.ok());
  EXPECT_TRUE(s->HasView(p));
  EXPECT_TRUE(s->ReceivedIntact(view->get()));
  ASSERT_TRUE(s->WritePage(p, Pattern(6)).ok());  // detaches the view
  EXPECT_FALSE(s->HasView(p));
  // What it holds is not to be used: it was detached before it was all in.
  EXPECT_FALSE(s->ReceivedIntact(view->get()));
  std::memcpy(view->get(), Pattern(7).data(), kPage);
  EXPECT_FALSE(s->Adopt(p, view->get()));
  const uint8_t* was = view->get();
  view->reset();  // detached: no punch
  EXPECT_TRUE(s->ReceivedIntact(was));  // forgotten with the view
  EXPECT_TRUE(Present(*s, p));
  EXPECT_EQ(Read(*s, p), Pattern(6));
}

TEST(PageStoreViewsTest, ViewsOutliveTheirStore) {
  auto s = MakeStore();
  ASSERT_TRUE(s->WritePage(kBase, Pattern(8)).ok());
  auto lent = s->LendForSend(kBase);
  auto in = s->ReceiveInPlace(kBase + kPage);
  ASSERT_TRUE(lent.ok() && in.ok());
  s.reset();  // the region closed while both transfers are in flight
  EXPECT_EQ(Copy(lent->get()), Pattern(8));
  std::memcpy(in->get(), Pattern(9).data(), kPage);
  lent->reset();
  in->reset();  // nothing to punch: the memfd is gone with its last view
}

TEST(PageStoreViewsTest, TwoMiBPagesLendAndReceiveInPlace) {
  auto s = MakeTwoMiBStore();
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->WritePage(kBase, Pattern(1, kHuge)).ok());
  auto lent = s->LendForSend(kBase);
  ASSERT_TRUE(lent.ok()) << lent.status().ToString();
  auto in = s->ReceiveInPlace(kBase + kHuge);
  ASSERT_TRUE(in.ok()) << in.status().ToString();
  std::memcpy(in->get(), lent->get(), kHuge);
  ASSERT_TRUE(s->Discard(kBase).ok());
  EXPECT_EQ(Copy(lent->get(), kHuge), Pattern(1, kHuge));
  EXPECT_TRUE(s->Adopt(kBase + kHuge, in->get()));
  in->reset();
  EXPECT_EQ(Read(*s, kBase + kHuge), Pattern(1, kHuge));
  EXPECT_FALSE(Present(*s, kBase));
}

}  // namespace
}  // namespace dsvm::node
