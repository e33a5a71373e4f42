#include "proto/log.h"

#include <atomic>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace dsvm {
namespace {

std::mutex g_mu;  // guards g_identity and serialises lines
std::string g_identity = "dsvm";
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarning: return "WARN";
    case LogLevel::kError: return "ERROR";
  }
  return "?";
}

}  // namespace

void SetLogIdentity(const std::string& process_name) {
  std::lock_guard<std::mutex> l(g_mu);
  g_identity = process_name;
}

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }

void LogLine(LogLevel level, const std::string& message) {
  if (static_cast<int>(level) < g_level.load()) return;
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm t{};
  gmtime_r(&ts.tv_sec, &t);
  std::lock_guard<std::mutex> l(g_mu);
  std::fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s: %s\n", t.tm_year + 1900,
               t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, ts.tv_nsec / 1000000,
               LevelName(level), g_identity.c_str(), message.c_str());
  std::fflush(stderr);
}

}  // namespace dsvm
