//! The waypoint binary (wired up by the waypoint app; see `waypoint::app`).

fn main() {
    eprintln!("waypoint: not built yet");
    std::process::exit(2);
}
