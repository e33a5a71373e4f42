// Deterministic simulation of dsvm's coherence protocol.
//
// The real cores (coordinator::PageDirectory, node::NodeAgent) run over a
// simulated network, clock and disk, all driven by one seed: the same seed
// replays the same run exactly. Simulated processes read and write pages;
// the network delays, reorders, duplicates and drops messages; directory
// shards crash (losing memory and messages in flight) and restart from their
// simulated disk; nodes evict pages; node daemons die (the directory is told,
// as after missed heartbeats) and come back empty. After every step the checker asserts:
//   - at most one node holds a page Modified, and then nobody holds it Shared;
//   - every node holding a page (Shared or Modified) has the latest value;
//   - every read returns the value of the latest completed write, except
//     after a node crash: a page the dead node took part in may then be lost
//     (DATA_LOSS) or back at the value it had before the dead node got it,
//     and nothing else;
//   - each directory's own invariants (PageDirectory::CheckInvariants).
// Read faults may also ask a node for its copy (direct reads), right or
// wrong about who holds the page; a dead node's page bytes already on the
// wire may still arrive.
// At the end faults stop, the network heals, and every waiting access must
// complete: a protocol that stops making progress fails the run.
#ifndef DSVM_TESTS_SIM_SIMULATION_H_
#define DSVM_TESTS_SIM_SIMULATION_H_

#include <cstdint>
#include <string>

namespace dsvm::sim {

struct SimConfig {
  uint64_t seed = 1;
  uint32_t nodes = 4;
  uint32_t shards = 2;
  uint32_t pages = 8;           // spread over both shards
  uint64_t steps = 20000;
  double drop_rate = 0.02;      // each message
  double duplicate_rate = 0.02; // each message
  uint64_t max_delay_ms = 20;
  double crash_rate = 0.0005;   // per step: one directory shard crashes and restarts
  double evict_rate = 0.01;     // per step
  double node_crash_rate = 0.0; // per step: a node daemon dies and restarts empty
  double sweep_rate = 0.1;      // per access: one node touches every page in order (PageRuns)
  double direct_rate = 0.0;     // per read fault: also ask a node for its copy (ReadDirect)
  bool verbose = false;
};

struct SimResult {
  bool ok = true;
  std::string failure;  // first violation, with the step it happened at
  uint64_t steps = 0;
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t messages = 0;
  uint64_t dropped = 0;
  uint64_t duplicated = 0;
  uint64_t runs = 0;            // PageRun frames delivered
  uint64_t crashes = 0;
  uint64_t evictions = 0;
  uint64_t node_crashes = 0;
  uint64_t lost_reads = 0;      // accesses answered DATA_LOSS after a node crash
  uint64_t transactions = 0;
  uint64_t direct_asks = 0;     // ReadDirects sent (to a holder or to any node)
  uint64_t direct_served = 0;   // ReadDirects answered with a copy
  uint64_t direct_installs = 0; // grants installed from a direct read's bytes
  uint64_t fetch_sends_skipped = 0;  // Fetches answered by a ReadDirect's copy (one send, not two)
};

// Picks the knobs of a run from its seed (node count, rates), so fresh
// random seeds explore different shapes of cluster and network. `harsh`:
// at least 3 nodes, and every run loses nodes, with more drops and
// evictions (where the windows around a supplier's death are).
SimConfig ConfigForSeed(uint64_t seed, bool harsh = false);

SimResult RunSimulation(const SimConfig& config);

}  // namespace dsvm::sim

#endif  // DSVM_TESTS_SIM_SIMULATION_H_
