// UcxTransport over real UCX on loopback, once per transport set.
#include "node/transport/ucx_transport.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <thread>

#include <gtest/gtest.h>

#include "node/memory/page_store.h"

namespace dsvm::node {
namespace {

using proto::NodeId;

std::vector<uint8_t> Copy(const ReceivedPage& page) {
  return {page.bytes().begin(), page.bytes().end()};
}

UcxOptions Options(NodeId self, const std::string& listen) {
  UcxOptions o;
  o.self = self;
  o.listen = listen;
  return o;
}

class UcxTransportTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    // UCX reads these when a context is created. Loopback only: without
    // UCX_NET_DEVICES a connection to 127.0.0.1 also opens lanes over eth0.
    ::setenv("UCX_TLS", GetParam(), 1);
    ::setenv("UCX_NET_DEVICES", "lo", 1);
    ::setenv("UCX_TCP_CM_REUSEADDR", "y", 1);
  }

  std::unique_ptr<UcxTransport> Make(NodeId self,
                                     std::shared_ptr<const proto::ClusterSecret> secret = nullptr) {
    UcxOptions o;
    o.self = self;
    o.secret = std::move(secret);
    auto t = UcxTransport::Create(o);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.ok() ? std::move(*t) : nullptr;
  }

  // Progresses every transport until `done` or 5 s pass.
  bool Pump(std::vector<UcxTransport*> ts, const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      for (size_t i = 0; i < ts.size(); ++i) {
        ts[i]->FlushBatches();  // as dsvm-node does each turn of its loop
        ts[i]->Progress(&in_[i]);
      }
    }
    return true;
  }

  // Node 2 (*b) connected to node 1 (*a), its handshake done: a first
  // message went through it, so what is sent next leaves at once (and
  // small pages batch) rather than wait for the handshake.
  void ConnectedPair(std::unique_ptr<UcxTransport>* a, std::unique_ptr<UcxTransport>* b) {
    *a = Make(1);
    *b = Make(2);
    ASSERT_TRUE(*a && *b);
    ASSERT_TRUE((*b)->Connect(1, "127.0.0.1:" + std::to_string((*a)->port())).ok());
    ASSERT_TRUE((*b)->Send(1, proto::Done{0x200000000000, 1, 2}).ok());
    ASSERT_TRUE(Pump({a->get(), b->get()}, [&] { return in_[0].size() == 1; }));
    in_[0].clear();
  }

  std::vector<UcxIncoming> in_[3];
};

TEST_P(UcxTransportTest, HelloThenMessagesBothWays) {
  auto a = Make(1), b = Make(2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  ASSERT_TRUE(b->Send(1, proto::Acquire{0x200000000000, 2, proto::AccessKind::kRead, 7, 3, 0, 5}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return !in_[0].empty(); }));
  ASSERT_EQ(in_[0].size(), 1u);
  EXPECT_EQ(in_[0][0].from, 2u);
  auto* acq = std::get_if<proto::Acquire>(&in_[0][0].message);
  ASSERT_NE(acq, nullptr);
  EXPECT_EQ(acq->request_seq, 7u);
  EXPECT_EQ(acq->last_txn, 3u);

  // The listener answers on the endpoint the hello named.
  ASSERT_TRUE(a->HasPeer(2));
  ASSERT_TRUE(a->Send(2, proto::Invalidate{0x200000000000, 9}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return !in_[1].empty(); }));
  EXPECT_EQ(in_[1][0].from, 1u);
  EXPECT_NE(std::get_if<proto::Invalidate>(&in_[1][0].message), nullptr);
  EXPECT_EQ(a->stats().dropped_before_hello, 0u);
  EXPECT_EQ(a->stats().malformed, 0u);
}

TEST_P(UcxTransportTest, PageBytesArriveIntactSmallAndLarge) {
  auto a = Make(1), b = Make(2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  for (size_t size : {size_t{4096}, size_t{65536}, size_t{proto::kMaxPageSize}}) {
    in_[0].clear();
    proto::PageData d;
    d.page = 0x200000000000;
    d.txn = size;
    d.sender = 2;
    d.version = 5;
    d.data.resize(size);
    for (size_t i = 0; i < size; ++i) d.data[i] = static_cast<uint8_t>(i * 131 + size);
    const std::vector<uint8_t> expect = d.data;
    ASSERT_TRUE(b->Send(1, std::move(d)).ok());
    ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return !in_[0].empty(); })) << size;
    auto* got = std::get_if<proto::PageData>(&in_[0][0].message);
    ASSERT_NE(got, nullptr);
    EXPECT_EQ(got->txn, size);
    EXPECT_TRUE(got->data.empty()) << "the bytes travel beside the message";
    EXPECT_EQ(Copy(in_[0][0].page), expect) << "page of " << size << " bytes damaged";
  }
  EXPECT_GT(a->stats().rendezvous_received, 0u) << "2 MiB should travel by rendezvous";
}

// Small pages for one peer travel together (PageBatch) and arrive as the
// PageData they were, each intact; a large page goes alone among them.
TEST_P(UcxTransportTest, SmallPagesTravelInBatchesAndArriveIntact) {
  std::unique_ptr<UcxTransport> a, b;
  ASSERT_NO_FATAL_FAILURE(ConnectedPair(&a, &b));
  // 150 pages in one turn: more than one batch holds (kMaxBatchPages), of
  // mixed sizes; every 50th is 2 MiB, over the batching bound.
  constexpr uint64_t kPages = 150;
  std::map<uint64_t, std::vector<uint8_t>> expect;  // by txn
  for (uint64_t i = 0; i < kPages; ++i) {
    const size_t size = i % 50 == 49 ? proto::kMaxPageSize : i % 7 == 0 ? 65536 : 4096;
    proto::PageData d{0x200000000000 + (i << 21), i + 1, 2, i * 3, std::vector<uint8_t>(size),
                      /*region=*/100 + i};
    for (size_t k = 0; k < size; ++k) d.data[k] = static_cast<uint8_t>(k * 7 + i * 13);
    expect[d.txn] = d.data;
    ASSERT_TRUE(b->Send(1, std::move(d)).ok()) << i;
  }
  EXPECT_GT(b->held_batch_pages(), 0u);
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == kPages; }));
  EXPECT_EQ(b->held_batch_pages(), 0u);
  for (const UcxIncoming& m : in_[0]) {
    const auto& d = std::get<proto::PageData>(m.message);
    EXPECT_EQ(m.from, 2u);
    EXPECT_EQ(d.sender, 2u);
    ASSERT_EQ(expect.count(d.txn), 1u) << "txn " << d.txn << " twice or unknown";
    EXPECT_EQ(d.page, 0x200000000000 + ((d.txn - 1) << 21));
    EXPECT_EQ(d.version, (d.txn - 1) * 3);
    EXPECT_EQ(d.region, 100 + d.txn - 1) << "alone or batched, a page keeps its region";
    EXPECT_EQ(Copy(m.page), expect[d.txn]) << "page of txn " << d.txn << " damaged";
    expect.erase(d.txn);
  }
  EXPECT_TRUE(expect.empty());
  EXPECT_GE(b->stats().batches_sent, 3u);
  EXPECT_EQ(b->stats().batched_pages, kPages - 3);  // all but the three of 2 MiB
  EXPECT_EQ(a->stats().batches_received, b->stats().batches_sent);
  EXPECT_EQ(a->stats().malformed, 0u);
  // The batches' bytes were handed on in UCX's own buffers, not copied out.
  EXPECT_GT(a->stats().held_receives, 0u) << "UCX kept none of its receive buffers";
}

// A page whose bytes cannot be read (the fill fails) is not sent, and the
// pages batched beside it go intact.
TEST_P(UcxTransportTest, APageThatCannotBeReadIsNotSent) {
  std::unique_ptr<UcxTransport> a, b;
  ASSERT_NO_FATAL_FAILURE(ConnectedPair(&a, &b));
  auto fill_with = [](uint8_t v) {
    return [v](std::span<uint8_t> out) {
      std::fill(out.begin(), out.end(), v);
      return Status::Ok();
    };
  };
  const proto::PageData header{0x200000000000, 1, 2, 0, {}};
  ASSERT_TRUE(b->SendPage(1, header, 4096, fill_with(1)).ok());
  proto::PageData failing = header;
  failing.page += 4096;
  failing.txn = 2;
  const Status st = b->SendPage(1, failing, 4096, [](std::span<uint8_t> out) {
    std::fill(out.begin(), out.end(), 0xEE);  // partly written, then fails
    return IoError("the store cannot be read");
  });
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_EQ(b->held_batch_pages(), 1u);
  proto::PageData third = header;
  third.page += 8192;
  third.txn = 3;
  ASSERT_TRUE(b->SendPage(1, third, 4096, fill_with(3)).ok());
  EXPECT_EQ(b->held_batch_pages(), 2u);
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == 2; }));
  for (const UcxIncoming& m : in_[0]) {
    const auto& d = std::get<proto::PageData>(m.message);
    ASSERT_NE(d.txn, 2u) << "the page that failed was sent";
    EXPECT_EQ(Copy(m.page), std::vector<uint8_t>(4096, static_cast<uint8_t>(d.txn)));
  }
  EXPECT_EQ(a->stats().malformed, 0u);
}

// 2 MiB pages leave from and arrive in buffers the transports keep for
// reuse: once a page's buffers are given back, the next page of its size
// goes through them, and each page still arrives as it was sent (a buffer
// handed out again with the last page's bytes would show here).
TEST_P(UcxTransportTest, LargePagesReuseTheirBuffersAndArriveIntact) {
  std::unique_ptr<UcxTransport> a, b;
  ASSERT_NO_FATAL_FAILURE(ConnectedPair(&a, &b));
  constexpr size_t kSize = proto::kMaxPageSize;
  for (uint64_t i = 0; i < 4; ++i) {
    in_[0].clear();  // drops the last page: its buffer goes back to a's pool
    const proto::PageData header{0x200000000000 + (i << 21), i + 1, 2, i, {}};
    ASSERT_TRUE(b->SendPage(1, header, kSize, [i](std::span<uint8_t> out) {
                   for (size_t k = 0; k < out.size(); ++k) out[k] = static_cast<uint8_t>(k * 3 + i * 101);
                   return Status::Ok();
                 }).ok());
    ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == 1 && b->inflight_sends() == 0; }))
        << "page " << i;
    ASSERT_EQ(in_[0][0].page.size, kSize);
    const std::span<const uint8_t> got = in_[0][0].page.bytes();
    size_t wrong = 0;
    for (size_t k = 0; k < kSize; ++k) wrong += got[k] != static_cast<uint8_t>(k * 3 + i * 101);
    EXPECT_EQ(wrong, 0u) << "page " << i << " damaged";
  }
  in_[0].clear();
  // Each side made a buffer for the first page and reused it for the rest
  // (UCX may complete a send late, so the sender may have needed a second).
  EXPECT_GE(b->buffer_stats().reused, 2u);
  EXPECT_LE(b->buffer_stats().allocated, 2u);
  if (a->stats().rendezvous_received > 0) {
    EXPECT_EQ(a->buffer_stats().allocated, 1u);
    EXPECT_EQ(a->buffer_stats().reused, a->stats().rendezvous_received - 1);
  }
}

// Zero copy: a page sent from a view of one store's memfd and received
// straight into a view of another's arrives intact, and the receiving store
// takes it without a copy.
TEST_P(UcxTransportTest, APageGoesFromOneMemfdIntoAnotherWithoutCopies) {
  std::unique_ptr<UcxTransport> a, b;
  ASSERT_NO_FATAL_FAILURE(ConnectedPair(&a, &b));
  constexpr uint32_t kSize = 2u << 20;
  constexpr PageAddr kBase = 0x200000000000;
  auto from = PageStore::Create(kBase, 2 * kSize, kSize);
  auto into = PageStore::Create(kBase, 2 * kSize, kSize);
  ASSERT_TRUE(from.ok() && into.ok());
  std::vector<uint8_t> bytes(kSize);
  for (size_t k = 0; k < kSize; ++k) bytes[k] = static_cast<uint8_t>(k * 5 + 1);
  ASSERT_TRUE((*from)->WritePage(kBase, bytes).ok());
  ASSERT_TRUE((*from)->WritePage(kBase + kSize, bytes).ok());
  int placed = 0;
  a->set_receive_placer([&](proto::NodeId sender, const proto::PageData& h, size_t length) {
    EXPECT_EQ(sender, 2u);
    EXPECT_EQ(length, kSize);
    ++placed;
    if (h.page != kBase) return std::shared_ptr<uint8_t>();  // the second: the pool's
    auto view = (*into)->ReceiveInPlace(h.page);
    EXPECT_TRUE(view.ok()) << view.status().ToString();
    return view.ok() ? *view : nullptr;
  });
  for (PageAddr page : {kBase, kBase + kSize}) {
    auto lent = (*from)->LendForSend(page);
    ASSERT_TRUE(lent.ok()) << lent.status().ToString();
    ASSERT_TRUE(b->SendPageFrom(1, proto::PageData{page, 1, 2, 0, {}}, *lent, kSize).ok());
  }
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == 2 && b->inflight_sends() == 0; }));
  EXPECT_EQ(b->stats().sent_from_lent, 2u);
  EXPECT_EQ((*from)->view_count(), 0u);  // UCX let go of both
  if (a->stats().rendezvous_received == 0) GTEST_SKIP() << "UCX sent 2 MiB eagerly";
  EXPECT_EQ(placed, 2);
  EXPECT_EQ(a->stats().received_placed, 1u);
  for (UcxIncoming& m : in_[0]) {
    const auto& d = std::get<proto::PageData>(m.message);
    ASSERT_EQ(m.page.size, kSize);
    EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), m.page.bytes().begin())) << d.page;
    EXPECT_EQ((*into)->Adopt(d.page, m.page.data.get()), d.page == kBase);
  }
  in_[0].clear();
  std::vector<uint8_t> got(kSize);
  ASSERT_TRUE((*into)->ReadPage(kBase, got).ok());
  EXPECT_EQ(got, bytes);
  auto present = (*into)->IsPresent(kBase + kSize);
  ASSERT_TRUE(present.ok());
  EXPECT_FALSE(*present);  // received in the pool's buffer, never installed
}

// Pages received in UCX's own buffers stay readable after their transport
// is gone, and are given back then (under ASan: no leak, no use after free).
TEST_P(UcxTransportTest, ReceivedPagesOutliveTheirTransport) {
  std::unique_ptr<UcxTransport> a, b;
  ASSERT_NO_FATAL_FAILURE(ConnectedPair(&a, &b));
  // One batch of 128 KiB: more than one UCX fragment on tcp, so that UCX
  // hands it over in a buffer it lets us keep.
  constexpr uint64_t kPages = 32;
  for (uint64_t i = 0; i < kPages; ++i) {
    proto::PageData d{0x200000000000 + (i << 12), i + 1, 2, 0, std::vector<uint8_t>(4096)};
    std::fill(d.data.begin(), d.data.end(), static_cast<uint8_t>(i + 1));
    ASSERT_TRUE(b->Send(1, std::move(d)).ok());
  }
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == kPages; }));
  EXPECT_GT(a->stats().held_receives, 0u);
  std::vector<ReceivedPage> pages;
  for (UcxIncoming& m : in_[0]) pages.push_back(std::move(m.page));
  in_[0].clear();
  a.reset();
  b.reset();
  for (const ReceivedPage& p : pages) {
    ASSERT_EQ(p.size, 4096u);
    const uint8_t first = p.bytes()[0];
    EXPECT_GE(first, 1);
    EXPECT_LE(first, kPages);
    EXPECT_TRUE(std::all_of(p.bytes().begin(), p.bytes().end(),
                            [first](uint8_t x) { return x == first; }));
  }
}

// Without batching (batch_page_bytes 0) every page goes alone.
TEST_P(UcxTransportTest, BatchingCanBeTurnedOff) {
  UcxOptions o;
  o.self = 2;
  o.batch_page_bytes = 0;
  auto a = Make(1);
  auto b = UcxTransport::Create(o);
  ASSERT_TRUE(a && b.ok());
  ASSERT_TRUE((*b)->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  for (uint64_t i = 1; i <= 10; ++i) {
    ASSERT_TRUE((*b)->Send(1, proto::PageData{0x200000000000, i, 2, 1, std::vector<uint8_t>(4096, 1)}).ok());
    EXPECT_EQ((*b)->held_batch_pages(), 0u);
  }
  ASSERT_TRUE(Pump({a.get(), b->get()}, [&] { return in_[0].size() == 10; }));
  EXPECT_EQ((*b)->stats().batches_sent, 0u);
}

TEST_P(UcxTransportTest, ManyMessagesAllArrive) {
  auto a = Make(1), b = Make(2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  constexpr uint64_t kCount = 5000;
  std::vector<bool> seen(kCount, false);
  uint64_t sent = 0;
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] {
    while (sent < kCount && b->inflight_sends() < 256) {
      if (!b->Send(1, proto::Done{0x200000000000, sent, 2}).ok()) break;
      ++sent;
    }
    for (auto& m : in_[0]) seen[std::get<proto::Done>(m.message).txn] = true;
    in_[0].clear();
    return sent == kCount && std::count(seen.begin(), seen.end(), true) == kCount;
  }));
  ASSERT_TRUE(b->Flush(2000).ok());
  EXPECT_EQ(b->inflight_sends(), 0u);
}

TEST_P(UcxTransportTest, RefusesWhatItCannotDo) {
  auto a = Make(1);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->Send(9, proto::Done{}).code(), StatusCode::kUnavailable);
  EXPECT_EQ(a->Connect(1, "127.0.0.1:1").code(), StatusCode::kInvalidArgument);  // itself
  EXPECT_EQ(a->Connect(2, "not-an-address").code(), StatusCode::kInvalidArgument);
  auto anonymous = UcxTransport::Create(Options(0, "127.0.0.1:0"));
  ASSERT_TRUE(anonymous.ok());
  EXPECT_EQ((*anonymous)->Connect(2, "127.0.0.1:1").code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(UcxTransport::Create(Options(1, "999.1.1.1:0")).ok());
}

TEST_P(UcxTransportTest, SurvivesAPeerThatGoesAway) {
  auto a = Make(1), b = Make(2), c = Make(3);
  ASSERT_TRUE(a && b && c);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  ASSERT_TRUE(c->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  ASSERT_TRUE(b->Send(1, proto::Done{0x200000000000, 1, 2}).ok());
  ASSERT_TRUE(c->Send(1, proto::Done{0x200000000000, 1, 3}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get(), c.get()}, [&] { return in_[0].size() == 2; }));
  b.reset();  // node 2's daemon is gone
  // Node 1 keeps serving node 3, whatever UCX reports about node 2.
  in_[0].clear();
  a->Send(2, proto::Invalidate{0x200000000000, 4}).IgnoreError();
  ASSERT_TRUE(c->Send(1, proto::Done{0x200000000000, 2, 3}).ok());
  ASSERT_TRUE(Pump({a.get(), c.get()}, [&] { return !in_[0].empty(); }));
  EXPECT_EQ(in_[0].back().from, 3u);
}

std::shared_ptr<const proto::ClusterSecret> SecretOf(char fill) {
  const std::vector<uint8_t> bytes(32, static_cast<uint8_t>(fill));
  return std::make_shared<const proto::ClusterSecret>(proto::ClusterSecret::FromBytes(bytes));
}

TEST_P(UcxTransportTest, PeersWithTheSecretProveItAndTalk) {
  auto s = SecretOf('s');
  auto a = Make(1, s), b = Make(2, s);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  // Sent before the handshake completes: held, then delivered after it.
  ASSERT_TRUE(b->Send(1, proto::Done{0x200000000000, 1, 2}).ok());
  ASSERT_TRUE(b->Send(1, proto::Done{0x200000000000, 2, 2}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return in_[0].size() == 2; }));
  EXPECT_EQ(std::get<proto::Done>(in_[0][0].message).txn, 1u) << "held messages keep their order";
  EXPECT_EQ(std::get<proto::Done>(in_[0][1].message).txn, 2u);
  ASSERT_TRUE(a->Send(2, proto::Release{0x200000000000, 3}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return !in_[1].empty(); }));
  EXPECT_EQ(a->stats().refused_peers + b->stats().refused_peers, 0u);
  EXPECT_EQ(a->stats().dropped_before_hello, 0u);
}

// Pumps for a while, for cases where nothing should arrive.
void PumpFor(std::vector<UcxTransport*> ts, std::vector<UcxIncoming>* in, int ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < until) {
    for (size_t i = 0; i < ts.size(); ++i) ts[i]->Progress(&in[i]);
  }
}

TEST_P(UcxTransportTest, APeerWithAnotherSecretIsRefused) {
  auto a = Make(1, SecretOf('s')), b = Make(2, SecretOf('t'));
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  ASSERT_TRUE(b->Send(1, proto::Done{0x200000000000, 1, 2}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return b->stats().refused_peers == 1; }))
      << "the connector checks the listener's proof first";
  PumpFor({a.get(), b.get()}, in_, 200);
  EXPECT_TRUE(in_[0].empty()) << "nothing crossed";
  EXPECT_FALSE(a->HasPeer(2));
  EXPECT_FALSE(b->HasPeer(1));
}

TEST_P(UcxTransportTest, APeerWithoutTheSecretIsRefused) {
  auto a = Make(1, SecretOf('s')), b = Make(2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  ASSERT_TRUE(b->Send(1, proto::Done{0x200000000000, 1, 2}).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return a->stats().refused_peers == 1; }));
  PumpFor({a.get(), b.get()}, in_, 200);
  EXPECT_TRUE(in_[0].empty());
  EXPECT_FALSE(a->HasPeer(2));
  // And a secured connector will not talk to a listener without the secret.
  auto c = Make(3, SecretOf('s')), d = Make(4);
  ASSERT_TRUE(c && d);
  ASSERT_TRUE(c->Connect(4, "127.0.0.1:" + std::to_string(d->port())).ok());
  ASSERT_TRUE(c->Send(4, proto::Done{0x200000000000, 1, 3}).ok());
  ASSERT_TRUE(Pump({c.get(), d.get()}, [&] { return c->stats().refused_peers == 1; }));
  std::vector<UcxIncoming> in[2];
  PumpFor({c.get(), d.get()}, in, 200);
  EXPECT_TRUE(in[1].empty());
}

// Page bytes from a peer that has not proved the secret are never fetched:
// a large page (rendezvous) is dropped before any receive buffer is made.
TEST_P(UcxTransportTest, PageBytesOfAnUnprovenPeerAreNotFetched) {
  auto a = Make(1, SecretOf('s')), b = Make(2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Connect(1, "127.0.0.1:" + std::to_string(a->port())).ok());
  proto::PageData big{0x200000000000, 1, 2, 1, std::vector<uint8_t>(2u << 20, 0xab)};
  ASSERT_TRUE(b->Send(1, big).ok());
  ASSERT_TRUE(Pump({a.get(), b.get()}, [&] { return a->stats().refused_peers == 1; }));
  PumpFor({a.get(), b.get()}, in_, 200);
  EXPECT_TRUE(in_[0].empty());
  EXPECT_EQ(a->stats().rendezvous_received, 0u);
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxTransportTest, ::testing::Values("tcp", "sm,tcp"),
                         [](const auto& info) {
                           return std::string(info.param[0] == 't' ? "tcp" : "sm_tcp");
                         });

}  // namespace
}  // namespace dsvm::node
