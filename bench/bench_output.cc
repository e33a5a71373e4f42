#include "bench/bench_output.h"

#include <cmath>
#include <cstdio>
#include <string>

#include "proto/status.h"

namespace dsvm::bench {
namespace {

bool IsPlain(std::string_view s) {
  for (char c : s) {
    if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') return false;
  }
  return !s.empty();
}

}  // namespace

void EmitMetric(std::string_view name, double value, std::string_view unit) {
  DSVM_CHECK(IsPlain(name) && IsPlain(unit));
  DSVM_CHECK(std::isfinite(value));
  // Rates are large and their fractions are noise; ratios are small.
  char number[64];
  if (std::fabs(value) >= 1000) {
    std::snprintf(number, sizeof(number), "%.0f", value);
  } else {
    std::snprintf(number, sizeof(number), "%.4g", value);
  }
  std::printf("{\"name\":\"%.*s\",\"value\":%s,\"unit\":\"%.*s\"}\n", static_cast<int>(name.size()),
              name.data(), number, static_cast<int>(unit.size()), unit.data());
  std::fflush(stdout);
}

}  // namespace dsvm::bench
