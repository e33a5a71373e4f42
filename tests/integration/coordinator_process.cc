#include "tests/integration/coordinator_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace dsvm::testing {

TempDir::TempDir() {
  char tmpl[] = "/tmp/dsvm-test-XXXXXX";
  char* p = ::mkdtemp(tmpl);
  DSVM_CHECK(p != nullptr);
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

namespace {

// The secret file, removed when the test process exits.
struct SecretFile {
  TempDir dir;
  std::string path = dir.path() + "/secret";
  SecretFile() {
    auto made = proto::ClusterSecret::Generate(path);
    DSVM_CHECK_MSG(made.ok(), made.status().ToString().c_str());
  }
};

}  // namespace

const std::string& TestSecretPath() {
  static const SecretFile file;
  return file.path;
}

const proto::ClusterSecret& TestSecret() {
  static const proto::ClusterSecret secret = [] {
    auto s = proto::ClusterSecret::Load(TestSecretPath());
    DSVM_CHECK_MSG(s.ok(), s.status().ToString().c_str());
    return std::move(*s);
  }();
  return secret;
}

Result<proto::FramedSocket> ConnectTool(const std::string& address) {
  return proto::ConnectToCoordinator(address, &TestSecret());
}

CoordinatorProcess::~CoordinatorProcess() {
  if (pid_ > 0) Kill(SIGKILL);
}

Status CoordinatorProcess::Start(const std::string& data_dir,
                                 const std::vector<std::string>& extra_flags) {
  const std::string port_file = data_dir + ".port";
  log_path_ = data_dir + ".log";
  std::filesystem::remove(port_file);
  std::vector<std::string> args = {DSVM_COORDINATOR_BIN, "--data-dir", data_dir, "--listen",
                                   "127.0.0.1:0", "--port-file", port_file};
  args.insert(args.end(), extra_flags.begin(), extra_flags.end());
  if (std::find(extra_flags.begin(), extra_flags.end(), "--insecure") == extra_flags.end()) {
    args.push_back("--secret-file");
    args.push_back(TestSecretPath());
  }
  pid_t pid = ::fork();
  if (pid < 0) return IoError("fork failed");
  if (pid == 0) {
    int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 2);
      ::dup2(fd, 1);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  pid_ = pid;
  for (int i = 0; i < 1000; ++i) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return Unavailable("coordinator exited with " +
                         std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) + ": " +
                         stderr_text());
    }
    std::ifstream f(port_file);
    unsigned port = 0;
    if (f >> port && port > 0) {
      port_ = static_cast<uint16_t>(port);
      return Status::Ok();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return Unavailable("coordinator did not listen within 10 s: " + stderr_text());
}

void CoordinatorProcess::Kill(int signal) {
  if (pid_ <= 0) return;
  ::kill(pid_, signal);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

void CoordinatorProcess::Signal(int signal) {
  if (pid_ > 0) ::kill(pid_, signal);
}

int CoordinatorProcess::WaitExit(int timeout_ms) {
  for (int waited = 0; pid_ > 0 && waited < timeout_ms; waited += 10) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return INT32_MIN;
}

std::string CoordinatorProcess::stderr_text() const {
  std::ifstream f(log_path_);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  return s.size() > 2000 ? s.substr(s.size() - 2000) : s;
}

// ---------------------------------------------------------------------------

Status ScriptedNode::Connect(const std::string& address, proto::NodeId rejoin_as) {
  DSVM_ASSIGN_OR_RETURN(sock_, ConnectTool(address));
  proto::JoinRequest j;
  j.node = rejoin_as;
  j.address = "127.0.0.1:1";
  j.host_memory_bytes = 1 << 30;
  DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(j));
  if (auto* s = std::get_if<proto::StatusReply>(&reply)) return proto::FromReply(*s);
  auto* jr = std::get_if<proto::JoinReply>(&reply);
  if (jr == nullptr) return Internal("join answered with something else");
  id_ = jr->node;
  return Status::Ok();
}

void ScriptedNode::Answer(const proto::Message& m) {
  if (auto* g = std::get_if<proto::Grant>(&m)) {
    if (g->status != 0) return;
    if (g->txn > last_txn_[g->page]) {
      last_txn_[g->page] = g->txn;
      state_[g->page] = g->state;
    }
    sock_.Send(proto::Done{g->page, g->txn, id_}, 0).IgnoreError();
  } else if (auto* inv = std::get_if<proto::Invalidate>(&m)) {
    if (inv->txn > last_txn_[inv->page]) {
      last_txn_[inv->page] = inv->txn;
      state_[inv->page] = proto::PageState::kInvalid;
    }
    sock_.Send(proto::InvalidateAck{inv->page, inv->txn, id_}, 0).IgnoreError();
  } else if (auto* f = std::get_if<proto::Fetch>(&m)) {
    if (f->txn > last_txn_[f->page]) {
      last_txn_[f->page] = f->txn;
      state_[f->page] = f->next_state;
    }
    if (!f->send_data) sock_.Send(proto::InvalidateAck{f->page, f->txn, id_}, 0).IgnoreError();
  }
}

bool ScriptedNode::Holds(proto::PageAddr page, bool write) const {
  auto it = state_.find(page);
  if (it == state_.end()) return false;
  return write ? it->second == proto::PageState::kModified
               : it->second != proto::PageState::kInvalid;
}

Result<proto::Grant> ScriptedNode::Acquire(proto::RegionId region, proto::PageAddr page,
                                           proto::AccessKind kind, int timeout_ms) {
  if (Holds(page, kind != proto::AccessKind::kRead)) {
    return FailedPrecondition("the node's copy already allows this access");
  }
  proto::Acquire a;
  a.page = page;
  a.node = id_;
  a.kind = kind;
  if (kind == proto::AccessKind::kWrite && state_[page] == proto::PageState::kShared) {
    a.kind = proto::AccessKind::kUpgrade;
  }
  a.request_seq = ++next_seq_;
  a.last_txn = last_txn_[page];
  a.region = region;
  DSVM_RETURN_IF_ERROR(sock_.Send(a, 0));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    deadline - std::chrono::steady_clock::now())
                                    .count());
    if (left <= 0) return Unavailable("no grant within the timeout");
    DSVM_ASSIGN_OR_RETURN(proto::Frame f, sock_.Receive(left));
    Answer(f.message);
    if (auto* g = std::get_if<proto::Grant>(&f.message)) {
      if (g->page == page && g->request_seq == a.request_seq) return *g;
    }
  }
}

Status ScriptedNode::Heartbeat() {
  DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(proto::Heartbeat{id_, {}}));
  // Directory messages that arrived meanwhile were skipped by Call; the
  // directory resends them.
  auto* s = std::get_if<proto::StatusReply>(&reply);
  if (s == nullptr) return Internal("heartbeat answered with something else");
  return proto::FromReply(*s);
}

void ScriptedNode::Serve(int ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < until) {
    auto f = sock_.Receive(10);
    if (f.ok()) Answer(f->message);
  }
}

}  // namespace dsvm::testing
