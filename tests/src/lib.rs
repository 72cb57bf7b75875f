//! mesh-tests: integration tests, the loopback harness that runs ztunnels as child
//! processes, and the `mesh-bench` benchmarks. Nothing here is shipped.

pub mod bench;
pub mod controlled;
pub mod harness;
pub mod netns;
