// examples/embedding_gather against real processes (issue #5): a
// dsvm-coordinator, one dsvm-node with the `emulated` device backend and a
// small GPU budget, and the example program as its client, run with a table
// three times the budget. The example checks every bag sum against a CPU
// computation and exits non-zero on a difference; these tests check its
// exit status and what it printed, that the check can fail, and that the
// daemon's budget really is smaller than the table (a map larger than the
// budget is refused), so the table must stream through it.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "bench/node_process.h"
#include "tests/integration/coordinator_process.h"

namespace dsvm::testing {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kBudget = 4 * kMiB;  // the emulated GPU's HBM budget
constexpr uint32_t kDim = 64;           // floats per row: 256 bytes
constexpr uint64_t kRows = 49152;       // 12 MiB
constexpr uint64_t kTableBytes = kRows * kDim * sizeof(float);
static_assert(kTableBytes >= 2 * kBudget, "the working set is at least twice the budget");
static_assert(kTableBytes == 3 * kBudget);

struct ProcessResult {
  int exit_code = -1;  // -signal when killed
  std::string out;     // stdout and stderr
};

// Runs `args` with its output in `log`, waiting at most 90 s (then kills it).
ProcessResult RunProcess(const std::vector<std::string>& args, const std::string& log) {
  ProcessResult r;
  std::vector<char*> argv;
  std::vector<std::string> copy = args;
  for (std::string& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return r;
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fd);
  if (pid < 0) return r;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  int status = 0;
  for (;;) {
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  r.out = text.str();
  return r;
}

class EmbeddingGatherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ::setenv("UCX_TLS", "tcp", 1);
    ::setenv("UCX_NET_DEVICES", "lo", 1);
    ASSERT_TRUE(coord_.Start(dir_.path() + "/data").ok()) << coord_.stderr_text();
    auto node = bench::NodeProcess::Start(
        DSVM_NODE_BIN, coord_.address(), TestSecretPath(), socket(), dir_.path() + "/node.log",
        {"--device-backend", "emulated", "--gpu-budget", std::to_string(kBudget)});
    ASSERT_TRUE(node.ok()) << node.status().ToString();
    node_ = std::move(*node);
  }
  void TearDown() override {
    if (node_) {
      const Status st = node_->Stop();
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
  }

  std::string socket() const { return dir_.path() + "/node.sock"; }

  // The example on the table of kRows x kDim with 2 MiB chunks, 64 KiB
  // pages, then `extra`.
  ProcessResult RunExample(const std::vector<std::string>& extra) {
    std::vector<std::string> args = {EMBEDDING_GATHER_BIN,
                                     "--socket", socket(),
                                     "--rows", std::to_string(kRows),
                                     "--dim", std::to_string(kDim),
                                     "--chunk", "2M",
                                     "--page-size", "65536",
                                     "--batches", "4",
                                     "--bags", "512",
                                     "--bag-size", "16",
                                     "--kernel", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    ProcessResult r = RunProcess(args, dir_.path() + "/example.log");
    std::printf("--- embedding_gather exited %d ---\n%s--- end ---\n", r.exit_code, r.out.c_str());
    return r;
  }

  // A run over the whole table: six chunks, each batch mapping every one,
  // every sum right.
  static void ExpectStreamedCorrectly(const ProcessResult& r) {
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_NE(r.out.find("6 chunks of 2.00 MiB"), std::string::npos);
    EXPECT_NE(r.out.find("every bag sum equals the CPU reference"), std::string::npos);
    EXPECT_NE(r.out.find("24 maps, 48.0 MiB mapped (4.0x the table)"), std::string::npos);
    EXPECT_EQ(r.out.find("MISMATCH"), std::string::npos);
  }

  TempDir dir_;
  CoordinatorProcess coord_;
  std::unique_ptr<bench::NodeProcess> node_;
};

// Every bag of every batch equals the CPU's sum; each batch maps every
// chunk (512 bags x 16 random rows touch all six), so the 12 MiB table
// streams through the 4 MiB budget four times.
TEST_F(EmbeddingGatherTest, ATableThreeTimesTheBudgetGathersCorrectly) {
  ExpectStreamedCorrectly(RunExample({}));
}

// Pipelined (the next chunk placed by a second thread while one is
// gathered): the same sums, and the maps find their chunks placed.
TEST_F(EmbeddingGatherTest, APipelinedGatherGathersCorrectly) {
  ExpectStreamedCorrectly(RunExample({"--pipeline", "--region", "piped"}));
}

// The check can fail: one sum changed after the gather is reported, with
// exit status 1.
TEST_F(EmbeddingGatherTest, AWrongSumIsReported) {
  const ProcessResult r = RunExample({"--inject-wrong-result", "--region", "wrong"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("MISMATCH in batch 3: 1 of 32768 sums differ"), std::string::npos);
}

// The daemon holds no more than its budget on the GPU: a chunk of the whole
// table (three budgets) cannot be mapped, so the runs above did stream.
TEST_F(EmbeddingGatherTest, AChunkLargerThanTheBudgetIsRefused) {
  const ProcessResult r = RunExample({"--chunk", "12M", "--batches", "1", "--region", "big"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("dsvm_gpu_map: resource exhausted"), std::string::npos);
}

}  // namespace
}  // namespace dsvm::testing
