// Integration tests of dsvm-coordinator as a real process on 127.0.0.1.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/shard_map.h"
#include "tests/integration/coordinator_process.h"

namespace dsvm::testing {
namespace {

using proto::AccessKind;

constexpr uint32_t kPage = 4096;

proto::RegionReply CreateRegion(proto::FramedSocket& s, const std::string& name, uint64_t size) {
  auto reply = s.Call(proto::RegionCreate{.name = name, .size = size, .page_size = kPage});
  EXPECT_TRUE(reply.ok()) << reply.status().ToString();
  auto* r = reply.ok() ? std::get_if<proto::RegionReply>(&*reply) : nullptr;
  EXPECT_NE(r, nullptr);
  return r ? *r : proto::RegionReply{};
}

proto::PageQueryReply Query(proto::FramedSocket& s, proto::PageAddr page) {
  auto reply = s.Call(proto::PageQuery{page});
  EXPECT_TRUE(reply.ok()) << reply.status().ToString();
  auto* q = reply.ok() ? std::get_if<proto::PageQueryReply>(&*reply) : nullptr;
  EXPECT_NE(q, nullptr);
  return q ? *q : proto::PageQueryReply{};
}

// SIGKILL during a stream of region creates and directory updates; after a
// restart on the same data directory nothing acknowledged is lost.
TEST(CoordinatorCrash, KillNineLosesNothingAcknowledged) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  std::mt19937_64 rng(std::random_device{}());
  for (int round = 0; round < 3; ++round) {
    CoordinatorProcess coord;
    ASSERT_TRUE(coord.Start(data).ok()) << coord.stderr_text();
    auto tool = ConnectTool(coord.address());
    ASSERT_TRUE(tool.ok());
    const std::string base_name = "base" + std::to_string(round);
    proto::RegionReply base = CreateRegion(*tool, base_name, 256 * kPage);
    ScriptedNode a, b;
    ASSERT_TRUE(a.Connect(coord.address()).ok());
    ASSERT_TRUE(b.Connect(coord.address()).ok());

    // The acknowledged state: regions whose create was answered, and per page
    // the last grant received (owner and version).
    std::map<std::string, proto::RegionReply> regions{{base_name, base}};
    struct Acked {
      proto::NodeId owner;
      uint64_t version;
    };
    std::map<proto::PageAddr, Acked> pages;
    std::atomic<bool> killed{false};
    std::thread killer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 400));
      killed = true;
      coord.Kill(SIGKILL);
    });
    for (uint64_t i = 0; !killed; ++i) {
      if (i % 5 == 0) {
        const std::string name = "r" + std::to_string(round) + "-" + std::to_string(i);
        auto reply = tool->Call(proto::RegionCreate{.name = name, .size = (1 + i % 7) * kPage, .page_size = kPage}, 2000);
        if (!reply.ok()) break;
        if (auto* r = std::get_if<proto::RegionReply>(&*reply)) regions[name] = *r;
        continue;
      }
      ScriptedNode& n = (i % 2) ? a : b;
      const proto::PageAddr page = base.base + (i * 7 % 256) * kPage;
      const AccessKind kind = (i % 3) ? AccessKind::kWrite : AccessKind::kRead;
      if (n.Holds(page, kind != AccessKind::kRead)) continue;  // a local hit: no request
      auto g = n.Acquire(base.region, page, kind, 2000);
      if (!g.ok()) break;
      if (g->state == proto::PageState::kModified) pages[page] = Acked{n.id(), g->version};
    }
    killer.join();
    ASSERT_GT(regions.size(), 1u) << "the stream made no progress before the kill";
    ASSERT_FALSE(pages.empty());

    CoordinatorProcess again;
    ASSERT_TRUE(again.Start(data).ok()) << again.stderr_text();
    auto check = ConnectTool(again.address());
    ASSERT_TRUE(check.ok());
    for (const auto& [name, r] : regions) {
      auto reply = check->Call(proto::RegionOpen{.name = name});
      ASSERT_TRUE(reply.ok());
      auto* got = std::get_if<proto::RegionReply>(&*reply);
      ASSERT_NE(got, nullptr) << "acknowledged region " << name << " lost";
      EXPECT_EQ(got->base, r.base);
      EXPECT_EQ(got->size, r.size);
      EXPECT_EQ(got->region, r.region);
    }
    for (const auto& [page, acked] : pages) {
      proto::PageQueryReply q = Query(*check, page);
      // Versions only grow; a later (unacknowledged) write may have been
      // persisted, but never may the directory be behind what was granted.
      ASSERT_GE(q.version, acked.version) << "page " << page << " went back in time";
      if (q.version == acked.version) {
        EXPECT_EQ(q.owner, acked.owner) << "page " << page;
        EXPECT_EQ(q.state, proto::PageState::kModified) << "page " << page;
      }
    }
    again.Kill(SIGTERM);
  }
}

TEST(CoordinatorInput, MalformedFrameClosesOnlyThatConnection) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto good = ConnectTool(coord.address());
  ASSERT_TRUE(good.ok());
  CreateRegion(*good, "keep", 16 * kPage);

  // Bad magic, a wrong version, an oversized length, a bad enum: each closes
  // its own connection.
  std::vector<std::vector<uint8_t>> bad;
  bad.push_back(std::vector<uint8_t>(24, 0xAB));
  auto frame = proto::Encode(proto::RegionOpen{.name = "keep"}, 1);
  auto wrong_version = frame;
  wrong_version[4] = static_cast<uint8_t>(proto::kWireVersion + 1);
  bad.push_back(wrong_version);
  auto huge = frame;
  huge[8] = 0xFF, huge[9] = 0xFF, huge[10] = 0xFF, huge[11] = 0x7F;
  bad.push_back(huge);
  for (size_t i = 0; i < bad.size(); ++i) {
    auto s = ConnectTool(coord.address());
    ASSERT_TRUE(s.ok());
    proto::FramedSocket& fs = *s;
    ASSERT_TRUE(fs.SendRaw(bad[i]).ok());
    auto r = fs.Receive(3000);
    EXPECT_FALSE(r.ok()) << "bad frame " << i << " was answered";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().ToString();
    }
  }
  // A valid but unacceptable request gets an error reply, connection kept.
  auto reply = good->Call(proto::RegionCreate{.name = "bad name!", .size = 4096, .page_size = 4096});
  ASSERT_TRUE(reply.ok());
  auto* st = std::get_if<proto::StatusReply>(&*reply);
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kInvalidArgument));
  // The well-behaved connection is still served.
  auto open = good->Call(proto::RegionOpen{.name = "keep"});
  ASSERT_TRUE(open.ok()) << open.status().ToString();
  EXPECT_NE(std::get_if<proto::RegionReply>(&*open), nullptr);
  EXPECT_NE(coord.stderr_text().find("malformed frame"), std::string::npos);
}

TEST(CoordinatorInput, NodeCannotSpeakForAnotherNode) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  proto::RegionReply r = CreateRegion(*tool, "r", 16 * kPage);
  ScriptedNode a, b;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  ASSERT_TRUE(b.Connect(coord.address()).ok());
  proto::Acquire forged;
  forged.page = r.base;
  forged.node = b.id();  // sent on a's connection
  forged.kind = AccessKind::kWrite;
  forged.request_seq = 1;
  forged.region = r.region;
  ASSERT_TRUE(a.socket().Send(forged, 7).ok());
  auto f = a.socket().Receive(3000);
  ASSERT_TRUE(f.ok());
  auto* st = std::get_if<proto::StatusReply>(&f->message);
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kPermissionDenied));
  EXPECT_FALSE(a.socket().Receive(3000).ok()) << "impersonating connection left open";
  // A page outside every region (its region deleted, say) fails that
  // access only: a NOT_FOUND grant, and the connection stays.
  ScriptedNode c;
  ASSERT_TRUE(c.Connect(coord.address()).ok());
  auto outside = c.Acquire(r.region, r.base + (64u << 20), AccessKind::kRead, 2000);
  ASSERT_TRUE(outside.ok()) << outside.status().ToString();
  EXPECT_EQ(outside->status, static_cast<uint16_t>(StatusCode::kNotFound));
  EXPECT_TRUE(c.Heartbeat().ok());
  // b still works.
  auto g = b.Acquire(r.region, r.base, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->state, proto::PageState::kModified);
}

// A PageRun of Acquires is served as its Acquires one by one would be,
// and the Grants come back one per page, in order (FramedSocket expands
// what the coordinator packs); a run naming another node is refused like
// one forged Acquire. Fails without Server::Dispatch: the run reaches the
// service whole, which answers no page of it.
TEST(CoordinatorInput, ARunOfAcquiresIsServedPageByPage) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  constexpr uint32_t kPages = 16;
  proto::RegionReply r = CreateRegion(*tool, "r", kPages * kPage);
  ScriptedNode a, b;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  ASSERT_TRUE(b.Connect(coord.address()).ok());
  proto::PageRun run{.count = kPages,
                     .page_stride = static_cast<uint32_t>(kPage),
                     .seq_stride = 1,
                     .first = proto::Acquire{.page = r.base,
                                             .node = a.id(),
                                             .kind = AccessKind::kWrite,
                                             .request_seq = 1000,
                                             .region = r.region}};
  ASSERT_TRUE(a.socket().SendRaw(proto::Encode(run, 0)).ok());
  for (uint32_t i = 0; i < kPages; ++i) {
    auto f = a.socket().Receive(3000);
    ASSERT_TRUE(f.ok()) << "page " << i << ": " << f.status().ToString();
    EXPECT_EQ(f->header.type, proto::MessageType::kGrant);
    auto* g = std::get_if<proto::Grant>(&f->message);
    ASSERT_NE(g, nullptr) << "page " << i;
    EXPECT_EQ(g->page, r.base + i * kPage);
    EXPECT_EQ(g->request_seq, 1000u + i);
    EXPECT_EQ(g->state, proto::PageState::kModified);
    EXPECT_EQ(g->status, 0);
  }
  for (uint32_t i = 0; i < kPages; i += 5) {
    EXPECT_EQ(Query(*tool, r.base + i * kPage).owner, a.id()) << "page " << i;
  }
  // On b's connection, a run that speaks for a.
  ASSERT_TRUE(b.socket().SendRaw(proto::Encode(run, 0)).ok());
  auto f = b.socket().Receive(3000);
  ASSERT_TRUE(f.ok());
  auto* st = std::get_if<proto::StatusReply>(&f->message);
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kPermissionDenied));
  EXPECT_FALSE(b.socket().Receive(3000).ok()) << "impersonating connection left open";
}

// More messages in one read than the coordinator handles per turn
// (8 runs of 1024 Acquires, 4096 per turn): the rest are handled in later
// turns and every one is answered. A run with a request id is refused.
TEST(CoordinatorInput, RunsBeyondOneTurnAreAllServed) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  constexpr uint32_t kRuns = 8;
  constexpr uint32_t kPages = kRuns * proto::kMaxRunPages;
  proto::RegionReply r = CreateRegion(*tool, "r", uint64_t{kPages} * kPage);
  ScriptedNode a;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  std::vector<uint8_t> all;
  for (uint32_t k = 0; k < kRuns; ++k) {
    proto::PageRun run{.count = proto::kMaxRunPages,
                       .page_stride = static_cast<uint32_t>(kPage),
                       .seq_stride = 1,
                       .first = proto::Acquire{.page = r.base + uint64_t{k} * proto::kMaxRunPages * kPage,
                                               .node = a.id(),
                                               .kind = AccessKind::kWrite,
                                               .request_seq = 1 + uint64_t{k} * proto::kMaxRunPages,
                                               .region = r.region}};
    proto::EncodeTo(run, 0, &all);
  }
  ASSERT_TRUE(a.socket().SendRaw(all).ok());
  std::vector<bool> granted(kPages, false);
  for (uint32_t i = 0; i < kPages; ++i) {
    auto f = a.socket().Receive(5000);
    ASSERT_TRUE(f.ok()) << "after " << i << " grants: " << f.status().ToString();
    auto* g = std::get_if<proto::Grant>(&f->message);
    ASSERT_NE(g, nullptr) << "after " << i << " grants";
    ASSERT_EQ(g->status, 0);
    const uint64_t index = (g->page - r.base) / kPage;
    ASSERT_LT(index, kPages);
    EXPECT_EQ(g->request_seq, index + 1);
    granted[index] = true;
  }
  EXPECT_EQ(std::count(granted.begin(), granted.end(), true), kPages);
  // A run answers no request: one with a request id closes the connection.
  proto::PageRun bad{.count = 2, .page_stride = static_cast<uint32_t>(kPage), .seq_stride = 0,
                     .first = proto::Done{.page = r.base, .txn = 1, .node = a.id()}};
  ASSERT_TRUE(a.socket().SendRaw(proto::Encode(bad, 77)).ok());
  EXPECT_FALSE(a.socket().Receive(3000).ok()) << "a run with a request id was taken";
  EXPECT_NE(coord.stderr_text().find("runs answer no request"), std::string::npos);
}

TEST(CoordinatorStart, RefusesCorruptOrUnusableDataDirectory) {
  TempDir dir;
  // A regular file where the data directory should be.
  const std::string file = dir.path() + "/file";
  std::ofstream(file) << "not a database";
  CoordinatorProcess c1;
  Status st = c1.Start(file);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("refusing to start"), std::string::npos) << st.message();

  // A store whose files were damaged.
  const std::string data = dir.path() + "/data";
  {
    CoordinatorProcess c2;
    ASSERT_TRUE(c2.Start(data).ok()) << c2.stderr_text();
    auto tool = ConnectTool(c2.address());
    ASSERT_TRUE(tool.ok());
    CreateRegion(*tool, "r", 4096);
    c2.Kill(SIGTERM);
  }
  for (const auto& e : std::filesystem::directory_iterator(data)) {
    const std::string name = e.path().filename();
    if (name.rfind("MANIFEST", 0) == 0 || name == "CURRENT") {
      std::ofstream(e.path(), std::ios::trunc) << "garbage garbage garbage";
    }
  }
  CoordinatorProcess c3;
  st = c3.Start(data);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("refusing to start"), std::string::npos) << st.message();
}

// --- Who may connect ----------------------------------------------------------

// Runs the coordinator binary with `flags` to its exit; returns its exit
// code and fills *out with what it printed.
int RunCoordinator(const std::string& flags, std::string* out) {
  const std::string cmd = std::string(DSVM_COORDINATOR_BIN) + " " + flags + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[512];
  out->clear();
  while (std::fgets(buf, sizeof(buf), p) != nullptr) *out += buf;
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(CoordinatorAuth, StartNeedsASecretOrInsecureAndAPrivateFile) {
  TempDir dir;
  std::string out;
  const std::string base = "--data-dir " + dir.path() + "/data --listen 127.0.0.1:0";
  EXPECT_EQ(RunCoordinator(base, &out), 2);
  EXPECT_NE(out.find("--insecure"), std::string::npos) << out;
  const std::string loose = dir.path() + "/loose";
  std::ofstream(loose) << "0123456789abcdef0123456789abcdef";
  ASSERT_EQ(::chmod(loose.c_str(), 0644), 0);
  EXPECT_EQ(RunCoordinator(base + " --secret-file " + loose, &out), 1);
  EXPECT_NE(out.find("chmod 600"), std::string::npos) << out;
  const std::string short_secret = dir.path() + "/short";
  std::ofstream(short_secret) << "tiny";
  ASSERT_EQ(::chmod(short_secret.c_str(), 0600), 0);
  EXPECT_EQ(RunCoordinator(base + " --secret-file " + short_secret, &out), 1);
  EXPECT_NE(out.find("bytes"), std::string::npos) << out;
  EXPECT_EQ(RunCoordinator(base + " --secret-file " + dir.path() + "/missing", &out), 1);
}

TEST(CoordinatorAuth, OnlyHoldersOfTheSecretGetIn) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto good = ConnectTool(coord.address());
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  CreateRegion(*good, "guarded", 4 * kPage);

  // No secret at all.
  auto none = proto::ConnectToCoordinator(coord.address(), nullptr);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kPermissionDenied);
  EXPECT_NE(none.status().message().find("--secret-file"), std::string::npos)
      << none.status().ToString();

  // Another secret: the client finds out first (the coordinator's proof fails).
  const std::vector<uint8_t> other(32, 0x5A);
  const auto wrong = proto::ClusterSecret::FromBytes(other);
  auto mismatched = proto::ConnectToCoordinator(coord.address(), &wrong);
  ASSERT_FALSE(mismatched.ok());
  EXPECT_EQ(mismatched.status().code(), StatusCode::kPermissionDenied);
  EXPECT_NE(mismatched.status().message().find("does not know"), std::string::npos);

  // A hand-made client that answers the challenge with a forged proof.
  {
    auto raw = proto::FramedSocket::Connect(coord.address());
    ASSERT_TRUE(raw.ok());
    const proto::Nonce n = proto::RandomNonce();
    auto challenge = raw->Call(proto::AuthHello{std::vector<uint8_t>(n.begin(), n.end())});
    ASSERT_TRUE(challenge.ok());
    ASSERT_NE(std::get_if<proto::AuthChallenge>(&*challenge), nullptr);
    auto verdict = raw->Call(proto::AuthProof{std::vector<uint8_t>(32, 0x11)});
    ASSERT_TRUE(verdict.ok());
    auto* st = std::get_if<proto::StatusReply>(&*verdict);
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kPermissionDenied));
    EXPECT_NE(st->message.find("wrong cluster secret"), std::string::npos) << st->message;
    EXPECT_FALSE(raw->Call(proto::RegionOpen{.name = "guarded"}, 2000).ok()) << "the connection is closed";
  }
  // Skipping the handshake: refused, whatever the request.
  {
    auto raw = proto::FramedSocket::Connect(coord.address());
    ASSERT_TRUE(raw.ok());
    auto reply = raw->Call(proto::RegionOpen{.name = "guarded"});
    ASSERT_TRUE(reply.ok());
    auto* st = std::get_if<proto::StatusReply>(&*reply);
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kPermissionDenied));
    EXPECT_NE(st->message.find("AuthHello"), std::string::npos) << st->message;
  }
  // A frame that announces a large payload before the handshake is refused
  // on its header alone: the coordinator buffers nothing of it.
  {
    auto raw = proto::FramedSocket::Connect(coord.address());
    ASSERT_TRUE(raw.ok());
    proto::PageData big{0x200000000000, 1, 1, 1, std::vector<uint8_t>(2u << 20, 0)};
    std::vector<uint8_t> frame = proto::Encode(big, 7);
    frame.resize(proto::kHeaderSize);  // the header only; the payload never comes
    ASSERT_TRUE(raw->SendRaw(frame).ok());
    auto reply = raw->Receive(3000);
    ASSERT_TRUE(reply.ok()) << "no answer before the payload: " << reply.status().ToString();
    auto* st = std::get_if<proto::StatusReply>(&reply->message);
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(st->code, static_cast<uint16_t>(StatusCode::kPermissionDenied));
    EXPECT_NE(st->message.find("before the handshake"), std::string::npos) << st->message;
  }
  // The authenticated connection was never disturbed.
  auto open = good->Call(proto::RegionOpen{.name = "guarded"});
  ASSERT_TRUE(open.ok());
  EXPECT_NE(std::get_if<proto::RegionReply>(&*open), nullptr);
  EXPECT_NE(coord.stderr_text().find("refusing connection"), std::string::npos);
}

TEST(CoordinatorAuth, AnInsecureCoordinatorIsNotTrustedBySecretHolders) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data", {"--insecure"}).ok()) << coord.stderr_text();
  auto open = proto::ConnectToCoordinator(coord.address(), nullptr);
  EXPECT_TRUE(open.ok()) << open.status().ToString();
  auto careful = ConnectTool(coord.address());
  ASSERT_FALSE(careful.ok());
  EXPECT_EQ(careful.status().code(), StatusCode::kPermissionDenied);
  EXPECT_NE(careful.status().message().find("--insecure"), std::string::npos);
}

// Region access: the coordinator's decisions, with the credentials a node
// daemon would attach (a tool may state them; it holds the cluster secret).
TEST(CoordinatorAuth, RegionsAreOpenedOnlyByWhoMayUseThem) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  auto coord = std::make_unique<CoordinatorProcess>();
  ASSERT_TRUE(coord->Start(data).ok()) << coord->stderr_text();
  auto tool = ConnectTool(coord->address());
  ASSERT_TRUE(tool.ok());
  const proto::Credentials alice{1, 1000, 100}, bob{1, 1001, 100}, eve{1, 1002, 200},
      root{1, 0, 0};
  auto code = [](const Result<proto::Message>& r) {
    if (!r.ok()) return -1;
    if (const auto* st = std::get_if<proto::StatusReply>(&*r)) return static_cast<int>(st->code);
    return 0;
  };
  const int kDenied = static_cast<int>(StatusCode::kPermissionDenied);
  auto create = [&](const std::string& name, uint32_t mode, const std::string& token) {
    return code(tool->Call(proto::RegionCreate{
        .name = name, .size = kPage, .page_size = kPage, .mode = mode, .token = token,
        .creds = alice}));
  };
  auto open = [&](const std::string& name, const proto::Credentials& who, const std::string& token) {
    return code(tool->Call(proto::RegionOpen{.name = name, .token = token, .creds = who}));
  };
  ASSERT_EQ(create("private", 0600, ""), 0);
  ASSERT_EQ(create("group", 0660, ""), 0);
  ASSERT_EQ(create("others", 0606, ""), 0);
  ASSERT_EQ(create("token", 0640, "open sesame"), 0);
  EXPECT_EQ(create("bad-mode", 01000, ""), static_cast<int>(StatusCode::kInvalidArgument));

  auto check_all = [&] {
    EXPECT_EQ(open("private", alice, ""), 0);
    EXPECT_EQ(open("private", bob, ""), kDenied);
    EXPECT_EQ(open("private", root, ""), 0);
    EXPECT_EQ(open("private", {}, ""), 0) << "a tool";
    EXPECT_EQ(open("group", bob, ""), 0);
    EXPECT_EQ(open("group", eve, ""), kDenied);
    EXPECT_EQ(open("others", eve, ""), 0);
    EXPECT_EQ(open("others", bob, ""), 0) << "bob is in alice's group, but others may";
    EXPECT_EQ(open("token", bob, ""), kDenied) << "read-only group bits do not let bob open it";
    EXPECT_EQ(open("token", eve, "open sesame"), 0);
    EXPECT_EQ(open("token", eve, "open sesame!"), kDenied);
    EXPECT_EQ(open("private", bob, "open sesame"), kDenied) << "a token of another region";
  };
  check_all();
  auto refused = tool->Call(proto::RegionOpen{.name = "private", .creds = bob});
  ASSERT_TRUE(refused.ok());
  const std::string why = std::get<proto::StatusReply>(*refused).message;
  EXPECT_NE(why.find("uid 1001"), std::string::npos) << why;
  EXPECT_NE(why.find("0600"), std::string::npos) << why;

  // Owner, mode and token are stored: the same decisions after kill -9.
  coord->Kill(SIGKILL);
  coord = std::make_unique<CoordinatorProcess>();
  ASSERT_TRUE(coord->Start(data).ok()) << coord->stderr_text();
  tool = ConnectTool(coord->address());
  ASSERT_TRUE(tool.ok());
  check_all();

  // Only the owner (or root, or a tool) deletes; a token is not enough.
  EXPECT_EQ(code(tool->Call(proto::RegionDelete{.name = "token", .creds = eve})), kDenied);
  EXPECT_EQ(code(tool->Call(proto::RegionDelete{.name = "group", .creds = bob})), kDenied);
  EXPECT_EQ(code(tool->Call(proto::RegionDelete{.name = "group", .creds = alice})), 0);
  EXPECT_EQ(code(tool->Call(proto::RegionDelete{.name = "token", .creds = root})), 0);
  EXPECT_EQ(open("group", alice, ""), static_cast<int>(StatusCode::kNotFound));
}

// A deleted region is announced to every live node connected at the time,
// after the deleter's own reply, so node daemons free their copies at once.
// A node that left is not told, nor is a tool.
TEST(CoordinatorRegions, ADeleteIsAnnouncedToConnectedNodes) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  proto::RegionReply gone = CreateRegion(*tool, "gone", 16 * kPage);
  proto::RegionReply later = CreateRegion(*tool, "later", 4 * kPage);
  ScriptedNode a, b, left;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  ASSERT_TRUE(b.Connect(coord.address()).ok());
  ASSERT_TRUE(left.Connect(coord.address()).ok());
  auto bye = left.socket().Call(proto::LeaveRequest{left.id()});
  ASSERT_TRUE(bye.ok()) << bye.status().ToString();
  ASSERT_EQ(std::get<proto::StatusReply>(*bye).code, 0);

  auto expect_notice = [](ScriptedNode& n, const proto::RegionReply& r) {
    auto f = n.socket().Receive(3000);
    ASSERT_TRUE(f.ok()) << "node " << n.id() << ": " << f.status().ToString();
    EXPECT_EQ(f->header.request_id, 0u) << "unsolicited";
    const auto* d = std::get_if<proto::RegionDeleted>(&f->message);
    ASSERT_NE(d, nullptr) << "node " << n.id() << " got " << proto::TypeName(f->header.type);
    EXPECT_EQ(d->region, r.region);
    EXPECT_EQ(d->base, r.base);
    EXPECT_EQ(d->size, r.size);
  };

  // A tool deletes: both live nodes are told.
  auto reply = tool->Call(proto::RegionDelete{.name = "gone"});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  ASSERT_EQ(std::get<proto::StatusReply>(*reply).code, 0);
  expect_notice(a, gone);
  expect_notice(b, gone);
  EXPECT_FALSE(left.socket().Receive(300).ok()) << "a node that left was told";
  EXPECT_FALSE(tool->Receive(300).ok()) << "a tool was told";

  // A node deletes: it hears its reply first, then the notice like the others.
  ASSERT_TRUE(a.socket().Send(proto::RegionDelete{.name = "later"}, 77).ok());
  auto answer = a.socket().Receive(3000);
  ASSERT_TRUE(answer.ok()) << answer.status().ToString();
  EXPECT_EQ(answer->header.request_id, 77u);
  const auto* st = std::get_if<proto::StatusReply>(&answer->message);
  ASSERT_NE(st, nullptr) << proto::TypeName(answer->header.type);
  EXPECT_EQ(st->code, 0);
  expect_notice(a, later);
  expect_notice(b, later);
  // A failed delete announces nothing.
  reply = tool->Call(proto::RegionDelete{.name = "later"});
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(std::get<proto::StatusReply>(*reply).code,
            static_cast<uint16_t>(StatusCode::kNotFound));
  EXPECT_FALSE(b.socket().Receive(300).ok()) << "a failed delete was announced";
}

// A node that stops heartbeating is declared dead: its sole copies are lost
// (reported, never silently zero), its shared copies live on elsewhere.
TEST(CoordinatorMembership, DeadNodeLosesSoleCopiesKeepsShared) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data", {"--heartbeat-ms", "100", "--dead-after-ms", "500"}).ok())
      << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  proto::RegionReply r = CreateRegion(*tool, "r", 16 * kPage);
  const proto::PageAddr sole = r.base, shared = r.base + kPage;
  ScriptedNode a, b;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  ASSERT_TRUE(b.Connect(coord.address()).ok());
  ASSERT_TRUE(a.Acquire(r.region, sole, AccessKind::kWrite).ok());
  ASSERT_TRUE(a.Acquire(r.region, shared, AccessKind::kWrite).ok());
  ASSERT_TRUE(b.Acquire(r.region, shared, AccessKind::kRead).ok());
  EXPECT_EQ(Query(*tool, shared).sharers.size(), 2u);

  // a goes silent; b keeps heartbeating.
  for (int i = 0; i < 15; ++i) {
    ASSERT_TRUE(b.Heartbeat().ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(80));
  }
  proto::PageQueryReply q = Query(*tool, sole);
  EXPECT_EQ(q.lost, 1);
  auto g = b.Acquire(r.region, sole, AccessKind::kRead);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kDataLoss));
  q = Query(*tool, shared);
  EXPECT_EQ(q.lost, 0);
  EXPECT_EQ(q.owner, b.id());
  ASSERT_EQ(q.sharers.size(), 1u);
  EXPECT_EQ(q.sharers[0], b.id());
  // The dead node's heartbeat is refused until it joins again.
  EXPECT_FALSE(a.Heartbeat().ok());
  EXPECT_NE(coord.stderr_text().find("declared dead"), std::string::npos);
}

// Node and region listings, paged by the coordinator.
// A peer that sends requests and never reads the replies is cut off once
// 64 MiB of them wait for it (ServerOptions::max_output_bytes), whether or
// not a write to it is in progress; the coordinator goes on serving others.
// Fails without: the limit was checked only between writes, so while a
// write to a peer that reads nothing was stuck the queue grew without
// bound (here the cut came only once the test read again).
TEST(CoordinatorInput, APeerThatNeverReadsIsCutOff) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  // A full page of the region list is about 40 KB with long names.
  for (uint32_t i = 0; i < proto::kMaxListEntries; ++i) {
    CreateRegion(*tool, std::string(240, 'r') + std::to_string(i), 4096);
  }
  auto greedy = ConnectTool(coord.address());
  ASSERT_TRUE(greedy.ok());
  // First 23 MB of replies, more than the sockets' buffers: a write to it
  // starts and never completes. Then the rest, queued behind that write.
  constexpr int kFirst = 600, kRequests = 3000;
  for (int i = 0; i < kFirst; ++i) greedy->Queue(proto::RegionList{0}, 1000 + i);
  ASSERT_TRUE(greedy->Flush().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int i = kFirst; i < kRequests; ++i) greedy->Queue(proto::RegionList{0}, 1000 + i);
  ASSERT_TRUE(greedy->Flush().ok());
  // Served meanwhile: another connection.
  auto open = tool->Call(proto::RegionOpen{.name = std::string(240, 'r') + "7"});
  ASSERT_TRUE(open.ok()) << open.status().ToString();
  EXPECT_NE(std::get_if<proto::RegionReply>(&*open), nullptr);
  // Cut off now, before it reads anything (not once the stuck write ends).
  bool cut = false;
  for (int i = 0; i < 100 && !cut; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    cut = coord.stderr_text().find("not reading its replies") != std::string::npos;
  }
  EXPECT_TRUE(cut) << "the replies kept piling up for a peer that reads nothing";
  int replies = 0;
  for (;;) {
    auto r = greedy->Receive(5000);
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().ToString();
      break;
    }
    ++replies;
  }
  EXPECT_LT(replies, kRequests) << "every reply was queued for a peer that did not read";
}

TEST(CoordinatorListing, NodesAndRegionsPageThrough) {
  TempDir dir;
  CoordinatorProcess coord;
  ASSERT_TRUE(coord.Start(dir.path() + "/data").ok()) << coord.stderr_text();
  auto tool = ConnectTool(coord.address());
  ASSERT_TRUE(tool.ok());
  const int kRegions = proto::kMaxListEntries + 5;
  for (int i = 0; i < kRegions; ++i) CreateRegion(*tool, "r" + std::to_string(i), 4096);
  ScriptedNode a, b;
  ASSERT_TRUE(a.Connect(coord.address()).ok());
  ASSERT_TRUE(b.Connect(coord.address()).ok());

  std::vector<proto::RegionReply> regions;
  uint64_t after = 0;
  int pages = 0;
  for (bool more = true; more; ++pages) {
    auto reply = tool->Call(proto::RegionList{after});
    ASSERT_TRUE(reply.ok());
    auto* r = std::get_if<proto::RegionListReply>(&*reply);
    ASSERT_NE(r, nullptr);
    for (const auto& e : r->regions) {
      EXPECT_GT(e.region, after) << "not in id order";
      after = e.region;
      regions.push_back(e);
    }
    more = r->more;
  }
  EXPECT_EQ(pages, 2);
  ASSERT_EQ(regions.size(), static_cast<size_t>(kRegions));
  EXPECT_EQ(regions.back().name, "r" + std::to_string(kRegions - 1));

  auto reply = tool->Call(proto::NodeList{0});
  ASSERT_TRUE(reply.ok());
  auto* n = std::get_if<proto::NodeListReply>(&*reply);
  ASSERT_NE(n, nullptr);
  ASSERT_EQ(n->nodes.size(), 2u);
  EXPECT_EQ(n->nodes[0].node, a.id());
  EXPECT_EQ(n->nodes[1].node, b.id());
  EXPECT_EQ(n->nodes[0].live, 1);
  EXPECT_EQ(n->nodes[0].address, "127.0.0.1:1");
  EXPECT_EQ(n->more, 0);
}

// --- Shards -------------------------------------------------------------------

std::vector<std::string> ShardFlags(uint32_t shard, uint32_t count,
                                    const std::string& authority = "") {
  std::vector<std::string> f = {"--shard", std::to_string(shard), "--shard-count",
                                std::to_string(count)};
  if (!authority.empty()) {
    f.push_back("--region-authority");
    f.push_back(authority);
  }
  return f;
}

// Shard 0 and shard 1 (following shard 0), each with a tool connection.
class TwoCoordinatorShards : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(shard0.Start(dir.path() + "/s0", ShardFlags(0, 2)).ok()) << shard0.stderr_text();
    ASSERT_TRUE(shard1.Start(dir.path() + "/s1", ShardFlags(1, 2, shard0.address())).ok())
        << shard1.stderr_text();
    auto c0 = ConnectTool(shard0.address());
    auto c1 = ConnectTool(shard1.address());
    ASSERT_TRUE(c0.ok() && c1.ok());
    t0 = std::move(*c0);
    t1 = std::move(*c1);
  }

  TempDir dir;
  CoordinatorProcess shard0, shard1;
  std::optional<proto::FramedSocket> t0, t1;
};


// Every region a coordinator knows, through RegionList pages.
std::vector<proto::RegionReply> ListRegions(proto::FramedSocket& s) {
  std::vector<proto::RegionReply> all;
  proto::RegionId after = 0;
  for (bool more = true; more;) {
    auto reply = s.Call(proto::RegionList{after});
    EXPECT_TRUE(reply.ok()) << reply.status().ToString();
    auto* r = reply.ok() ? std::get_if<proto::RegionListReply>(&*reply) : nullptr;
    EXPECT_NE(r, nullptr);
    if (r == nullptr) break;
    for (const proto::RegionReply& e : r->regions) {
      after = e.region;
      all.push_back(e);
    }
    more = r->more;
  }
  return all;
}

bool SameRegion(const proto::RegionReply& a, const proto::RegionReply& b) {
  return a.region == b.region && a.base == b.base && a.size == b.size &&
         a.page_size == b.page_size && a.name == b.name;
}

bool Lists(proto::FramedSocket& s, const proto::RegionReply& r) {
  for (const proto::RegionReply& e : ListRegions(s)) {
    if (SameRegion(e, r)) return true;
  }
  return false;
}

bool SameTables(proto::FramedSocket& a, proto::FramedSocket& b) {
  std::vector<proto::RegionReply> x = ListRegions(a), y = ListRegions(b);
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!SameRegion(x[i], y[i])) return false;
  }
  return true;
}

// Polls `done` every 20 ms for up to timeout_ms.
bool WaitUntil(const std::function<bool()>& done, int timeout_ms = 5000) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (done()) return true;
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

bool TimedOut(const Status& st) {
  return st.code() == StatusCode::kUnavailable &&
         (st.message().find("no grant within") != std::string::npos ||
          st.message().find("timed out") != std::string::npos);
}

// An Acquire as a node agent makes it: resent every 200 ms until answered.
Result<proto::Grant> AcquireResending(ScriptedNode& n, proto::RegionId region, proto::PageAddr page,
                                      AccessKind kind, int timeout_ms = 5000) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    Result<proto::Grant> g = n.Acquire(region, page, kind, 200);
    if (g.ok() || !TimedOut(g.status()) || std::chrono::steady_clock::now() > until) return g;
  }
}

// The code of a reply: 0 for anything but a StatusReply, -1 when none came.
int ReplyCode(const Result<proto::Message>& r) {
  if (!r.ok()) return -1;
  if (const auto* st = std::get_if<proto::StatusReply>(&*r)) return static_cast<int>(st->code);
  return 0;
}

std::string ReplyText(const Result<proto::Message>& r) {
  if (!r.ok()) return r.status().ToString();
  if (const auto* st = std::get_if<proto::StatusReply>(&*r)) return st->message;
  return proto::TypeName(proto::TypeOf(*r));
}

// The directory split over two coordinator processes by address: each shard
// serves the pages of its granules and refuses the others'; a node works with
// both at once, under the id shard 0 gave it; one shard's crash leaves the
// other serving. Regions are created at shard 0 only: shard 1 follows.
TEST_F(TwoCoordinatorShards, TwoShardsSplitTheDirectoryByAddress) {
  proto::RegionReply r0 = CreateRegion(*t0, "split", 8u << 20);
  ASSERT_TRUE(WaitUntil([&] { return Lists(*t1, r0); })) << shard1.stderr_text();
  const proto::ShardMap map(2);
  const proto::PageAddr p0 = r0.base, p1 = r0.base + proto::kShardGranule;
  ASSERT_EQ(map.ShardOf(p0), 0u);
  ASSERT_EQ(map.ShardOf(p1), 1u);

  ScriptedNode a0, a1, b0, b1;  // nodes a and b, each joined to both shards
  ASSERT_TRUE(a0.Connect(shard0.address()).ok());
  ASSERT_TRUE(b0.Connect(shard0.address()).ok());
  ASSERT_TRUE(a1.Connect(shard1.address(), a0.id()).ok());
  ASSERT_TRUE(b1.Connect(shard1.address(), b0.id()).ok());
  EXPECT_EQ(a1.id(), a0.id());
  EXPECT_EQ(b1.id(), b0.id());
  auto g = a0.Acquire(r0.region, p0, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  g = a1.Acquire(r0.region, p1, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  g = b1.Acquire(r0.region, p1, AccessKind::kRead);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->source, proto::DataSource::kOwner);
  EXPECT_EQ(Query(*t0, p0).owner, a0.id());
  EXPECT_EQ(Query(*t1, p1).sharers.size(), 2u);

  // A page of the other shard is refused (and that connection closed).
  auto wrong = b0.Acquire(r0.region, p1, AccessKind::kRead, 2000);
  EXPECT_FALSE(wrong.ok());
  auto q = t0->Call(proto::PageQuery{p1});
  ASSERT_TRUE(q.ok());
  auto* st = std::get_if<proto::StatusReply>(&*q);
  ASSERT_NE(st, nullptr);
  EXPECT_NE(st->message.find("shard 1"), std::string::npos) << st->message;

  // Shard 1 dies; shard 0 keeps serving its pages.
  shard1.Kill(SIGKILL);
  g = a0.Acquire(r0.region, p0 + 4096, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->state, proto::PageState::kModified);
}

// A follower is started with shard 0's address, and only a follower is.
TEST(CoordinatorShards, OtherShardsNeedTheRegionAuthority) {
  TempDir dir;
  std::string out;
  const std::string base = "--data-dir " + dir.path() + "/data --listen 127.0.0.1:0 --insecure";
  EXPECT_EQ(RunCoordinator(base + " --shard 1 --shard-count 2", &out), 2);
  EXPECT_NE(out.find("--region-authority"), std::string::npos) << out;
  EXPECT_EQ(RunCoordinator(base + " --shard 0 --shard-count 2 --region-authority 127.0.0.1:1", &out),
            2);
  EXPECT_NE(out.find("shard 0 is the authority"), std::string::npos) << out;
  EXPECT_EQ(RunCoordinator(base + " --region-authority 127.0.0.1:1", &out), 2);
  EXPECT_EQ(RunCoordinator(base + " --shard 1 --shard-count 2 --region-authority nowhere", &out), 2);
  EXPECT_NE(out.find("host:port"), std::string::npos) << out;
}

// (a) and (b): a create at shard 0 reaches shard 1, whose nodes are served
// in the new region; a node that asks shard 1 before the region arrives
// waits (its Acquire is dropped, and served when resent), never fails. A
// delete reaches shard 1 too: its pages are NOT_FOUND there, and their
// directory records are gone. A new region at the addresses is served, and
// a request naming the deleted one stays NOT_FOUND.
TEST_F(TwoCoordinatorShards, RegionChangesAtShard0ReachTheFollower) {
  ScriptedNode n0, n1;
  ASSERT_TRUE(n0.Connect(shard0.address()).ok());
  ASSERT_TRUE(n1.Connect(shard1.address(), n0.id()).ok());
  ASSERT_TRUE(WaitUntil([&] { return SameTables(*t0, *t1); }));

  // The first region lands at the window's base (first fit), with id 1:
  // ask shard 1 for a page of it before the region exists. No answer, not
  // NOT_FOUND.
  const proto::PageAddr window_base = 0x200000000000ull;
  const proto::PageAddr early = window_base + proto::kShardGranule;  // shard 1's granule
  proto::Acquire ask{.page = early, .node = n1.id(), .kind = AccessKind::kWrite,
                     .request_seq = 1000, .last_txn = 0, .region = 1};
  ASSERT_TRUE(n1.socket().Send(ask, 0).ok());
  auto silence = n1.socket().Receive(600);
  ASSERT_FALSE(silence.ok()) << "shard 1 answered an Acquire for a region it has not heard of: "
                             << proto::TypeName(silence->header.type);
  EXPECT_TRUE(TimedOut(silence.status())) << silence.status().ToString();

  proto::RegionReply r = CreateRegion(*t0, "fresh", 4u << 20);
  ASSERT_EQ(r.base, window_base);
  ASSERT_EQ(r.region, ask.region);
  // The node resends as an agent does, and is served once the region is there.
  auto g = AcquireResending(n1, r.region, early, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString() << "\n" << shard1.stderr_text();
  EXPECT_EQ(g->status, 0);
  EXPECT_EQ(g->state, proto::PageState::kModified);
  EXPECT_TRUE(Lists(*t1, r));
  EXPECT_EQ(Query(*t1, early).owner, n1.id());

  // The delete reaches shard 1: the page's record goes, and an Acquire for
  // it fails at once.
  auto del = t0->Call(proto::RegionDelete{.name = "fresh"});
  ASSERT_EQ(ReplyCode(del), 0) << ReplyText(del);
  ASSERT_TRUE(WaitUntil([&] { return ListRegions(*t1).empty(); })) << shard1.stderr_text();
  auto gone = t1->Call(proto::PageQuery{early});
  EXPECT_EQ(ReplyCode(gone), static_cast<int>(StatusCode::kNotFound)) << ReplyText(gone);
  ScriptedNode m0, m1;  // holds nothing there
  ASSERT_TRUE(m0.Connect(shard0.address()).ok());
  ASSERT_TRUE(m1.Connect(shard1.address(), m0.id()).ok());
  g = m1.Acquire(r.region, early, AccessKind::kRead, 2000);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound));
  // A region shard 1 has not heard of (an id shard 0 has not given yet) may
  // be on its way: dropped.
  auto unheard = m1.Acquire(r.region + 100, window_base + (1ull << 40) + proto::kShardGranule,
                            AccessKind::kRead, 600);
  EXPECT_FALSE(unheard.ok());
  EXPECT_TRUE(TimedOut(unheard.status())) << unheard.status().ToString();

  // A newer region over the same addresses is served, not NOT_FOUND; a
  // request naming the deleted region is not served that region's page.
  proto::RegionReply again = CreateRegion(*t0, "again", 4u << 20);
  ASSERT_EQ(again.base, window_base);
  ASSERT_TRUE(WaitUntil([&] { return Lists(*t1, again); }));
  g = m1.Acquire(r.region, early, AccessKind::kRead, 2000);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound));
  g = m1.Acquire(again.region, early, AccessKind::kRead, 2000);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->status, 0);
  EXPECT_EQ(g->state, proto::PageState::kShared);
}

// (c): a follower started after regions exist, more than one RegionList page
// of them, gets them all from the snapshot; restarted on its own store after
// shard 0 deleted and created regions, it drops the deleted ones (and their
// directory records) and adds the new ones.
TEST(CoordinatorShards, ALateOrRestartedFollowerGetsTheTableFromTheSnapshot) {
  TempDir dir;
  CoordinatorProcess shard0;
  ASSERT_TRUE(shard0.Start(dir.path() + "/s0", ShardFlags(0, 2)).ok()) << shard0.stderr_text();
  auto t0 = ConnectTool(shard0.address());
  ASSERT_TRUE(t0.ok());
  const int kRegions = proto::kMaxListEntries + 5;
  std::vector<proto::RegionReply> made;
  for (int i = 0; i < kRegions; ++i) {
    made.push_back(CreateRegion(*t0, "r" + std::to_string(i), (i % 3 + 1) * kPage));
  }
  const std::string data1 = dir.path() + "/s1";
  proto::PageAddr touched = 0;
  proto::RegionId touched_region = 0;
  {
    CoordinatorProcess shard1;
    ASSERT_TRUE(shard1.Start(data1, ShardFlags(1, 2, shard0.address())).ok()) << shard1.stderr_text();
    auto t1 = ConnectTool(shard1.address());
    ASSERT_TRUE(t1.ok());
    ASSERT_TRUE(WaitUntil([&] { return SameTables(*t0, *t1); })) << shard1.stderr_text();
    EXPECT_EQ(ListRegions(*t1).size(), static_cast<size_t>(kRegions));
    // A page of shard 1 in region r1 gets a directory record there.
    const proto::ShardMap map(2);
    for (const proto::RegionReply& r : made) {
      if (map.ShardOf(r.base) == 1 && r.name != made.back().name) {
        touched = r.base;
        touched_region = r.region;
        break;
      }
    }
    ASSERT_NE(touched, 0u);
    ScriptedNode n0, n1;
    ASSERT_TRUE(n0.Connect(shard0.address()).ok());
    ASSERT_TRUE(n1.Connect(shard1.address(), n0.id()).ok());
    auto g = n1.Acquire(touched_region, touched, AccessKind::kWrite);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    ASSERT_EQ(g->status, 0);
    shard1.Kill(SIGKILL);
  }
  // While shard 1 is down: the region of the touched page goes, another comes.
  std::string touched_name;
  for (const proto::RegionReply& r : made) {
    if (r.base == touched) touched_name = r.name;
  }
  proto::RegionReply late = CreateRegion(*t0, "late", 64 * kPage);  // before: not at its addresses
  auto del = t0->Call(proto::RegionDelete{.name = touched_name});
  ASSERT_EQ(ReplyCode(del), 0) << ReplyText(del);

  CoordinatorProcess shard1;
  ASSERT_TRUE(shard1.Start(data1, ShardFlags(1, 2, shard0.address())).ok()) << shard1.stderr_text();
  auto t1 = ConnectTool(shard1.address());
  ASSERT_TRUE(t1.ok());
  ASSERT_TRUE(WaitUntil([&] { return SameTables(*t0, *t1); })) << shard1.stderr_text();
  EXPECT_TRUE(Lists(*t1, late));
  auto q = t1->Call(proto::PageQuery{touched});
  EXPECT_EQ(ReplyCode(q), static_cast<int>(StatusCode::kNotFound)) << ReplyText(q);
  ScriptedNode n0, n1;
  ASSERT_TRUE(n0.Connect(shard0.address()).ok());
  ASSERT_TRUE(n1.Connect(shard1.address(), n0.id()).ok());
  auto g = n1.Acquire(touched_region, touched, AccessKind::kRead, 2000);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound))
      << "a region dropped by the snapshot is known to be deleted";
}

// (d): shard 0 killed and restarted on its address: the follower notices,
// logs the outage once, reconnects and follows the restarted shard 0. A
// follower stops promptly on SIGTERM, even while shard 0 is away.
TEST(CoordinatorShards, TheFollowerReconnectsWhenShard0Restarts) {
  TempDir dir;
  const std::string data0 = dir.path() + "/s0";
  auto shard0 = std::make_unique<CoordinatorProcess>();
  ASSERT_TRUE(shard0->Start(data0, ShardFlags(0, 2)).ok()) << shard0->stderr_text();
  const std::string address0 = shard0->address();
  CoordinatorProcess shard1;
  ASSERT_TRUE(shard1.Start(dir.path() + "/s1", ShardFlags(1, 2, address0)).ok())
      << shard1.stderr_text();
  auto t1 = ConnectTool(shard1.address());
  ASSERT_TRUE(t1.ok());
  {
    auto t0 = ConnectTool(address0);
    ASSERT_TRUE(t0.ok());
    proto::RegionReply before = CreateRegion(*t0, "before", 4 * kPage);
    ASSERT_TRUE(WaitUntil([&] { return Lists(*t1, before); })) << shard1.stderr_text();
  }
  shard0->Kill(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));  // five retries
  const std::string outage = shard1.stderr_text();
  size_t warnings = 0;
  for (size_t at = outage.find("retrying every"); at != std::string::npos;
       at = outage.find("retrying every", at + 1)) {
    ++warnings;
  }
  EXPECT_EQ(warnings, 1u) << "the outage is logged once:\n" << outage;

  shard0 = std::make_unique<CoordinatorProcess>();
  std::vector<std::string> flags = ShardFlags(0, 2);
  flags.push_back("--listen");
  flags.push_back(address0);
  ASSERT_TRUE(shard0->Start(data0, flags).ok()) << shard0->stderr_text();
  ASSERT_EQ(shard0->address(), address0);
  auto t0 = ConnectTool(address0);
  ASSERT_TRUE(t0.ok());
  proto::RegionReply after = CreateRegion(*t0, "after", 4 * kPage);
  ASSERT_TRUE(WaitUntil([&] { return Lists(*t1, after); })) << shard1.stderr_text();
  EXPECT_TRUE(SameTables(*t0, *t1));
  ScriptedNode n0, n1;
  ASSERT_TRUE(n0.Connect(address0).ok());
  ASSERT_TRUE(n1.Connect(shard1.address(), n0.id()).ok());
  const proto::PageAddr page = after.base + (proto::ShardMap(2).ShardOf(after.base) == 1
                                                 ? 0
                                                 : proto::kShardGranule);
  if (page < after.base + after.size) {
    auto g = n1.Acquire(after.region, page, AccessKind::kWrite);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->status, 0);
  }

  // SIGTERM while shard 0 is away again: the follower's thread stops with it.
  shard0->Kill(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  shard1.Signal(SIGTERM);
  EXPECT_EQ(shard1.WaitExit(3000), 0) << shard1.stderr_text();
}

// (e) and (f): region requests go to shard 0 only; a follower says where.
// Node ids come from shard 0: a follower takes a node with an id it has
// never seen as a new member (resuming or not), and refuses to assign one.
TEST_F(TwoCoordinatorShards, AFollowerRefusesRegionRequestsAndTakesShard0NodeIds) {
  proto::RegionReply r = CreateRegion(*t0, "only-at-0", 4u << 20);
  ASSERT_TRUE(WaitUntil([&] { return Lists(*t1, r); })) << shard1.stderr_text();

  const int kRefused = static_cast<int>(StatusCode::kFailedPrecondition);
  std::vector<std::pair<const char*, proto::Message>> requests = {
      {"RegionCreate", proto::RegionCreate{.name = "at-1", .size = kPage, .page_size = kPage}},
      {"RegionOpen", proto::RegionOpen{.name = "only-at-0"}},
      {"RegionDelete", proto::RegionDelete{.name = "only-at-0"}},
      {"RegionWatch", proto::RegionWatch{}},
  };
  for (const auto& [what, m] : requests) {
    auto reply = t1->Call(m);
    EXPECT_EQ(ReplyCode(reply), kRefused) << what << ": " << ReplyText(reply);
    EXPECT_NE(ReplyText(reply).find("managed by shard 0 at " + shard0.address()), std::string::npos)
        << what << ": " << ReplyText(reply);
  }
  EXPECT_TRUE(Lists(*t0, r)) << "the refused delete reached nobody";
  EXPECT_EQ(ReplyCode(t0->Call(proto::RegionOpen{.name = "at-1"})),
            static_cast<int>(StatusCode::kNotFound));

  // No id from shard 1.
  {
    auto s = ConnectTool(shard1.address());
    ASSERT_TRUE(s.ok());
    auto reply = s->Call(proto::JoinRequest{.node = proto::kNoNode, .address = "127.0.0.1:1"});
    EXPECT_EQ(ReplyCode(reply), kRefused) << ReplyText(reply);
    EXPECT_NE(ReplyText(reply).find("join shard 0 first"), std::string::npos) << ReplyText(reply);
  }
  // Ids from shard 0, new to shard 1: a new daemon, and one resuming.
  ScriptedNode a0, b0, a1;
  ASSERT_TRUE(a0.Connect(shard0.address()).ok());
  ASSERT_TRUE(b0.Connect(shard0.address()).ok());
  ASSERT_NE(a0.id(), b0.id());
  Status joined = a1.Connect(shard1.address(), a0.id());
  ASSERT_TRUE(joined.ok()) << joined.ToString();
  EXPECT_EQ(a1.id(), a0.id());
  auto b1 = ConnectTool(shard1.address());
  ASSERT_TRUE(b1.ok());
  auto resumed = b1->Call(
      proto::JoinRequest{.node = b0.id(), .address = "127.0.0.1:2", .resume = 1});
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  auto* jr = std::get_if<proto::JoinReply>(&*resumed);
  ASSERT_NE(jr, nullptr) << ReplyText(resumed);
  EXPECT_EQ(jr->node, b0.id());
  EXPECT_EQ(jr->shard, 1u);
  EXPECT_EQ(jr->shard_count, 2u);

  const proto::PageAddr p1 = r.base + proto::kShardGranule;
  ASSERT_EQ(proto::ShardMap(2).ShardOf(p1), 1u);
  auto g = a1.Acquire(r.region, p1, AccessKind::kWrite);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->status, 0);
  EXPECT_EQ(g->state, proto::PageState::kModified);
  EXPECT_EQ(Query(*t1, p1).owner, a0.id());
  auto nodes = t1->Call(proto::NodeList{0});
  ASSERT_TRUE(nodes.ok());
  auto* list = std::get_if<proto::NodeListReply>(&*nodes);
  ASSERT_NE(list, nullptr);
  ASSERT_EQ(list->nodes.size(), 2u);
  EXPECT_EQ(list->nodes[0].node, std::min(a0.id(), b0.id()));
  EXPECT_EQ(list->nodes[1].node, std::max(a0.id(), b0.id()));
}

}  // namespace
}  // namespace dsvm::testing
