//! The eBPF backend: the capture manager's operations carried out by `mesh_ebpf`'s tc
//! programs, which steer pod traffic to the transparent listeners with `bpf_sk_assign`.
//! It only translates: what to attach where is the manager's business, how the programs
//! steer is the loader's. Links detach when it is dropped (or when the process dies).

use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;

use super::{Backend, CaptureError, Listeners, Role, CAPTURE_MARK};

pub struct Ebpf {
    redirector: mesh_ebpf::Redirector,
}

impl Ebpf {
    /// Checks the kernel first, so a missing feature is named rather than reported as a
    /// failed load.
    pub fn open(listeners: &Listeners<'_>) -> Result<Ebpf, CaptureError> {
        mesh_ebpf::check_kernel().map_err(|e| loader("checking the kernel for eBPF capture", e))?;
        let redirector = mesh_ebpf::Redirector::load(
            mesh_ebpf::Listeners {
                outbound: listeners.outbound.as_fd(),
                inbound_hbone: listeners.inbound_hbone.as_fd(),
                inbound_plaintext: listeners.inbound_plaintext.as_fd(),
            },
            CAPTURE_MARK,
        )
        .map_err(|e| loader("loading the eBPF capture programs", e))?;
        Ok(Ebpf { redirector })
    }
}

fn loader(op: &'static str, e: mesh_ebpf::Error) -> CaptureError {
    CaptureError::Loader {
        op,
        source: Box::new(e),
    }
}

impl Backend for Ebpf {
    fn attach(&mut self, ifindex: u32, role: Role) -> Result<(), CaptureError> {
        let role = match role {
            Role::AmbientPod => mesh_ebpf::Role::AmbientPod,
            Role::Ingress => mesh_ebpf::Role::Ingress,
        };
        (self.redirector.attach(ifindex, role)).map_err(|e| loader("attaching", e))
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), CaptureError> {
        (self.redirector.detach(ifindex)).map_err(|e| loader("detaching", e))
    }

    fn set_local_ambient(&mut self, ip: Ipv4Addr, ambient: bool) -> Result<(), CaptureError> {
        (self.redirector.set_local_ambient(ip, ambient))
            .map_err(|e| loader("marking a local ambient pod", e))
    }
}
