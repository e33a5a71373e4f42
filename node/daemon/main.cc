// dsvm-node: the node daemon, one per host.
//
//   dsvm-node --coordinator HOST:PORT[,HOST:PORT...] [--listen HOST:PORT] [--socket PATH]
//             [--fault-backend kmod|uffd] [--rejoin-as N] [--secret-file FILE]
//             [--busy-poll-us N] [--fault-poll-us N] [--zero-copy auto|on|off]
//             [--direct-reads on|off] [--device-backend none|emulated|cuda] [--gpu-budget BYTES]
//             [--emulated-gpus N] [--host-budget BYTES] [--gpu-copy-threads N]
//             [--gpu-arena BYTES] [--gpu-direct-copies on|off]
//             [--gpu-pinned-limit BYTES] [--verbose]
//
// --coordinator: one coordinator per directory shard, in shard order (shard
// 0 first: it assigns the node id and holds membership and regions); the
// node joins every one and sends each page's requests to its shard.
// --fault-backend: how client faults are caught: kmod (dsvm.ko's /dev/dsvm;
// 4 KiB regions only) or uffd (userfaultfd); default kmod when /dev/dsvm
// exists, else uffd.
// --busy-poll-us N: after any work, poll for N microseconds before sleeping
// (default 0: sleep at once). Lower fault latency for a core's idle time.
// --fault-poll-us N: while a local process waits on a fault the network
// must serve, poll (yielding the core) for up to N microseconds before
// sleeping (0: never; default 100 on hosts with at least 4 online CPUs,
// else 0). The faulting thread's core is idle then, and the answer usually
// comes within that time.
// --zero-copy: pages that move alone between nodes (2 MiB pages) leave from
// the region's memory without a copy, and arrive in it without one: auto
// (default) sends so from every region and receives so into hugetlb-backed
// ones; on does both for every region; off neither.
// --direct-reads: a read fault on a page of at most 64 KiB also asks the
// node that last sent this one a page of the region for its copy, which
// then comes without waiting for the directory's word (on, default; off:
// the directory alone; proto/PROTOCOL.md, "Direct reads").
// --secret-file (default $DSVM_SECRET_FILE): the cluster secret this node
// proves to the coordinator and to its peers, and demands of them
// (proto/auth.h). Without one the node joins only an --insecure cluster.
// --device-backend: the GPU tier (docs/GPU.md): none (default), emulated
// (host memory plays --emulated-gpus GPUs, default 1) or cuda.
// --gpu-budget BYTES (K, M, G suffixes; required with a backend): HBM each
// GPU gives region pages, all page sizes together. --host-budget BYTES: host DRAM the
// node's pages may take; past it the coldest leave the node (needs a backend).
// --gpu-copy-threads N (1 to 64): threads that stage the GPU tier's copies
// (default a quarter of the CPUs, 1 to 4; docs/GPU.md). --gpu-arena BYTES:
// the GPU memory a region's pool takes at a time (default 64M; a multiple
// of 4K): GPU memory is never shared between regions, so smaller arenas
// share a budget between more regions, larger ones allocate less often.
// --gpu-direct-copies (default on): pages whose 2 MiB block is in host
// memory are pinned there once and copied to and from the GPU without a
// staging copy (docs/GPU.md, "Direct copies"); off: always staged.
// --gpu-pinned-limit BYTES: the most host memory pinned for them at once
// (at least 2M; default half the host's memory); past it, the blocks least
// recently used are unpinned first.
// --listen is the UCX listener peers reach (port 0 picks one); --socket the
// UNIX socket libdsvm connects to (default $DSVM_SOCKET, then
// /run/dsvm/node.sock). Exits 1 with a clear message when it cannot start;
// SIGINT/SIGTERM stop it cleanly.
// The daemon keeps buffers under 4 MiB, and 64 MiB of freed memory, in
// its heap while pages move (node/daemon/heap_tuning.h), unless
// the environment sets glibc's thresholds (GLIBC_TUNABLES, MALLOC_*_THRESHOLD_).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "node/daemon/node_daemon.h"
#include "proto/log.h"

namespace {

int Usage(const std::string& why) {
  std::fprintf(stderr,
               "dsvm-node: %s\n"
               "usage: dsvm-node --coordinator HOST:PORT[,HOST:PORT...] [--listen HOST:PORT] [--socket PATH]\n"
               "       [--fault-backend kmod|uffd] [--rejoin-as N] [--secret-file FILE]\n"
               "       [--busy-poll-us N] [--fault-poll-us N] [--zero-copy auto|on|off]\n"
               "       [--direct-reads on|off]\n"
               "       [--device-backend none|emulated|cuda] [--gpu-budget BYTES]\n"
               "       [--emulated-gpus N] [--host-budget BYTES] [--gpu-copy-threads N]\n"
               "       [--gpu-arena BYTES] [--gpu-direct-copies on|off]\n"
               "       [--gpu-pinned-limit BYTES] [--verbose]\n"
               "       (BYTES: a number with an optional K, M or G suffix, powers of 1024)\n",
               why.c_str());
  return 2;
}

// "4096", "64K", "512M", "2G": bytes, powers of 1024. False for anything
// else, 0, or a value past 2^50.
bool ParseBytes(const std::string& v, uint64_t* out) {
  if (v.empty() || v.size() > 16) return false;
  size_t digits = v.find_first_not_of("0123456789");
  if (digits == 0) return false;
  uint64_t shift = 0;
  if (digits != std::string::npos) {
    if (digits + 1 != v.size()) return false;
    switch (v.back()) {
      case 'K': case 'k': shift = 10; break;
      case 'M': case 'm': shift = 20; break;
      case 'G': case 'g': shift = 30; break;
      default: return false;
    }
  } else {
    digits = v.size();
  }
  if (digits > 15) return false;
  const uint64_t n = std::stoull(v.substr(0, digits));
  if (n == 0 || n > (uint64_t{1} << (50 - shift))) return false;
  *out = n << shift;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dsvm;
  SetLogIdentity("dsvm-node");
  node::NodeDaemonOptions o;
  const char* env_socket = std::getenv("DSVM_SOCKET");
  o.socket_path = env_socket ? env_socket : "/run/dsvm/node.sock";
  std::string secret_flag;
  bool fault_backend_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    bool ok = true;
    std::string v;
    if (a == "--coordinator") ok = value(&o.coordinator);
    else if (a == "--listen") ok = value(&o.listen);
    else if (a == "--socket") ok = value(&o.socket_path);
    else if (a == "--fault-backend") ok = fault_backend_given = value(&o.fault_backend);
    else if (a == "--secret-file") ok = value(&secret_flag);
    else if (a == "--device-backend") ok = value(&o.device_backend);
    else if (a == "--gpu-budget") ok = value(&v) && ParseBytes(v, &o.gpu_budget_bytes);
    else if (a == "--host-budget") ok = value(&v) && ParseBytes(v, &o.host_budget_bytes);
    else if (a == "--gpu-arena") ok = value(&v) && ParseBytes(v, &o.gpu_arena_bytes);
    else if (a == "--gpu-pinned-limit") {
      ok = value(&v) && ParseBytes(v, &o.gpu_pinned_limit_bytes);
    }
    else if (a == "--emulated-gpus") {
      ok = value(&v) && !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
           v.size() <= 3;
      if (ok) o.emulated_gpus = static_cast<uint32_t>(std::stoul(v));
    }
    else if (a == "--gpu-copy-threads") {
      ok = value(&v) && !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
           v.size() <= 2;
      if (ok) o.gpu_copy_threads = static_cast<uint32_t>(std::stoul(v));
      ok = ok && o.gpu_copy_threads >= 1 && o.gpu_copy_threads <= 64;
    }
    else if (a == "--busy-poll-us") {
      ok = value(&v) && !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
           v.size() <= 7;
      if (ok) o.busy_poll_us = std::stoull(v);
    }
    else if (a == "--fault-poll-us") {
      ok = value(&v) && !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
           v.size() <= 7;
      if (ok) o.fault_poll_us = std::stoull(v);
    }
    else if (a == "--zero-copy") {
      ok = value(&v) && (v == "auto" || v == "on" || v == "off");
      if (ok) {
        o.zero_copy = v == "on"    ? dsvm::node::NodeDaemonOptions::ZeroCopy::kOn
                      : v == "off" ? dsvm::node::NodeDaemonOptions::ZeroCopy::kOff
                                   : dsvm::node::NodeDaemonOptions::ZeroCopy::kAuto;
      }
    }
    else if (a == "--gpu-direct-copies") {
      ok = value(&v) && (v == "on" || v == "off");
      if (ok) o.gpu_direct_copies = v == "on";
    }
    else if (a == "--direct-reads") {
      ok = value(&v) && (v == "on" || v == "off");
      if (ok) o.direct_reads = v == "on";
    }
    else if (a == "--rejoin-as") {
      ok = value(&v) && !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
           v.size() <= 9;
      if (ok) o.rejoin_as = static_cast<proto::NodeId>(std::stoul(v));
    } else if (a == "--verbose") SetLogLevel(LogLevel::kDebug);
    else return Usage("unknown flag '" + a + "'");
    if (!ok) return Usage("flag '" + a + "' needs a valid value");
  }
  if (!fault_backend_given) o.fault_backend = ::access("/dev/dsvm", F_OK) == 0 ? "kmod" : "uffd";
  if (o.fault_backend != "uffd" && o.fault_backend != "kmod") {
    return Usage("--fault-backend must be kmod or uffd");
  }
  if (o.device_backend != "none" && o.device_backend != "emulated" && o.device_backend != "cuda") {
    return Usage("--device-backend must be none, emulated or cuda");
  }
  if (o.device_backend != "none" && o.gpu_budget_bytes == 0) {
    return Usage("--device-backend " + o.device_backend + " needs --gpu-budget BYTES");
  }
  if (o.device_backend == "none" && (o.gpu_budget_bytes != 0 || o.host_budget_bytes != 0)) {
    return Usage("--gpu-budget and --host-budget need --device-backend emulated or cuda");
  }
  if (o.emulated_gpus == 0 || o.emulated_gpus > 64) return Usage("--emulated-gpus must be 1 to 64");
  o.secret_file = proto::SecretPath(secret_flag);
  const std::string dir = o.socket_path.substr(0, o.socket_path.rfind('/'));
  if (!dir.empty()) ::mkdir(dir.c_str(), 0755);

  // Signals are taken by a thread of their own, which asks the loop to stop.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  // Before UCX starts: its buffers come from the heap too.
  LogInfo(node::TuneHeap());
  auto daemon = node::NodeDaemon::Create(o);
  if (!daemon.ok()) {
    LogError("refusing to start: " + daemon.status().ToString());
    return 1;
  }
  node::NodeDaemon* d = daemon->get();
  std::thread signals([d, set] {
    int sig = 0;
    sigwait(&set, &sig);
    LogInfo("signal " + std::to_string(sig) + ": stopping");
    d->Stop();
  });
  signals.detach();
  LogInfo("node " + std::to_string(d->id()) + " serving clients on " + o.socket_path);
  d->Run();
  return d->fatal().ok() ? 0 : 1;
}
