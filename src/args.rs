// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line (clap derive), kept apart from everything else.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::control::ControlLimits;
use crate::device::config::{DeviceConfig, Limits, DEFAULT_PAGE_RESPONSE_TIMEOUT_MS};
use crate::iommufd_bridge::vfio::VfioSource;
use crate::viot::{ViotError, ViotTable};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("bad number {0:?}")]
    BadNumber(String),
    #[error("bad range {0:?}: expected START-END (inclusive, decimal or 0x-hex)")]
    BadRange(String),
    #[error("range {0:?} ends before it starts")]
    EmptyRange(String),
    #[error(
        "bad endpoint {0:?}: expected ID, ID,vfio=PATH, ID,vfio-fd=FD, ID,vfio-bound-fd=FD or ID,selftest"
    )]
    BadEndpoint(String),
    #[error("endpoint {0:#x} is given twice")]
    DuplicateEndpoint(u32),
    #[error("{given} endpoints given; --max-endpoints is {max}")]
    TooManyEndpoints { given: u64, max: usize },
    #[error("endpoint {0:#x}: selftest endpoints need a build with the `selftest` feature")]
    SelftestNotBuilt(u32),
    #[error("selftest and VFIO endpoints cannot be mixed in one device")]
    MixedHostEndpoints,
    #[error(
        "--test-fault-socket serves virtual endpoints only: no host endpoints, no --vfio-hotplug"
    )]
    TestFaultSocketWithHost,
    #[error("feature bit {0}: must be a device feature bit 7..=23, or off")]
    FeatureBit(String),
    #[error("--attach-table-bit and --page-request-bit are both {0}")]
    SameFeatureBit(u8),
    #[error("--page-size-mask must have at least one bit set")]
    EmptyPageSizeMask,
    #[error("--{0} must be at least 1")]
    ZeroBound(&'static str),
    #[error("--max-page-requests {0}: at most 65536 (a group's id is 16 bits)")]
    TooManyPageRequests(usize),
    #[error("one of --socket-path or --socket-fd is required")]
    NoSocket,
    #[error("--control-group {0:?}: no such group")]
    UnknownGroup(String),
    #[error("--control-timeout-ms must be 1 to {MAX_CONTROL_TIMEOUT_MS}")]
    ControlTimeout,
    #[error("endpoint {0:#x}: vfio-bound-fd needs --iommufd-fd (the iommufd the VMM binds it to)")]
    BoundNeedsIommufdFd(u32),
    #[error("{0} is a standard stream (0-2), not a descriptor handed over")]
    StdioFd(NamedFd),
    #[error("{0} is not an open file descriptor")]
    FdNotOpen(NamedFd),
    #[error("fd {fd} is named twice: {first} and {second}")]
    DuplicateFd {
        fd: i32,
        first: NamedFd,
        second: NamedFd,
    },
}

/// Longest `--control-timeout-ms`: a day (a longer one is a mistake).
pub(crate) const MAX_CONTROL_TIMEOUT_MS: u64 = 86_400_000;

/// Which option hands over an inherited file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdOption {
    SocketFd,
    IommufdFd,
    /// `--endpoint ID,vfio-fd=N`, of this endpoint.
    VfioFd(u32),
    /// `--endpoint ID,vfio-bound-fd=N`, of this endpoint.
    VfioBoundFd(u32),
}

/// An inherited file descriptor and the option naming it, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedFd {
    pub fd: i32,
    pub by: FdOption,
}

impl std::fmt::Display for NamedFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.by {
            FdOption::SocketFd => write!(f, "--socket-fd {}", self.fd),
            FdOption::IommufdFd => write!(f, "--iommufd-fd {}", self.fd),
            FdOption::VfioFd(id) => write!(f, "endpoint {id:#x}: vfio-fd={}", self.fd),
            FdOption::VfioBoundFd(id) => write!(f, "endpoint {id:#x}: vfio-bound-fd={}", self.fd),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// vhost-user backend serving a virtio-iommu device.
#[derive(Debug, Parser)]
#[command(version, about)]
// A subcommand replaces the serving options rather than combining with them.
#[command(args_conflicts_with_subcommands = true, disable_help_subcommand = true)]
#[command(group(ArgGroup::new("socket").args(["socket_path", "socket_fd"]).multiple(false)))]
pub struct Args {
    /// Unix socket to listen on for the frontend (the VMM).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// An already listening unix socket, inherited as this file descriptor.
    #[arg(long, value_name = "FD")]
    pub socket_fd: Option<i32>,

    /// Print the vhost-user capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// An endpoint the guest may attach: ID (a virtual endpoint served by the
    /// software IOMMU), FIRST-LAST (virtual endpoints FIRST to LAST
    /// inclusive), ID,vfio=CDEV_PATH, ID,vfio-fd=FD or ID,vfio-bound-fd=FD
    /// (a cdev the VMM binds to --iommufd-fd: QEMU's vfio-pci,fd=; waited
    /// for up to --bind-wait-ms, never bound by us). Repeatable.
    /// ID is decimal or 0x-hex (e.g. a PCI requester ID).
    #[arg(long = "endpoint", value_name = "SPEC")]
    pub endpoints: Vec<String>,

    /// Most endpoints, all --endpoint options together (beyond: the backend
    /// does not start) and those added over the control socket (beyond:
    /// `add_endpoint` is refused). The default covers one PCI segment's
    /// requester IDs.
    #[arg(long, default_value_t = 1 << 16)]
    pub max_endpoints: usize,

    /// Open the iommufd at start even without a VFIO endpoint, so that the
    /// control socket's `add_endpoint` can take VFIO devices (cdev fds sent
    /// with SCM_RIGHTS). Guest RAM is then mapped and pinned for every guest.
    #[arg(long)]
    pub vfio_hotplug: bool,

    /// The iommufd for VFIO endpoints.
    #[arg(long, value_name = "PATH", default_value = "/dev/iommu")]
    pub iommufd: PathBuf,

    /// An already open iommufd, inherited as this file descriptor.
    #[arg(long, value_name = "FD")]
    pub iommufd_fd: Option<i32>,

    /// How long to wait at start-up for the VMM to bind each
    /// ID,vfio-bound-fd cdev (QEMU binds it when it realizes vfio-pci).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub bind_wait_ms: u64,

    /// Control socket (JSON lines) for virtual endpoints' DMA and statistics.
    /// Created mode 0600: only this user and root may use it.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Also let the members of this group (name or number) use the control
    /// socket: it is created mode 0660 in that group.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Config page_size_mask: the lowest bit is the mapping granule.
    #[arg(long, value_name = "MASK", default_value = "0xfffffffffffff000", value_parser = parse_u64)]
    pub page_size_mask: u64,

    /// Config input range START-END (inclusive).
    #[arg(long, value_name = "START-END", default_value = "0-0xffffffffffff")]
    pub input_range: String,

    /// Config domain range START-END (inclusive).
    #[arg(long, value_name = "START-END", default_value = "0-0xffffffff")]
    pub domain_range: String,

    /// Bypass of unattached endpoints at boot (the config byte's initial value).
    #[arg(long, value_enum, default_value = "on")]
    pub bypass: OnOff,

    /// Most domains one guest may create (beyond: NOMEM).
    #[arg(long, default_value_t = 1 << 16)]
    pub max_domains: usize,

    /// Most mappings in one domain (beyond: NOMEM).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_mappings: usize,

    /// Most mappings of one guest, all domains together (beyond: NOMEM).
    /// Bounds what they cost us (tens of bytes each) and the kernel.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_total_mappings: usize,

    /// Most PASID attachments (ATTACH_TABLE at a PASID) of one guest, all
    /// endpoints together (beyond: NOMEM).
    #[arg(long, default_value_t = 4096)]
    pub max_pasids: usize,

    /// Feature bit number offered for the F_ATTACH_TABLE extension (7..=23),
    /// or `off` not to offer it.
    #[arg(long, value_name = "BIT|off", default_value = "7")]
    pub attach_table_bit: String,

    /// Feature bit number offered for the F_PAGE_REQUEST extension (7..=23,
    /// offered only with F_ATTACH_TABLE), or `off`.
    #[arg(long, value_name = "BIT|off", default_value = "10")]
    pub page_request_bit: String,

    /// The seccomp filter installed after start-up: `kill` (a system call
    /// outside the serving threads' list kills the process), `trap` (the
    /// same, naming the call on stderr), `log` (allowed, logged by the
    /// kernel), `off` (for debugging).
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: crate::sandbox::SeccompMode,

    /// How the fault FDs (page requests, their responses) are served:
    /// `epoll` (read() and write() from the eventq worker's epoll set),
    /// `io-uring` (reads posted in advance and responses written through
    /// one io_uring; fails to start without io_uring), `auto` (io_uring
    /// unless the kernel refuses it: `kernel.io_uring_disabled`, a seccomp
    /// policy). The mode in force is printed at start-up and in `stats`.
    #[arg(long, value_enum, value_name = "MODE", default_value = "epoll")]
    pub fault_io: crate::fault_queue::uring::FaultIo,

    /// Busy-poll the requestq for up to this many microseconds after serving
    /// it, so that a driver sending its next request at once is served
    /// without a kick or a wakeup. Adaptive, as QEMU's poll-max-ns: the
    /// window opens while requests come within this bound and shrinks to
    /// nothing while they come later, so a sporadic driver costs no CPU
    /// (0: off).
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub poll_us: u64,

    /// Poll even while the host has more runnable threads than CPUs. By
    /// default a polling window reads the run queues (/proc/loadavg) and
    /// polls only while every runnable thread has a CPU; with this flag
    /// polling backs off only after it was descheduled (for measurements
    /// of the rules without the check).
    #[arg(long)]
    pub poll_ignore_load: bool,

    /// Most page-request groups outstanding (delivered to the driver or
    /// waiting for an eventq buffer; at most 65536, a group's id being 16
    /// bits); beyond: completed with FAILURE.
    #[arg(long, default_value_t = 512)]
    pub max_page_requests: usize,

    /// A page-request group the driver has not answered after this many
    /// milliseconds is completed by the device (INVALID to its source) and
    /// counted as timed out; a later PAGE_RESP is INVAL (0: never).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_PAGE_RESPONSE_TIMEOUT_MS)]
    pub page_response_timeout_ms: u64,

    /// Most event records queued while the driver posts no buffer (beyond:
    /// counted as lost and logged).
    #[arg(long, default_value_t = 1024)]
    pub max_events: usize,

    /// Most control-socket clients served at once (one more gets an error
    /// line and is closed).
    #[arg(long, default_value_t = 16)]
    pub max_control_clients: usize,

    /// Longest control-socket request line in bytes (longer: bad-request).
    #[arg(long, default_value_t = 4096)]
    pub max_control_line: usize,

    /// Time a control-socket client has to send each request line, and to
    /// take each reply (beyond: it is closed and its slot freed). Waiting
    /// for a page request's answer does not count.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub control_timeout_ms: u64,

    /// Test only (the cost benches; hidden): connect to the unix stream
    /// socket at PATH and serve it as the kernel's fault FD would be served
    /// (page requests of virtual endpoints read from it in whole groups,
    /// their responses written to it). Virtual endpoints only.
    #[arg(long, value_name = "PATH", hide = true)]
    pub test_fault_socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the ACPI VIOT table that tells the guest which PCI devices this
    /// IOMMU manages, for QEMU's `-acpitable file=PATH`, and exit.
    Viot(ViotArgs),
}

/// Options of `viot`. Checked in `ViotArgs::table`, not by clap, so that a
/// mistake is one line naming it, like the serving options.
#[derive(Debug, clap::Args)]
pub struct ViotArgs {
    /// PCI address of this device in the guest, [SEGMENT:]BUS:DEVICE.FUNCTION
    /// in hex (QEMU's `addr=03.0` on the root bus is 00:03.0).
    #[arg(long, value_name = "ADDR")]
    pub iommu: Option<String>,

    /// Endpoints behind it: FIRST[-LAST][,ENDPOINT_START], PCI addresses as
    /// for --iommu. LAST defaults to FIRST; ENDPOINT_START (decimal or 0x-hex)
    /// defaults to FIRST's requester ID (bus << 8 | device << 3 | function).
    /// Repeatable; ranges must not overlap.
    #[arg(long = "range", value_name = "RANGE")]
    pub ranges: Vec<String>,

    /// Where to write the table; `-` or absent: stdout.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

impl ViotArgs {
    pub(crate) fn table(&self) -> Result<ViotTable, ViotError> {
        let iommu = self.iommu.as_deref().ok_or(ViotError::NoIommu)?.parse()?;
        if self.ranges.is_empty() {
            return Err(ViotError::NoRange);
        }
        let ranges = self
            .ranges
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, _>>()?;
        Ok(ViotTable { iommu, ranges })
    }

    /// None: stdout.
    pub(crate) fn output_path(&self) -> Option<&Path> {
        self.output.as_deref().filter(|p| *p != Path::new("-"))
    }

    /// What `vhost-device-iommu viot` does. The table is built and checked
    /// before the output is opened, so bad input leaves no file behind.
    pub fn run(&self, stdout: &mut dyn Write, stdout_is_terminal: bool) -> Result<(), ViotError> {
        let bytes = self.table()?.to_bytes()?;
        match self.output_path() {
            Some(path) => std::fs::write(path, &bytes)
                .map_err(|e| ViotError::Write(path.display().to_string(), e.to_string())),
            None if stdout_is_terminal => Err(ViotError::Terminal),
            None => stdout
                .write_all(&bytes)
                .and_then(|()| stdout.flush())
                .map_err(|e| ViotError::Write("stdout".into(), e.to_string())),
        }
    }
}

/// Where the frontend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    Path(PathBuf),
    Fd(i32),
}

/// What serves an endpoint's DMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointKind {
    /// The software IOMMU model.
    Virtual,
    /// A VFIO device through its cdev.
    Vfio(VfioSource),
    /// A mock device of the kernel's iommufd selftest (tests).
    Selftest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub id: u32,
    pub kind: EndpointKind,
}

/// The iommufd host endpoints use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommufdSpec {
    Path(PathBuf),
    Fd(i32),
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: SocketSpec,
    pub endpoints: Vec<EndpointSpec>,
    pub iommufd: IommufdSpec,
    /// Open the iommufd even with no VFIO endpoint (`--vfio-hotplug`).
    pub vfio_hotplug: bool,
    pub control_socket: Option<PathBuf>,
    /// Members of this group may use the control socket too.
    pub control_group: Option<libc::gid_t>,
    pub config: DeviceConfig,
    pub limits: Limits,
    pub control_limits: ControlLimits,
    /// Busy-poll of the requestq after serving it (0: off).
    pub poll: std::time::Duration,
    /// Poll only while the host has a CPU for every runnable thread.
    pub poll_gate: bool,
    pub seccomp: crate::sandbox::SeccompMode,
    /// How long to wait for the VMM to bind a `vfio-bound-fd` cdev.
    pub bind_wait: std::time::Duration,
    /// `--fault-io`.
    pub fault_io: crate::fault_queue::uring::FaultIo,
    /// `--test-fault-socket` (test only).
    pub test_fault_socket: Option<PathBuf>,
    /// The inherited fds, in the order named (--socket-fd, --iommufd-fd,
    /// then the endpoints'): each one once, none of them 0-2 except
    /// --socket-fd (inetd passes the socket as stdin).
    pub inherited_fds: Vec<NamedFd>,
}

pub fn parse_u64(s: &str) -> Result<u64, ArgsError> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| ArgsError::BadNumber(s.into()))
}

fn parse_u32(s: &str) -> Result<u32, ArgsError> {
    u32::try_from(parse_u64(s)?).map_err(|_| ArgsError::BadNumber(s.into()))
}

fn parse_range(s: &str) -> Result<(u64, u64), ArgsError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| ArgsError::BadRange(s.into()))?;
    let (a, b) = (
        parse_u64(a).map_err(|_| ArgsError::BadRange(s.into()))?,
        parse_u64(b).map_err(|_| ArgsError::BadRange(s.into()))?,
    );
    if b < a {
        return Err(ArgsError::EmptyRange(s.into()));
    }
    Ok((a, b))
}

/// `ID`, `ID,vfio=PATH`, `ID,vfio-fd=FD` or `ID,selftest`.
pub(crate) fn parse_endpoint(s: &str) -> Result<EndpointSpec, ArgsError> {
    let bad = || ArgsError::BadEndpoint(s.into());
    let (id, rest) = match s.split_once(',') {
        Some((id, rest)) => (id, Some(rest)),
        None => (s, None),
    };
    let id = parse_u32(id).map_err(|_| bad())?;
    let kind = match rest {
        None => EndpointKind::Virtual,
        Some("selftest") if cfg!(feature = "selftest") => EndpointKind::Selftest,
        Some("selftest") => return Err(ArgsError::SelftestNotBuilt(id)),
        Some(r) => match r.split_once('=') {
            Some(("vfio", p)) if !p.is_empty() => EndpointKind::Vfio(VfioSource::Path(p.into())),
            Some(("vfio-fd", fd)) => {
                let fd = i32::try_from(parse_u64(fd).map_err(|_| bad())?).map_err(|_| bad())?;
                EndpointKind::Vfio(VfioSource::Fd(fd))
            }
            Some(("vfio-bound-fd", fd)) => {
                let fd = i32::try_from(parse_u64(fd).map_err(|_| bad())?).map_err(|_| bad())?;
                EndpointKind::Vfio(VfioSource::BoundFd(fd))
            }
            _ => return Err(bad()),
        },
    };
    Ok(EndpointSpec { id, kind })
}

impl Options {
    pub(crate) fn endpoint_ids(&self) -> Vec<u32> {
        self.endpoints.iter().map(|e| e.id).collect()
    }

    /// Check that every inherited fd is open. Call it before the process
    /// opens anything: a number closed at start could otherwise be taken by
    /// one of our own files and then be adopted a second time.
    /// (--socket-fd is checked to be a listening socket when it is taken.)
    pub(crate) fn check_inherited_fds_open(&self) -> Result<(), ArgsError> {
        for n in &self.inherited_fds {
            // SAFETY: F_GETFD only reads the descriptor flags.
            if n.by != FdOption::SocketFd && unsafe { libc::fcntl(n.fd, libc::F_GETFD) } < 0 {
                return Err(ArgsError::FdNotOpen(*n));
            }
        }
        Ok(())
    }
}

/// The inherited fds `opts` names, refusing 0-2 (but for --socket-fd) and
/// any fd named twice: the daemon takes each one over to own and close.
fn inherited_fds(
    socket: &SocketSpec,
    iommufd: &IommufdSpec,
    endpoints: &[EndpointSpec],
) -> Result<Vec<NamedFd>, ArgsError> {
    let mut fds = Vec::new();
    if let SocketSpec::Fd(fd) = *socket {
        fds.push(NamedFd {
            fd,
            by: FdOption::SocketFd,
        });
    }
    if let IommufdSpec::Fd(fd) = *iommufd {
        fds.push(NamedFd {
            fd,
            by: FdOption::IommufdFd,
        });
    }
    for e in endpoints {
        match e.kind {
            EndpointKind::Vfio(VfioSource::Fd(fd)) => fds.push(NamedFd {
                fd,
                by: FdOption::VfioFd(e.id),
            }),
            EndpointKind::Vfio(VfioSource::BoundFd(fd)) => fds.push(NamedFd {
                fd,
                by: FdOption::VfioBoundFd(e.id),
            }),
            _ => {}
        }
    }
    for (i, n) in fds.iter().enumerate() {
        if n.by != FdOption::SocketFd && (0..=2).contains(&n.fd) {
            return Err(ArgsError::StdioFd(*n));
        }
        if let Some(first) = fds[..i].iter().find(|f| f.fd == n.fd) {
            return Err(ArgsError::DuplicateFd {
                fd: n.fd,
                first: *first,
                second: *n,
            });
        }
    }
    Ok(fds)
}

/// `--control-group`: a number, or a name looked up in the group database.
fn parse_group(s: &str) -> Result<libc::gid_t, ArgsError> {
    if let Ok(gid) = s.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let unknown = || ArgsError::UnknownGroup(s.into());
    let name = std::ffi::CString::new(s).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: group is plain data; getgrnam_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, of the sizes given; the
    // strings it points into live in `buf`, which we do not read.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(unknown());
    }
    Ok(grp.gr_gid)
}

/// One `--endpoint`: an endpoint, or a range of virtual ones.
fn parse_endpoint_arg(s: &str) -> Result<(u32, u32, Option<EndpointSpec>), ArgsError> {
    if !s.contains(',') && s.contains('-') {
        let (a, b) = parse_range(s)?;
        let a = u32::try_from(a).map_err(|_| ArgsError::BadRange(s.into()))?;
        let b = u32::try_from(b).map_err(|_| ArgsError::BadRange(s.into()))?;
        return Ok((a, b, None));
    }
    let spec = parse_endpoint(s)?;
    Ok((spec.id, spec.id, Some(spec)))
}

impl Args {
    /// Every endpoint, ranges expanded, after checking the count against
    /// --max-endpoints (before expanding anything).
    fn endpoint_specs(&self) -> Result<Vec<EndpointSpec>, ArgsError> {
        let parsed = self
            .endpoints
            .iter()
            .map(|e| parse_endpoint_arg(e))
            .collect::<Result<Vec<_>, _>>()?;
        let given: u64 = parsed.iter().map(|(a, b, _)| u64::from(b - a) + 1).sum();
        if given > self.max_endpoints as u64 {
            return Err(ArgsError::TooManyEndpoints {
                given,
                max: self.max_endpoints,
            });
        }
        let mut seen = std::collections::HashSet::new();
        // `given` is at most --max-endpoints, a usize, so it converts.
        let mut endpoints =
            Vec::with_capacity(usize::try_from(given).unwrap_or(self.max_endpoints));
        for (a, b, spec) in parsed {
            for id in a..=b {
                if !seen.insert(id) {
                    return Err(ArgsError::DuplicateEndpoint(id));
                }
                endpoints.push(spec.clone().unwrap_or(EndpointSpec {
                    id,
                    kind: EndpointKind::Virtual,
                }));
            }
        }
        Ok(endpoints)
    }

    pub fn options(&self) -> Result<Options, ArgsError> {
        let socket = match (&self.socket_path, self.socket_fd) {
            (Some(p), None) => SocketSpec::Path(p.clone()),
            (None, Some(fd)) => SocketSpec::Fd(fd),
            _ => return Err(ArgsError::NoSocket),
        };
        let endpoints = self.endpoint_specs()?;
        let has = |f: fn(&EndpointKind) -> bool| endpoints.iter().any(|e| f(&e.kind));
        if has(|k| matches!(k, EndpointKind::Vfio(_))) && has(|k| *k == EndpointKind::Selftest) {
            return Err(ArgsError::MixedHostEndpoints);
        }
        let iommufd = match self.iommufd_fd {
            Some(fd) => IommufdSpec::Fd(fd),
            None => IommufdSpec::Path(self.iommufd.clone()),
        };
        // A bound cdev's device id and objects live in the VMM's iommufd.
        if let (IommufdSpec::Path(_), Some(e)) = (
            &iommufd,
            endpoints
                .iter()
                .find(|e| matches!(e.kind, EndpointKind::Vfio(VfioSource::BoundFd(_)))),
        ) {
            return Err(ArgsError::BoundNeedsIommufdFd(e.id));
        }
        let inherited_fds = inherited_fds(&socket, &iommufd, &endpoints)?;
        if self.test_fault_socket.is_some()
            && (self.vfio_hotplug || has(|k| *k != EndpointKind::Virtual))
        {
            return Err(ArgsError::TestFaultSocketWithHost);
        }
        if !(1..=MAX_CONTROL_TIMEOUT_MS).contains(&self.control_timeout_ms) {
            return Err(ArgsError::ControlTimeout);
        }
        let control_group = self.control_group.as_deref().map(parse_group).transpose()?;
        if self.page_size_mask == 0 {
            return Err(ArgsError::EmptyPageSizeMask);
        }
        let (input_start, input_end) = parse_range(&self.input_range)?;
        let (ds, de) = parse_range(&self.domain_range)?;
        let domain_start =
            u32::try_from(ds).map_err(|_| ArgsError::BadRange(self.domain_range.clone()))?;
        let domain_end =
            u32::try_from(de).map_err(|_| ArgsError::BadRange(self.domain_range.clone()))?;
        for (name, v) in [
            ("max-domains", self.max_domains),
            ("max-endpoints", self.max_endpoints),
            ("max-mappings", self.max_mappings),
            ("max-total-mappings", self.max_total_mappings),
            ("max-events", self.max_events),
            ("max-pasids", self.max_pasids),
            ("max-page-requests", self.max_page_requests),
            ("max-control-clients", self.max_control_clients),
            ("max-control-line", self.max_control_line),
        ] {
            if v == 0 {
                return Err(ArgsError::ZeroBound(name));
            }
        }
        // One 16-bit id per outstanding group (fault_queue::pages): a larger
        // bound could not be met, and is refused rather than cut silently.
        if self.max_page_requests > 1 << 16 {
            return Err(ArgsError::TooManyPageRequests(self.max_page_requests));
        }
        let (at, pr) = (
            parse_feature_bit(&self.attach_table_bit)?,
            parse_feature_bit(&self.page_request_bit)?,
        );
        if let (Some(a), Some(p)) = (at, pr) {
            if a == p {
                return Err(ArgsError::SameFeatureBit(a));
            }
        }
        Ok(Options {
            socket,
            endpoints,
            iommufd,
            vfio_hotplug: self.vfio_hotplug,
            control_socket: self.control_socket.clone(),
            control_group,
            config: DeviceConfig {
                page_size_mask: self.page_size_mask,
                input_start,
                input_end,
                domain_start,
                domain_end,
                boot_bypass: self.bypass == OnOff::On,
                attach_table_bit: parse_feature_bit(&self.attach_table_bit)?,
                page_request_bit: parse_feature_bit(&self.page_request_bit)?,
            },
            limits: Limits {
                max_endpoints: self.max_endpoints,
                max_domains: self.max_domains,
                max_mappings: self.max_mappings,
                max_total_mappings: self.max_total_mappings,
                max_events: self.max_events,
                max_pasids: self.max_pasids,
                max_page_requests: self.max_page_requests,
                page_response_timeout: (self.page_response_timeout_ms > 0)
                    .then(|| std::time::Duration::from_millis(self.page_response_timeout_ms)),
            },
            control_limits: ControlLimits {
                max_clients: self.max_control_clients,
                max_line: self.max_control_line,
                timeout: std::time::Duration::from_millis(self.control_timeout_ms),
            },
            // At most a second: a poll that long is a mistake, not a mode.
            poll: std::time::Duration::from_micros(self.poll_us.min(1_000_000)),
            poll_gate: !self.poll_ignore_load,
            seccomp: self.seccomp,
            bind_wait: std::time::Duration::from_millis(self.bind_wait_ms),
            fault_io: self.fault_io,
            test_fault_socket: self.test_fault_socket.clone(),
            inherited_fds,
        })
    }
}

/// An extension feature bit: one the ratified spec leaves to devices
/// (bits 7..=23 are device-specific; 0..=6 are taken), or `off`.
fn parse_feature_bit(s: &str) -> Result<Option<u8>, ArgsError> {
    if s == "off" {
        return Ok(None);
    }
    match s.parse::<u8>() {
        Ok(b) if (7..=23).contains(&b) => Ok(Some(b)),
        _ => Err(ArgsError::FeatureBit(s.to_string())),
    }
}

/// The JSON object `--print-capabilities` prints (QEMU's vhost-user.rst,
/// "Backend program conventions"). virtio-iommu has no type of its own in
/// that list yet; "iommu" is ours.
pub fn capabilities() -> &'static str {
    "{\n  \"type\": \"iommu\"\n}"
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(extra: &[&str]) -> Result<Options, ArgsError> {
        let mut v = vec!["vhost-device-iommu"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap().options()
    }

    #[test]
    fn endpoint_ranges_and_their_bound() {
        let s = ["--socket-fd", "3"];
        let with = |e: &[&str]| args(&[&s[..], e].concat());
        let o = with(&["--endpoint", "0x8-0xa", "--endpoint", "0x20"]).unwrap();
        assert_eq!(o.endpoint_ids(), vec![8, 9, 10, 0x20]);
        assert!(o.endpoints.iter().all(|e| e.kind == EndpointKind::Virtual));
        assert_eq!(
            with(&["--endpoint", "5-5"]).unwrap().endpoint_ids(),
            vec![5]
        );
        // Counted before anything is expanded: the whole ID space is refused
        // at once, not allocated.
        assert_eq!(
            with(&["--endpoint", "0-0xffffffff"]).unwrap_err(),
            ArgsError::TooManyEndpoints {
                given: 1 << 32,
                max: 1 << 16
            }
        );
        let at_bound = ["--endpoint", "0x100-0x1ff", "--max-endpoints", "256"];
        assert_eq!(with(&at_bound).unwrap().endpoints.len(), 256);
        assert_eq!(
            with(&[&at_bound[..], &["--endpoint", "7"]].concat()).unwrap_err(),
            ArgsError::TooManyEndpoints {
                given: 257,
                max: 256
            }
        );
        assert_eq!(
            with(&["--endpoint", "1-4", "--endpoint", "3"]).unwrap_err(),
            ArgsError::DuplicateEndpoint(3)
        );
        assert_eq!(
            with(&["--endpoint", "4-1"]).unwrap_err(),
            ArgsError::EmptyRange("4-1".into())
        );
        assert!(matches!(
            with(&["--endpoint", "1-0x100000000"]).unwrap_err(),
            ArgsError::BadRange(_)
        ));
        // Host endpoints are one ID each.
        assert!(matches!(
            with(&["--endpoint", "1-2,vfio=/dev/x"]).unwrap_err(),
            ArgsError::BadEndpoint(_)
        ));
        assert_eq!(
            with(&["--max-endpoints", "0"]).unwrap_err(),
            ArgsError::ZeroBound("max-endpoints")
        );
        // Group ids are 16 bits, one per outstanding group.
        assert!(with(&["--max-page-requests", "65536"]).is_ok());
        assert_eq!(
            with(&["--max-page-requests", "65537"]).unwrap_err(),
            ArgsError::TooManyPageRequests(65537)
        );
    }

    #[test]
    fn defaults() {
        let o = args(&[
            "--socket-path",
            "/tmp/s",
            "--endpoint",
            "8",
            "--endpoint",
            "0x10",
        ])
        .unwrap();
        assert_eq!(o.socket, SocketSpec::Path("/tmp/s".into()));
        assert_eq!(o.endpoint_ids(), vec![8, 16]);
        assert!(o.endpoints.iter().all(|e| e.kind == EndpointKind::Virtual));
        assert_eq!(o.iommufd, IommufdSpec::Path("/dev/iommu".into()));
        assert_eq!(o.config, DeviceConfig::default());
        assert_eq!(o.limits, Limits::default());
        assert_eq!(o.control_limits, ControlLimits::default());
    }

    #[test]
    fn ranges_and_bounds() {
        let o = args(&[
            "--socket-fd",
            "3",
            "--input-range",
            "0x1000-0xffffffff",
            "--domain-range",
            "1-100",
            "--bypass",
            "off",
            "--max-domains",
            "4",
            "--max-total-mappings",
            "100",
        ])
        .unwrap();
        assert_eq!(o.socket, SocketSpec::Fd(3));
        assert_eq!(
            (o.config.input_start, o.config.input_end),
            (0x1000, 0xffff_ffff)
        );
        assert_eq!((o.config.domain_start, o.config.domain_end), (1, 100));
        assert!(!o.config.boot_bypass);
        assert_eq!(o.limits.max_domains, 4);
        assert_eq!(o.limits.max_total_mappings, 100);
    }

    #[test]
    fn endpoint_kinds() {
        let o = args(&[
            "--socket-fd",
            "3",
            "--endpoint",
            "1,vfio=/dev/vfio/devices/vfio0",
            "--endpoint",
            "0x2,vfio-fd=7",
            "--endpoint",
            "3",
            "--iommufd-fd",
            "9",
        ])
        .unwrap();
        let kinds: Vec<_> = o.endpoints.iter().map(|e| (e.id, e.kind.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (
                    1,
                    EndpointKind::Vfio(VfioSource::Path("/dev/vfio/devices/vfio0".into()))
                ),
                (2, EndpointKind::Vfio(VfioSource::Fd(7))),
                (3, EndpointKind::Virtual),
            ]
        );
        assert_eq!(o.iommufd, IommufdSpec::Fd(9));
        let selftest = args(&["--socket-fd", "3", "--endpoint", "4,selftest"]);
        if cfg!(feature = "selftest") {
            assert_eq!(selftest.unwrap().endpoints[0].kind, EndpointKind::Selftest);
            assert_eq!(
                args(&[
                    "--socket-fd",
                    "3",
                    "--endpoint",
                    "4,selftest",
                    "--endpoint",
                    "5,vfio=/x"
                ])
                .unwrap_err(),
                ArgsError::MixedHostEndpoints
            );
        } else {
            assert_eq!(selftest.unwrap_err(), ArgsError::SelftestNotBuilt(4));
        }
    }

    #[test]
    fn errors_name_their_cause() {
        assert_eq!(args(&[]).unwrap_err(), ArgsError::NoSocket);
        assert_eq!(
            args(&["--socket-fd", "3", "--endpoint", "1", "--endpoint", "0x1"]).unwrap_err(),
            ArgsError::DuplicateEndpoint(1)
        );
        for bad in ["1,vfio=", "1,vfio-fd=x", "1,gpu", "1,", "1,selftest,x"] {
            assert!(
                matches!(
                    args(&["--socket-fd", "3", "--endpoint", bad]).unwrap_err(),
                    ArgsError::BadEndpoint(_)
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            args(&["--socket-fd", "3", "--endpoint", "x"]).unwrap_err(),
            ArgsError::BadEndpoint(_)
        ));
        assert!(matches!(
            args(&["--socket-fd", "3", "--domain-range", "5-1"]).unwrap_err(),
            ArgsError::EmptyRange(_)
        ));
        assert!(matches!(
            args(&["--socket-fd", "3", "--domain-range", "0-0x100000000"]).unwrap_err(),
            ArgsError::BadRange(_)
        ));
        assert_eq!(
            args(&["--socket-fd", "3", "--page-size-mask", "0"]).unwrap_err(),
            ArgsError::EmptyPageSizeMask
        );
        assert_eq!(
            args(&["--socket-fd", "3", "--max-events", "0"]).unwrap_err(),
            ArgsError::ZeroBound("max-events")
        );
        assert!(Args::try_parse_from(["x", "--socket-fd", "3", "--socket-path", "/a"]).is_err());
    }

    #[test]
    fn inherited_fds_are_named_once_and_not_stdio() {
        let vfio = |id, fd| NamedFd {
            fd,
            by: FdOption::VfioFd(id),
        };
        let iommufd = |fd| NamedFd {
            fd,
            by: FdOption::IommufdFd,
        };
        let o = args(&[
            "--socket-fd",
            "0",
            "--iommufd-fd",
            "9",
            "--endpoint",
            "1,vfio-fd=7",
        ])
        .unwrap();
        // inetd passes the listening socket as stdin.
        let socket = NamedFd {
            fd: 0,
            by: FdOption::SocketFd,
        };
        assert_eq!(o.inherited_fds, vec![socket, iommufd(9), vfio(1, 7)]);
        let s = ["--socket-fd", "3"];
        let with = |e: &[&str]| args(&[&s[..], e].concat());
        for fd in ["0", "1", "2"] {
            assert_eq!(
                with(&["--endpoint", &format!("4,vfio-fd={fd}")]).unwrap_err(),
                ArgsError::StdioFd(vfio(4, fd.parse().unwrap()))
            );
            assert_eq!(
                with(&["--iommufd-fd", fd]).unwrap_err(),
                ArgsError::StdioFd(iommufd(fd.parse().unwrap()))
            );
        }
        assert_eq!(
            with(&["--iommufd-fd", "5", "--endpoint", "1,vfio-fd=5"]).unwrap_err(),
            ArgsError::DuplicateFd {
                fd: 5,
                first: iommufd(5),
                second: vfio(1, 5)
            }
        );
        let twice = with(&["--endpoint", "1,vfio-fd=5", "--endpoint", "2,vfio-fd=5"]);
        assert_eq!(
            twice.unwrap_err().to_string(),
            "fd 5 is named twice: endpoint 0x1: vfio-fd=5 and endpoint 0x2: vfio-fd=5"
        );
        assert!(matches!(
            with(&["--endpoint", "1,vfio-fd=3"]).unwrap_err(),
            ArgsError::DuplicateFd { fd: 3, .. }
        ));
    }

    #[test]
    fn control_access_options() {
        let s = ["--socket-fd", "3"];
        let with = |e: &[&str]| args(&[&s[..], e].concat());
        let o = with(&["--control-group", "123", "--control-timeout-ms", "250"]).unwrap();
        assert_eq!(o.control_group, Some(123));
        assert_eq!(
            o.control_limits.timeout,
            std::time::Duration::from_millis(250)
        );
        assert_eq!(with(&[]).unwrap().control_group, None);
        assert_eq!(
            with(&["--control-group", "root"]).unwrap().control_group,
            Some(0)
        );
        assert_eq!(
            with(&["--control-group", "no such group"]).unwrap_err(),
            ArgsError::UnknownGroup("no such group".into())
        );
        for bad in ["0", "86400001"] {
            assert_eq!(
                with(&["--control-timeout-ms", bad]).unwrap_err(),
                ArgsError::ControlTimeout
            );
        }
    }

    fn viot(extra: &[&str]) -> ViotArgs {
        let mut v = vec!["vhost-device-iommu", "viot"];
        v.extend_from_slice(extra);
        match Args::try_parse_from(v).unwrap().command {
            Some(Command::Viot(a)) => a,
            None => panic!("no subcommand"),
        }
    }

    /// What main does for `viot`, with stdout captured.
    fn viot_stdout(extra: &[&str]) -> Result<Vec<u8>, ViotError> {
        let mut out = Vec::new();
        viot(extra).run(&mut out, false).map(|()| out)
    }

    #[test]
    fn viot_subcommand_leaves_serving_options_alone() {
        let a = Args::try_parse_from(["x", "--socket-path", "S", "--endpoint", "8"]).unwrap();
        assert!(a.command.is_none());
        assert_eq!(a.options().unwrap().endpoint_ids(), vec![8]);
        // The two do not mix, in either order.
        assert!(Args::try_parse_from(["x", "--socket-path", "S", "viot"]).is_err());
        assert!(Args::try_parse_from(["x", "viot", "--socket-path", "S"]).is_err());
    }

    #[test]
    fn viot_subcommand_writes_the_table() {
        let a = ["--iommu", "00:03.0", "--range", "00:04.0-00:05.0"];
        let t = viot_stdout(&a).unwrap();
        assert_eq!((t.len(), &t[0..4]), (88, &b"VIOT"[..]));
        let mut dash = a.to_vec();
        dash.extend(["--output", "-"]);
        assert_eq!(viot_stdout(&dash).unwrap(), t);
        assert_eq!(
            viot(&dash).run(&mut Vec::new(), true),
            Err(ViotError::Terminal)
        );

        let path = std::env::temp_dir().join(format!("viot-test-{}.bin", std::process::id()));
        let p = path.to_str().unwrap();
        let mut file = a.to_vec();
        file.extend(["--range", "0001:00:00.0-00:1f.7,0x10000", "--output", p]);
        let mut out = Vec::new();
        viot(&file).run(&mut out, true).unwrap();
        let written = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(out.is_empty());
        assert_eq!(written.len(), 112);
        let want = ViotTable {
            iommu: "00:03.0".parse().unwrap(),
            ranges: vec![
                "00:04.0-00:05.0".parse().unwrap(),
                "0001:00:00.0-0001:00:1f.7,0x10000".parse().unwrap(),
            ],
        };
        assert_eq!(written, want.to_bytes().unwrap());
    }

    #[test]
    fn viot_subcommand_errors_name_their_cause() {
        assert_eq!(viot_stdout(&[]), Err(ViotError::NoIommu));
        assert_eq!(
            viot_stdout(&["--iommu", "00:03.0"]),
            Err(ViotError::NoRange)
        );
        assert_eq!(
            viot_stdout(&["--iommu", "3.0", "--range", "00:04.0"]),
            Err(ViotError::BadAddress("3.0".into()))
        );
        assert_eq!(
            viot_stdout(&["--iommu", "00:03.0", "--range", "00:04.0-x"]),
            Err(ViotError::BadRange("00:04.0-x".into()))
        );
        assert!(matches!(
            viot_stdout(&["--iommu", "00:03.0", "--range", "00:05.0-00:04.0"]),
            Err(ViotError::Backwards(_))
        ));
        // Nothing is written when the input is bad.
        let path = std::env::temp_dir().join(format!("viot-bad-{}.bin", std::process::id()));
        let bad = [
            "--iommu", "00:03.0", "--range", "00:04.0", "--range", "00:04.0",
        ];
        let mut args = bad.to_vec();
        args.extend(["--output", path.to_str().unwrap()]);
        assert!(matches!(
            viot(&args).run(&mut Vec::new(), false),
            Err(ViotError::Overlap(..))
        ));
        assert!(!path.exists());
        let dir = ["--iommu", "00:03.0", "--range", "00:04.0", "--output", "/"];
        assert!(
            matches!(viot(&dir).run(&mut Vec::new(), false), Err(ViotError::Write(p, _)) if p == "/")
        );
        for e in [
            ViotError::NoIommu,
            ViotError::Terminal,
            ViotError::BadAddress("x".into()),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }

    /// `--test-fault-socket` (test only) serves virtual endpoints alone:
    /// never beside a host endpoint's real fault queue.
    #[test]
    fn the_test_fault_socket_is_for_virtual_endpoints_only() {
        let t = ["--test-fault-socket", "/tmp/f.sock"];
        let ok = args(&["--socket-fd", "3", "--endpoint", "4", t[0], t[1]]).unwrap();
        assert_eq!(ok.test_fault_socket, Some(PathBuf::from("/tmp/f.sock")));
        for host in [
            &["--endpoint", "4,vfio=/x"][..],
            &["--endpoint", "4", "--vfio-hotplug"][..],
        ] {
            let mut a = vec!["--socket-fd", "3", t[0], t[1]];
            a.extend_from_slice(host);
            assert_eq!(
                args(&a).unwrap_err(),
                ArgsError::TestFaultSocketWithHost,
                "{a:?}"
            );
        }
        let help = Args::command().render_long_help().to_string();
        assert!(!help.contains("test-fault-socket"), "hidden from --help");
    }
}
