//! eBPF capture for ambient pods: a tc-ingress program on the node-side interfaces (node
//! uplink, node-side veths of pods) assigns pod TCP connections to ztunnel's transparent
//! listeners with `bpf_sk_assign`, and this crate's loader ([`Redirector`]) that attaches it
//! per interface and keeps its maps.
//!
//! What the program does, per interface role:
//! - every role: a TCP packet whose 4-tuple belongs to an existing non-listening socket of
//!   the node namespace goes to that socket (replies to ztunnel's transparent sockets, the
//!   rest of captured connections);
//! - [`Role::AmbientPod`]: a new connection (SYN) to any destination goes to the outbound
//!   listener;
//! - [`Role::Ingress`]: a SYN to a local ambient pod goes to the HBONE listener when its
//!   port is 15008, else to the plaintext listener.
//!
//! Steered packets get `skb->mark |= mark`; everything else (UDP, IPv6, other interfaces)
//! passes untouched, nothing is dropped. This crate does not set up the node's policy
//! routing that steered packets need (`ip rule add fwmark M/M lookup T` and
//! `ip route add local 0.0.0.0/0 dev lo table T`): ztunnel owns node routing.

// Only for `if_indextoname`, which aya's name-based attach needs.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, SockMap};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError, EbpfLoader};

/// The compiled program (see `bpf/steer.bpf.c`), built by `build.rs`.
static STEER_OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));
const PROGRAM: &str = "steer";
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
/// tcx (multi-program tc attachment through bpf links, no qdisc) arrived in Linux 6.6.
const TCX_KERNEL: (u8, u8) = (6, 6);

/// ztunnel's capture listeners: IPv4 TCP sockets, `IP_TRANSPARENT`, listening on 0.0.0.0
/// in the node network namespace. A connection steered to one keeps its original
/// destination as the accepted socket's local address.
pub struct Listeners<'a> {
    /// Outbound capture listener (15001): new connections from ambient pods.
    pub outbound: BorrowedFd<'a>,
    /// HBONE listener (15008): connections to local ambient pods on port 15008.
    pub inbound_hbone: BorrowedFd<'a>,
    /// Plaintext inbound listener (15006): connections to local ambient pods on other ports.
    pub inbound_plaintext: BorrowedFd<'a>,
}

/// What the program does with new connections arriving on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Node-side veth of an ambient pod: every new outbound connection of the pod goes to
    /// the outbound listener.
    AmbientPod,
    /// Node uplink, or node-side veth of a pod outside the mesh: new connections to local
    /// ambient pods go to the HBONE or plaintext listener; the rest is untouched.
    Ingress,
}

impl Role {
    /// The value in the program's `roles` map (`ROLE_*` in `bpf/steer.bpf.c`).
    fn value(self) -> u32 {
        match self {
            Role::AmbientPod => 1,
            Role::Ingress => 2,
        }
    }
}

/// Slots of the program's `listeners` sockmap (`SLOT_*` in `bpf/steer.bpf.c`).
#[derive(Clone, Copy)]
enum Slot {
    Outbound = 0,
    Hbone = 1,
    Plaintext = 2,
}

/// Errors of loading, attaching and configuring the capture program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel exposes no BTF, which the program's socket helpers need.
    #[error("kernel BTF missing at {path}: eBPF capture needs a kernel built with CONFIG_DEBUG_INFO_BTF")]
    Btf { path: &'static str },
    /// The running kernel's version could not be read.
    #[error("reading the kernel version: {reason}")]
    KernelVersion { reason: String },
    /// The kernel predates tcx attachment.
    #[error("kernel {found} has no tcx attachment: eBPF capture needs Linux >= 6.6")]
    Tcx { found: String },
    /// The bpf() system call was refused.
    #[error("bpf() refused during {during}: needs root, or CAP_BPF with CAP_NET_ADMIN: {source}")]
    Permission {
        during: String,
        #[source]
        source: io::Error,
    },
    /// The verifier (or the loader) rejected the program.
    #[error("kernel rejected eBPF program {program}: {source}\nverifier log:\n{verifier_log}")]
    Rejected {
        program: &'static str,
        #[source]
        source: io::Error,
        verifier_log: String,
    },
    /// The embedded object could not be loaded (parse, relocation, map creation).
    #[error("loading the eBPF object: {source}")]
    Object {
        #[source]
        source: EbpfError,
    },
    /// A map or program the object should contain is missing or of another type.
    #[error("eBPF object has no usable {name}: {reason}")]
    Missing { name: &'static str, reason: String },
    /// A listener is not an IPv4 TCP socket listening with `IP_TRANSPARENT`.
    #[error("the {which} listener {problem}: it must be an IPv4 TCP socket listening with IP_TRANSPARENT")]
    BadListener {
        which: &'static str,
        problem: &'static str,
    },
    /// A listener could not be put into the sockmap.
    #[error(
        "placing the {which} listener in the sockmap (it must be a listening TCP socket): {source}"
    )]
    Listener {
        which: &'static str,
        #[source]
        source: MapError,
    },
    /// Updating one of the program's maps failed.
    #[error("updating eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    /// No interface has this index in the current network namespace.
    #[error("no network interface with index {ifindex}: {source}")]
    Interface {
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    /// Attaching the program to an interface failed.
    #[error("attaching the capture program to interface {ifindex}: {source}")]
    Attach {
        ifindex: u32,
        #[source]
        source: ProgramError,
    },
    /// Detaching the program from an interface failed.
    #[error("detaching the capture program from interface {ifindex}: {source}")]
    Detach {
        ifindex: u32,
        #[source]
        source: ProgramError,
    },
}

/// The loaded capture program, its maps and the interfaces it is attached to.
///
/// Dropping it detaches every link it made and unloads the program.
pub struct Redirector {
    /// One tcx link per attached interface, with the role stored for it. Dropping a link
    /// detaches it. Declared first so links go before the program and maps.
    links: HashMap<u32, (SchedClassifierLink, Role)>,
    roles: BpfHashMap<MapData, u32, u32>,
    local_ambient: BpfHashMap<MapData, u32, u32>,
    /// Holds the program; its drop unloads it.
    ebpf: Ebpf,
}

impl Redirector {
    /// Loads the program, marking steered packets with `mark` (`skb->mark |= mark`), and
    /// places ztunnel's listeners in its sockmap. Attaches nowhere yet.
    pub fn load(listeners: Listeners<'_>, mark: u32) -> Result<Redirector, Error> {
        check_prerequisites()?;
        let mut ebpf = load_program(mark)?;
        let mut sockets: SockMap<MapData> = take_map(&mut ebpf, "listeners")?;
        for (slot, fd, which) in [
            (Slot::Outbound, listeners.outbound, "outbound"),
            (Slot::Hbone, listeners.inbound_hbone, "inbound HBONE"),
            (
                Slot::Plaintext,
                listeners.inbound_plaintext,
                "inbound plaintext",
            ),
        ] {
            check_listener(fd, which)?;
            sockets
                .set(slot as u32, &fd, 0)
                .map_err(|source| Error::Listener { which, source })?;
        }
        // The kernel keeps the sockmap alive through the program that references it.
        drop(sockets);
        Ok(Redirector {
            links: HashMap::new(),
            roles: take_map(&mut ebpf, "roles")?,
            local_ambient: take_map(&mut ebpf, "local_ambient")?,
            ebpf,
        })
    }

    /// Attaches the program to tc ingress of interface `ifindex` with `role`. On an
    /// interface already attached, replaces its role in place (no gap in capture).
    pub fn attach(&mut self, ifindex: u32, role: Role) -> Result<(), Error> {
        // The role goes in first so the program acts on the very first packet it sees.
        self.roles
            .insert(ifindex, role.value(), 0)
            .map_err(|source| Error::Map {
                map: "roles",
                source,
            })?;
        if let Some((_, current)) = self.links.get_mut(&ifindex) {
            *current = role;
            return Ok(());
        }
        let link = self.link(ifindex).inspect_err(|_| {
            // Best effort: a stale entry only matters if the index is reused, and the
            // next attach overwrites it.
            let _ = self.roles.remove(&ifindex);
        })?;
        self.links.insert(ifindex, (link, role));
        Ok(())
    }

    /// Creates a tcx link for the program on tc ingress of `ifindex`, first in the chain so
    /// capture sees packets before another program redirects them elsewhere.
    fn link(&mut self, ifindex: u32) -> Result<SchedClassifierLink, Error> {
        let name = interface_name(ifindex)?;
        let program = steer_program(&mut self.ebpf)?;
        let attach = |source| Error::Attach { ifindex, source };
        let id = program
            .attach_with_options(
                &name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(attach)?;
        program.take_link(id).map_err(attach)
    }

    /// Detaches the program from interface `ifindex`; an interface not attached is Ok.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), Error> {
        let Some((link, _)) = self.links.remove(&ifindex) else {
            return Ok(());
        };
        drop(link);
        match self.roles.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                map: "roles",
                source,
            }),
        }
    }

    /// Marks `ip` as the address of an ambient pod on this node (`ambient = true`), whose
    /// inbound connections arriving on [`Role::Ingress`] interfaces are captured, or
    /// removes it (`false`; an address not present is Ok).
    pub fn set_local_ambient(&mut self, ip: Ipv4Addr, ambient: bool) -> Result<(), Error> {
        // The program compares with the address as it sits in the packet: network order.
        let key = u32::from_ne_bytes(ip.octets());
        let result = if ambient {
            self.local_ambient.insert(key, 1, 0)
        } else {
            match self.local_ambient.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        };
        result.map_err(|source| Error::Map {
            map: "local_ambient",
            source,
        })
    }

    /// The interfaces the program is attached to, with their roles, by interface index.
    pub fn attached(&self) -> Vec<(u32, Role)> {
        let mut all: Vec<_> = self
            .links
            .iter()
            .map(|(ifindex, (_, role))| (*ifindex, *role))
            .collect();
        all.sort_by_key(|(ifindex, _)| *ifindex);
        all
    }
}

/// Checks that this kernel and process can run the capture: kernel BTF, tcx (Linux >=
/// 6.6), permission to use bpf(), and that the verifier accepts the program. The error
/// names what is missing.
pub fn check_kernel() -> Result<(), Error> {
    check_prerequisites()?;
    load_program(0).map(drop)
}

fn check_prerequisites() -> Result<(), Error> {
    if !std::path::Path::new(BTF_PATH).exists() {
        return Err(Error::Btf { path: BTF_PATH });
    }
    let found = KernelVersion::current().map_err(|e| Error::KernelVersion {
        reason: e.to_string(),
    })?;
    if found < KernelVersion::new(TCX_KERNEL.0, TCX_KERNEL.1, 0) {
        return Err(Error::Tcx {
            found: found.to_string(),
        });
    }
    Ok(())
}

/// Loads the object (creating its maps) and the program into the kernel.
fn load_program(mark: u32) -> Result<Ebpf, Error> {
    let btf = aya::Btf::from_sys_fs().ok();
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .override_global("MARK", &mark, true)
        .load(STEER_OBJ)
        .map_err(classify)?;
    steer_program(&mut ebpf)?
        .load()
        .map_err(|e| classify(EbpfError::ProgramError(e)))?;
    Ok(ebpf)
}

fn steer_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, Error> {
    let missing = |reason: String| Error::Missing {
        name: PROGRAM,
        reason,
    };
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| missing("no such program".into()))?
        .try_into()
        .map_err(|e: ProgramError| missing(e.to_string()))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let missing = |reason: String| Error::Missing { name, reason };
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| missing("no such map".into()))?;
    T::try_from(map).map_err(|e| missing(e.to_string()))
}

/// Refuses a socket the program could steer to but that could not answer: without
/// `IP_TRANSPARENT` it cannot reply from the original destination's address.
fn check_listener(fd: BorrowedFd<'_>, which: &'static str) -> Result<(), Error> {
    use socket2::{Domain, SockRef, Type};
    let socket = SockRef::from(&fd);
    let problem = if socket.domain().ok() != Some(Domain::IPV4) {
        "is not an IPv4 socket"
    } else if socket.r#type().ok() != Some(Type::STREAM) {
        "is not a TCP socket"
    } else if !socket.is_listener().unwrap_or(false) {
        "is not listening"
    } else if !socket.ip_transparent_v4().unwrap_or(false) {
        "lacks IP_TRANSPARENT"
    } else {
        return Ok(());
    };
    Err(Error::BadListener { which, problem })
}

/// Turns aya's load errors into the failure kinds callers act on: permission, verifier
/// rejection, or anything else about the object.
fn classify(error: EbpfError) -> Error {
    let permission = |during: String, source: io::Error| Error::Permission { during, source };
    match error {
        EbpfError::MapError(MapError::CreateError { name, io_error }) if is_eperm(&io_error) => {
            permission(format!("creating map {name}"), io_error)
        }
        EbpfError::ProgramError(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            if is_eperm(&io_error) && verifier_log.to_string().trim().is_empty() {
                permission(format!("loading program {PROGRAM}"), io_error)
            } else {
                Error::Rejected {
                    program: PROGRAM,
                    source: io_error,
                    verifier_log: verifier_log.to_string(),
                }
            }
        }
        EbpfError::ProgramError(ProgramError::SyscallError(e)) if is_eperm(&e.io_error) => {
            permission(e.call.to_string(), e.io_error)
        }
        source => Error::Object { source },
    }
}

fn is_eperm(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPERM)
}

/// The name of interface `ifindex` in this network namespace; aya attaches by name.
fn interface_name(ifindex: u32) -> Result<String, Error> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` is IF_NAMESIZE bytes, the size if_indextoname writes at most
    // (name plus NUL); the pointer is valid for the call and not kept.
    let ret = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ret.is_null() {
        return Err(Error::Interface {
            ifindex,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: if_indextoname succeeded, so `buf` holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

// ztunnel keeps the redirector in its async wiring: it must move between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Redirector>();
};
