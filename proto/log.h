// Minimal logging for dsvm processes: one line per event on stderr, with a
// UTC timestamp, the level and the process name. Log an error once, where it
// is first classified.
#ifndef DSVM_PROTO_LOG_H_
#define DSVM_PROTO_LOG_H_

#include <string>

namespace dsvm {

enum class LogLevel { kDebug = 1, kInfo = 2, kWarning = 3, kError = 4 };

void SetLogIdentity(const std::string& process_name);
void SetLogLevel(LogLevel level);
void LogLine(LogLevel level, const std::string& message);

inline void LogInfo(const std::string& m) { LogLine(LogLevel::kInfo, m); }
inline void LogWarning(const std::string& m) { LogLine(LogLevel::kWarning, m); }
inline void LogError(const std::string& m) { LogLine(LogLevel::kError, m); }

}  // namespace dsvm

#endif  // DSVM_PROTO_LOG_H_
