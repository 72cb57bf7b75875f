//! Benchmarks behind the `mesh-bench` binary, and the loopback harness they share with the
//! integration tests and the demo.
//!
//! Proxies under test run as child processes, as they are deployed; everything here
//! measures and reports but never judges speed: a benchmark fails only when something does
//! not work (a proxy does not start, a connection fails, bytes come back wrong). Each
//! subcommand lives in its own module (`l4`); the pieces they share are small modules here.

pub mod controlplane;
pub mod cpu_latency;
pub mod l4;
pub mod l7;
pub mod loopback;
pub mod netns;
pub use mesh_netlab::process;
pub mod relay;
pub mod report;
pub mod rss;
pub mod servers;
pub mod socks5;
pub mod stats;

pub use loopback::{default_ztunnel_path, LoopbackMesh, MeshSpec};
