//! Compiles the eBPF programs in `bpf/` with clang into `OUT_DIR`, where `src/lib.rs`
//! embeds them. Needs clang and libbpf's headers (`apt-get install clang libbpf-dev`).

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["steer"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // asm/types.h and friends live under the multiarch include directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    for name in PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new("clang")
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(&multiarch)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("running clang for {src} (apt-get install clang libbpf-dev): {e}")
            });
        assert!(status.success(), "clang failed to compile {src}");
    }
}
