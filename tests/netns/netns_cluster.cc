#include "tests/netns/netns_cluster.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "proto/auth.h"

extern char** environ;

namespace dsvm::testing {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kVeth = "dsvm0";           // each member's end, inside its namespace
constexpr const char* kNetnsDir = "/run/netns";  // where `ip netns add` mounts namespaces

// Set for every process started in a namespace.
std::vector<std::string> ExtraEnvironment(const std::string& secret_path) {
  return {
      "UCX_TLS=tcp",                            // never shared memory between namespaces
      std::string("UCX_NET_DEVICES=") + kVeth,  // and only the veth
      "UCX_WARN_UNUSED_ENV_VARS=n",
      "DSVM_SECRET_FILE=" + secret_path,  // the cluster secret (proto/auth.h)
  };
}

std::string FindTool(const std::string& name) {
  for (const char* dir : {"/usr/sbin", "/sbin", "/usr/bin", "/bin"}) {
    std::string p = std::string(dir) + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

std::string Join(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

std::string ReadTail(const std::string& path, size_t max) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  return s.size() > max ? "..." + s.substr(s.size() - max) : s;
}

int DecodeWait(int status) {
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// argv and envp as execve wants them; built before fork, since the child of
// a process that may have threads must not allocate.
struct ExecArgs {
  std::vector<std::string> storage;
  std::vector<char*> argv, envp;
  // extra_env: NAME=VALUE entries that replace or add to this process's
  // environment; none: the environment is inherited as it is.
  ExecArgs(const std::vector<std::string>& args, const std::vector<std::string>& extra_env = {}) {
    storage = args;
    size_t nargs = storage.size();
    if (!extra_env.empty()) {
      for (char** e = environ; *e != nullptr; ++e) {
        const std::string kv = *e;
        bool replaced = false;
        for (const auto& x : extra_env) {
          if (kv.compare(0, x.find('=') + 1, x, 0, x.find('=') + 1) == 0) replaced = true;
        }
        if (!replaced) storage.push_back(kv);
      }
      for (const auto& x : extra_env) storage.push_back(x);
    }
    for (size_t i = 0; i < storage.size(); ++i) {
      (i < nargs ? argv : envp).push_back(storage[i].data());
    }
    argv.push_back(nullptr);
    envp.push_back(nullptr);
  }
  char* const* env() const {
    return envp.size() > 1 ? const_cast<char* const*>(envp.data()) : environ;
  }
};

}  // namespace

std::string ProcessResult::Describe() const {
  std::string s = code == kTimedOut ? "killed (timed out, or another client failed)"
                                    : "exit code " + std::to_string(code);
  if (code > 128) s += " (signal " + std::to_string(code - 128) + ")";
  if (!err.empty()) s += "; stderr: " + err;
  return s;
}

NetnsCluster::NetnsCluster(int nodes)
    : nodes_(nodes), prefix_("dsvmt" + std::to_string(::getpid())), daemons_(nodes) {
  DSVM_CHECK(nodes >= 1 && nodes <= 9);
}

NetnsCluster::~NetnsCluster() {
  Status st = Stop();
  if (!st.ok()) std::fprintf(stderr, "NetnsCluster: %s\n", st.ToString().c_str());
}

std::string NetnsCluster::Namespace(const std::string& role) const { return prefix_ + role; }

// Roles, in the order their namespaces are made: hub, coordinator, nodes.
std::vector<std::string> NetnsCluster::Roles() const {
  std::vector<std::string> roles = {"h", "c"};
  for (int k = 1; k <= nodes_; ++k) roles.push_back("n" + std::to_string(k));
  return roles;
}

std::vector<std::string> NetnsCluster::namespaces() const {
  std::vector<std::string> v;
  for (const auto& r : Roles()) v.push_back(Namespace(r));
  return v;
}

std::string NetnsCluster::node_address(int k) const { return "10.77.0." + std::to_string(10 + k); }
std::string NetnsCluster::node_socket(int k) const {
  return dir_ + "/node" + std::to_string(k) + ".sock";
}
std::string NetnsCluster::node_namespace(int k) const { return Namespace("n" + std::to_string(k)); }

Result<std::string> NetnsCluster::Tool(const std::vector<std::string>& argv) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return IoError("pipe2: " + std::string(std::strerror(errno)));
  ExecArgs exec(argv);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(out[0]);
    ::close(out[1]);
    return IoError("fork: " + std::string(std::strerror(errno)));
  }
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    ::execve(exec.argv[0], exec.argv.data(), environ);
    ::_exit(127);
  }
  ::close(out[1]);
  std::string text;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(out[0], buf, sizeof(buf));
    if (n > 0)
      text.append(buf, static_cast<size_t>(n));
    else if (n == 0 || errno != EINTR)
      break;
  }
  ::close(out[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    return Unavailable("`" + Join(argv) + "` failed (" + std::to_string(DecodeWait(status)) +
                       "): " + text);
  }
  return text;
}

std::string NetnsCluster::Unsupported() {
  if (::geteuid() != 0) {
    return "not root: the netns tests make network namespaces, which needs CAP_SYS_ADMIN and "
           "CAP_NET_ADMIN (run them as root)";
  }
  const std::string ip = FindTool("ip");
  if (ip.empty()) return "iproute2's `ip` is not installed";
  if (FindTool("ss").empty()) return "iproute2's `ss` is not installed";
  NetnsCluster probe(1);
  const std::string ns = probe.prefix_ + "probe";
  auto added = probe.Tool({ip, "netns", "add", ns});
  if (!added.ok()) return "cannot make a network namespace: " + added.status().message();
  std::string why;
  auto bridge = probe.Tool({ip, "-n", ns, "link", "add", "br0", "type", "bridge"});
  auto veth = probe.Tool({ip, "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"});
  if (!bridge.ok())
    why = "cannot make a bridge: " + bridge.status().message();
  else if (!veth.ok())
    why = "cannot make a veth pair: " + veth.status().message();
  probe.Tool({ip, "netns", "del", ns}).status().IgnoreError();
  return why;
}

// Namespaces whose test process is gone (killed before it could clean up,
// and its watcher too): named dsvmt<pid>..., with no process <pid>.
void NetnsCluster::CleanStale() {
  const std::string ip = FindTool("ip");
  DIR* d = ::opendir(kNetnsDir);
  if (d == nullptr) return;
  std::vector<std::string> stale;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("dsvmt", 0) != 0) continue;
    size_t i = 5;
    while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
    if (i == 5 || i > 14) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name.substr(5, i - 5)));
    if (pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) stale.push_back(name);
  }
  ::closedir(d);
  for (const auto& ns : stale) {
    auto pids = Tool({ip, "netns", "pids", ns});
    if (pids.ok()) {
      std::istringstream in(*pids);
      for (pid_t p; in >> p;) ::kill(p, SIGKILL);
    }
    std::fprintf(stderr, "NetnsCluster: deleting namespace %s left by a dead test\n", ns.c_str());
    Tool({ip, "netns", "del", ns}).status().IgnoreError();
  }
}

// The watcher: a shell reading one line on its stdin. "done" means the
// cluster was stopped; end of file means the test process died, and the
// watcher kills what runs in the namespaces, deletes them and removes the
// cluster's directory.
Status NetnsCluster::StartWatcher() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return IoError("pipe2: " + std::string(std::strerror(errno)));
  std::vector<std::string> argv = {"/bin/sh", "-c",
                                   "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
                                   "read -r word; [ \"$word\" = done ] && exit 0\n"
                                   "dir=$1; shift\n"
                                   "for ns in \"$@\"; do for p in $(ip netns pids \"$ns\" "
                                   "2>/dev/null); do kill -9 \"$p\"; done; done\n"
                                   "sleep 0.5\n"
                                   "for ns in \"$@\"; do ip netns del \"$ns\" 2>/dev/null; done\n"
                                   "rm -rf \"$dir\"\n",
                                   "dsvm-netns-watcher", dir_};
  for (const auto& ns : namespaces()) argv.push_back(ns);
  ExecArgs exec(argv);
  const pid_t pid = ::fork();
  if (pid < 0) return IoError("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    // Its own session: a ^C to the test's process group must not kill it.
    ::setsid();
    const int null = ::open("/dev/null", O_RDWR);
    ::dup2(fds[0], 0);
    // Not ctest's pipes: ctest would wait for the watcher to close them.
    ::dup2(null, 1);
    ::dup2(null, 2);
    ::execve(exec.argv[0], exec.argv.data(), environ);
    ::_exit(127);
  }
  ::close(fds[0]);
  watcher_ = pid;
  watcher_fd_ = fds[1];
  return Status::Ok();
}

Status NetnsCluster::BuildTopology() {
  const std::string ip = FindTool("ip");
  for (const auto& role : Roles()) {
    DSVM_RETURN_IF_ERROR(Tool({ip, "netns", "add", Namespace(role)}).status());
    made_.push_back(Namespace(role));
  }
  const std::string hub = Namespace("h");
  DSVM_RETURN_IF_ERROR(Tool({ip, "-n", hub, "link", "add", "br0", "type", "bridge"}).status());
  DSVM_RETURN_IF_ERROR(Tool({ip, "-n", hub, "link", "set", "br0", "up"}).status());
  for (const auto& role : Roles()) {
    if (role == "h") continue;
    const std::string ns = Namespace(role);
    const std::string port = "p" + role;
    const std::string address =
        (role == "c" ? std::string("10.77.0.1") : node_address(std::stoi(role.substr(1)))) + "/24";
    DSVM_RETURN_IF_ERROR(Tool({ip, "-n", hub, "link", "add", port, "type", "veth", "peer", "name",
                               kVeth, "netns", ns})
                             .status());
    DSVM_RETURN_IF_ERROR(
        Tool({ip, "-n", hub, "link", "set", port, "master", "br0", "up"}).status());
    DSVM_RETURN_IF_ERROR(Tool({ip, "-n", ns, "link", "set", "lo", "up"}).status());
    DSVM_RETURN_IF_ERROR(Tool({ip, "-n", ns, "addr", "add", address, "dev", kVeth}).status());
    DSVM_RETURN_IF_ERROR(Tool({ip, "-n", ns, "link", "set", kVeth, "up"}).status());
  }
  return Status::Ok();
}

NetnsCluster::Proc NetnsCluster::Spawn(const std::string& ns, const std::vector<std::string>& argv,
                                       const std::string& log_name, bool split) {
  Proc p;
  p.out_path = dir_ + "/" + log_name + (split ? ".out" : ".log");
  p.err_path = split ? dir_ + "/" + log_name + ".err" : p.out_path;
  // `ip netns exec` enters the namespace, remounts /sys for it and execs the
  // program in the same process: the pid is the program's.
  std::vector<std::string> full = {FindTool("ip"), "netns", "exec", ns};
  full.insert(full.end(), argv.begin(), argv.end());
  ExecArgs exec(full, ExtraEnvironment(secret_path()));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return p;
  if (pid == 0) {
    // Dies with the test process, however that ends.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    const int in = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    const int out = ::open(p.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int err =
        split ? ::open(p.err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : out;
    if (in < 0 || out < 0 || err < 0) ::_exit(125);
    ::dup2(in, 0);
    ::dup2(out, 1);
    ::dup2(err, 2);
    ::execve(exec.argv[0], exec.argv.data(), exec.env());
    ::_exit(127);
  }
  p.pid = pid;
  p.started = Clock::now();
  return p;
}

bool NetnsCluster::Running(Proc& p) {
  if (p.pid <= 0) return false;
  int status = 0;
  if (::waitpid(p.pid, &status, WNOHANG) == p.pid) {
    p.code = DecodeWait(status);
    p.pid = -1;
    p.ended = Clock::now();
    return false;
  }
  return true;
}

void NetnsCluster::Kill(Proc& p) {
  if (p.pid <= 0) return;
  ::kill(p.pid, SIGKILL);
  int status = 0;
  while (::waitpid(p.pid, &status, 0) < 0 && errno == EINTR) {
  }
  p.pid = -1;
  p.ended = Clock::now();
}

ProcessResult NetnsCluster::Collect(const Proc& p) const {
  ProcessResult r;
  r.code = p.code;
  r.out = ReadTail(p.out_path, 1 << 20);
  r.err = ReadTail(p.err_path, 4000);
  r.seconds = std::chrono::duration<double>(p.ended - p.started).count();
  return r;
}

// A fresh cluster secret, readable by its owner only (ClusterSecret::Load
// refuses anything else).
Status NetnsCluster::WriteSecret() {
  return proto::ClusterSecret::Generate(secret_path()).status();
}

Status NetnsCluster::Start() {
  stopped_ = false;
  char tmpl[] = "/tmp/dsvm-netns-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return IoError("mkdtemp: " + std::string(std::strerror(errno)));
  dir_ = tmpl;
  CleanStale();
  DSVM_RETURN_IF_ERROR(WriteSecret());
  DSVM_RETURN_IF_ERROR(StartWatcher());
  DSVM_RETURN_IF_ERROR(BuildTopology());

  const std::string port_file = dir_ + "/coordinator.port";
  coordinator_ = Spawn(Namespace("c"),
                       {DSVM_COORDINATOR_BIN, "--data-dir", dir_ + "/coordinator", "--listen",
                        "10.77.0.1:0", "--port-file", port_file},
                       "coordinator", false);
  if (coordinator_.pid < 0) return IoError("fork failed");
  for (auto deadline = Clock::now() + std::chrono::seconds(10);;) {
    std::ifstream f(port_file);
    unsigned port = 0;
    if (f >> port && port > 0) {
      coordinator_address_ = "10.77.0.1:" + std::to_string(port);
      break;
    }
    if (!Running(coordinator_)) return Unavailable("the coordinator exited: " + Logs());
    if (Clock::now() > deadline)
      return Unavailable("the coordinator did not listen within 10 s: " + Logs());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  for (int k = 1; k <= nodes_; ++k) {
    daemons_[k - 1] = Spawn(node_namespace(k),
                            {DSVM_NODE_BIN, "--coordinator", coordinator_address_, "--listen",
                             node_address(k) + ":0", "--socket", node_socket(k)},
                            "node" + std::to_string(k), false);
    if (daemons_[k - 1].pid < 0) return IoError("fork failed");
  }
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  for (int k = 1; k <= nodes_; ++k) {
    for (;;) {
      struct stat st;
      if (::stat(node_socket(k).c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) break;
      if (!Running(daemons_[k - 1]))
        return Unavailable("node " + std::to_string(k) + " exited: " + Logs());
      if (Clock::now() > deadline) {
        return Unavailable("node " + std::to_string(k) + " made no socket within 10 s: " + Logs());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return Status::Ok();
}

Status NetnsCluster::Stop() {
  if (stopped_) return Status::Ok();
  stopped_ = true;
  std::string problems;
  // Daemons first (they would otherwise retry the coordinator), a clean
  // SIGTERM so they leave; SIGKILL for any that hangs.
  auto stop = [](std::vector<Proc*> procs, NetnsCluster* self) {
    for (Proc* p : procs) {
      if (p->pid > 0) ::kill(p->pid, SIGTERM);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(3);
    for (Proc* p : procs) {
      while (self->Running(*p) && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (p->pid > 0) {
        std::fprintf(stderr, "NetnsCluster: pid %d ignored SIGTERM for 3 s; killing it\n", p->pid);
        self->Kill(*p);
      }
    }
  };
  std::vector<Proc*> daemons;
  for (auto& d : daemons_) daemons.push_back(&d);
  stop(daemons, this);
  stop({&coordinator_}, this);

  const std::string ip = FindTool("ip");
  for (const auto& ns : made_) {
    auto pids = Tool({ip, "netns", "pids", ns});
    std::istringstream in(pids.ok() ? *pids : "");
    for (pid_t p; in >> p;) {
      problems += "pid " + std::to_string(p) + " was left in " + ns + " (killed); ";
      ::kill(p, SIGKILL);
    }
  }
  for (auto it = made_.rbegin(); it != made_.rend(); ++it) {
    // Deleting needs no process inside; a killed one may take a moment to go.
    Status st = Tool({ip, "netns", "del", *it}).status();
    for (int i = 0; !st.ok() && i < 50; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      st = Tool({ip, "netns", "del", *it}).status();
    }
    if (!st.ok()) problems += st.message() + "; ";
    if (::access((std::string(kNetnsDir) + "/" + *it).c_str(), F_OK) == 0) {
      problems += "namespace " + *it + " is still there; ";
    }
  }
  made_.clear();
  if (watcher_ > 0) {
    const char done[] = "done\n";
    if (::write(watcher_fd_, done, sizeof(done) - 1) < 0) problems += "the watcher was gone; ";
    ::close(watcher_fd_);
    int status = 0;
    while (::waitpid(watcher_, &status, 0) < 0 && errno == EINTR) {
    }
    watcher_ = -1;
    watcher_fd_ = -1;
  }
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  if (!problems.empty()) return Internal("teardown: " + problems);
  return Status::Ok();
}

ProcessResult NetnsCluster::Client(int k, const std::vector<std::string>& args, int timeout_ms) {
  return Clients({{k, args}}, timeout_ms)[0];
}

std::vector<ProcessResult> NetnsCluster::Clients(
    const std::vector<std::pair<int, std::vector<std::string>>>& runs, int timeout_ms,
    const Tick& tick) {
  std::vector<Proc> procs;
  for (const auto& [k, args] : runs) {
    DSVM_CHECK(k >= 1 && k <= nodes_);
    std::vector<std::string> argv = {DSVM_NETNS_CLIENT_BIN, "--socket", node_socket(k)};
    argv.insert(argv.end(), args.begin(), args.end());
    procs.push_back(
        Spawn(node_namespace(k), argv, "client" + std::to_string(++client_runs_), true));
  }
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms);
  for (bool failed = false;;) {
    int running = 0;
    for (auto& p : procs) {
      if (Running(p)) {
        ++running;
      } else if (p.code != 0) {
        failed = true;
      }
    }
    if (running == 0) break;
    if (failed || Clock::now() > deadline) {
      for (auto& p : procs) Kill(p);  // their code stays kTimedOut
      break;
    }
    if (tick) {
      tick(static_cast<int>(
               std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()),
           running);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  std::vector<ProcessResult> results;
  for (const auto& p : procs) results.push_back(Collect(p));
  return results;
}

Status NetnsCluster::Partition(int k, bool cut) {
  DSVM_CHECK(k >= 1 && k <= nodes_);
  return Tool({FindTool("ip"), "-n", Namespace("h"), "link", "set", "pn" + std::to_string(k),
               cut ? "down" : "up"})
      .status();
}

bool NetnsCluster::NodeRunning(int k) { return Running(daemons_.at(k - 1)); }
bool NetnsCluster::CoordinatorRunning() { return Running(coordinator_); }

Result<uint64_t> NetnsCluster::ReceivedBytes(int k) {
  DSVM_ASSIGN_OR_RETURN(std::string json, Tool({FindTool("ip"), "-n", node_namespace(k), "-s", "-j",
                                                "link", "show", "dev", kVeth}));
  const std::string key = "\"rx\":{\"bytes\":";
  const size_t at = json.find(key);
  if (at == std::string::npos) return Internal("no rx bytes in `ip -s -j link` output: " + json);
  return static_cast<uint64_t>(std::stoull(json.substr(at + key.size())));
}

Result<std::vector<NetnsCluster::TcpConnection>> NetnsCluster::TcpConnections(int k) {
  DSVM_ASSIGN_OR_RETURN(std::string text, Tool({FindTool("ss"), "-N", node_namespace(k), "-H", "-t",
                                                "-n", "-i", "state", "established"}));
  // Each connection: "Recv-Q Send-Q Local:Port Peer:Port", then an indented
  // line of tcp_info fields, bytes_received:N among them (absent while 0).
  std::vector<TcpConnection> connections;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    std::istringstream in(line);
    if (line[0] != ' ' && line[0] != '\t') {
      std::string recvq, sendq, local, peer;
      if (!(in >> recvq >> sendq >> local >> peer)) continue;
      connections.push_back({peer.substr(0, peer.rfind(':')), 0});
      continue;
    }
    if (connections.empty()) continue;
    for (std::string field; in >> field;) {
      if (field.rfind("bytes_received:", 0) == 0) {
        connections.back().bytes_received =
            std::stoull(field.substr(std::strlen("bytes_received:")));
      }
    }
  }
  return connections;
}

std::string NetnsCluster::Logs() {
  auto state = [this](Proc& p) {
    return Running(p) ? std::string("running") : "exited with " + std::to_string(p.code);
  };
  std::string s = "\n--- coordinator (" + coordinator_address_ + ", " + state(coordinator_) +
                  ") ---\n" + ReadTail(coordinator_.out_path, 3000);
  for (int k = 1; k <= nodes_; ++k) {
    Proc& d = daemons_[k - 1];
    s += "\n--- node " + std::to_string(k) + " (" + node_address(k) + ", " + state(d) + ") ---\n" +
         ReadTail(d.out_path, 3000);
  }
  return s;
}

std::string NetnsCluster::CoordinatorLog() const {
  return ReadTail(coordinator_.out_path, 1 << 24);
}

}  // namespace dsvm::testing
