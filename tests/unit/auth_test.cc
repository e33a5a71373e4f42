// Unit tests for cluster secrets (proto/auth.h): the file Generate writes
// loads as the secret Generate returned, and Load's file rules.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>

#include "proto/auth.h"

namespace dsvm::proto {
namespace {

class SecretFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "dsvm-auth-test.XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Whether two secrets prove the same (ClusterSecret has no accessor to
  // its bytes). HMAC pads a key shorter than its block with zeros, so two
  // secrets that differ only by trailing zero bytes would pass too; no
  // secret compared here ends in one.
  static bool Same(const ClusterSecret& a, const ClusterSecret& b) {
    const Nonce theirs = RandomNonce(), mine = RandomNonce();
    return b.Check(a.Prove(kCoordinatorRole, theirs, mine), kCoordinatorRole, theirs, mine);
  }

  std::string dir_;
};

// The file is text: 64 hex digits and a newline, and the secret is the
// digits. (The file used to hold 32 raw bytes, and Load drops a trailing
// newline: one file in 256 loaded as another secret than the one Generate
// returned, and bench runs failed now and then with "does not know this
// cluster's secret".) Also over many files, and never readable by others.
TEST_F(SecretFileTest, GenerateWritesHexTextThatLoadsAsTheSecretReturned) {
  for (int i = 0; i < 300; ++i) {
    const std::string path = dir_ + "/secret" + std::to_string(i);
    Result<ClusterSecret> made = ClusterSecret::Generate(path);
    ASSERT_TRUE(made.ok()) << made.status().ToString();

    std::ifstream in(path, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_EQ(text.size(), 65u) << "file " << i;
    EXPECT_EQ(text.back(), '\n');
    EXPECT_EQ(text.find_first_not_of("0123456789abcdef"), 64u) << text;
    const std::span<const uint8_t> digits(reinterpret_cast<const uint8_t*>(text.data()), 64);
    EXPECT_TRUE(Same(*made, ClusterSecret::FromBytes(digits))) << "file " << i;

    Result<ClusterSecret> loaded = ClusterSecret::Load(path);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    ASSERT_TRUE(Same(*made, *loaded)) << "file " << i;
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 077, 0u);  // Load refuses a file others may read
  }
}

TEST_F(SecretFileTest, GenerateNeverOverwritesAndSecretsDiffer) {
  const std::string path = dir_ + "/secret";
  Result<ClusterSecret> first = ClusterSecret::Generate(path);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(ClusterSecret::Generate(path).status().code(), StatusCode::kAlreadyExists);
  Result<ClusterSecret> other = ClusterSecret::Generate(dir_ + "/other");
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(Same(*first, *other));
  Result<ClusterSecret> loaded = ClusterSecret::Load(path);
  ASSERT_TRUE(loaded.ok());
  EXPECT_TRUE(Same(*first, *loaded));  // the refused second Generate left it alone
}

TEST_F(SecretFileTest, LoadDropsOneTrailingNewlineAndRefusesBadFiles) {
  const std::string path = dir_ + "/s";
  auto write = [&](const std::string& text, mode_t mode) {
    std::filesystem::remove(path);
    std::ofstream(path) << text;
    ASSERT_EQ(::chmod(path.c_str(), mode), 0);
  };
  auto bytes = [](const std::string& s) {
    return ClusterSecret::FromBytes(
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  };
  const std::string sixteen = "0123456789abcdef";
  ASSERT_NO_FATAL_FAILURE(write(sixteen + "\n", 0600));
  Result<ClusterSecret> loaded = ClusterSecret::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_TRUE(Same(*loaded, bytes(sixteen)));
  EXPECT_FALSE(Same(*loaded, bytes(sixteen + "\n")));

  ASSERT_NO_FATAL_FAILURE(write(sixteen + "\n\n", 0600));  // only one newline goes
  loaded = ClusterSecret::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_TRUE(Same(*loaded, bytes(sixteen + "\n")));

  ASSERT_NO_FATAL_FAILURE(write(sixteen, 0640));
  EXPECT_EQ(ClusterSecret::Load(path).status().code(), StatusCode::kPermissionDenied);
  ASSERT_NO_FATAL_FAILURE(write(sixteen.substr(1), 0600));
  EXPECT_EQ(ClusterSecret::Load(path).status().code(), StatusCode::kInvalidArgument);
  ASSERT_NO_FATAL_FAILURE(write(std::string(kMaxSecretSize + 1, 'x'), 0600));
  EXPECT_EQ(ClusterSecret::Load(path).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ClusterSecret::Load(dir_ + "/none").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ClusterSecret::Load(dir_).status().code(), StatusCode::kInvalidArgument);

  // A link is not followed, even to a good secret file.
  ASSERT_NO_FATAL_FAILURE(write(sixteen, 0600));
  const std::string link = dir_ + "/link";
  ASSERT_EQ(::symlink(path.c_str(), link.c_str()), 0);
  EXPECT_FALSE(ClusterSecret::Load(link).ok());
}

}  // namespace
}  // namespace dsvm::proto
