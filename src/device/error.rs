// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-visible errors of the request path and the one place that maps them
//! to virtio-iommu status codes.

use thiserror::Error;

use crate::iommufd_bridge::BridgeError;
use crate::nested::NestedError;

/// Status codes of the ratified spec (virtio-iommu 1.4 "Device operations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

impl Status {
    pub const COUNT: usize = 9;

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
            Status::DevErr => "deverr",
            Status::Inval => "inval",
            Status::Range => "range",
            Status::NoEnt => "noent",
            Status::Fault => "fault",
            Status::NoMem => "nomem",
        }
    }

    pub fn from_index(i: usize) -> Option<Status> {
        const ALL: [Status; Status::COUNT] = [
            Status::Ok,
            Status::IoErr,
            Status::Unsupp,
            Status::DevErr,
            Status::Inval,
            Status::Range,
            Status::NoEnt,
            Status::Fault,
            Status::NoMem,
        ];
        ALL.get(i).copied()
    }
}

/// Why a request was refused. Every variant is a guest error (or a host
/// refusal): it becomes a status in the tail, never a dropped connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("readable part is {got} bytes, type needs {need}")]
    Truncated { got: u64, need: usize },
    #[error("reserved field is not zero")]
    ReservedNotZero,
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("endpoint {0} does not exist")]
    NoEndpoint(u32),
    #[error("domain {0} does not exist")]
    NoDomain(u32),
    #[error("domain {0} is outside the domain range")]
    DomainOutOfRange(u32),
    #[error("domain {0} is of another kind")]
    DomainKindMismatch(u32),
    #[error("endpoint {endpoint} is not attached to domain {domain}")]
    NotAttached { endpoint: u32, domain: u32 },
    #[error("MAP/UNMAP on bypass domain {0}")]
    BypassDomain(u32),
    #[error("virt_end {end:#x} is below virt_start {start:#x}")]
    EmptyRange { start: u64, end: u64 },
    #[error("address {0:#x} is not aligned to the granule")]
    Misaligned(u64),
    #[error("range {start:#x}-{end:#x} is outside the input range")]
    OutsideInputRange { start: u64, end: u64 },
    #[error("phys range overflows 64 bits")]
    PhysOverflow,
    #[error("range {start:#x}-{end:#x} overlaps a reserved region")]
    Reserved { start: u64, end: u64 },
    #[error("range {start:#x}-{end:#x} overlaps mapping at {existing:#x}")]
    Overlap { start: u64, end: u64, existing: u64 },
    #[error("UNMAP would split the mapping {start:#x}-{end:#x}")]
    WouldSplit { start: u64, end: u64 },
    #[error("too many domains (limit {0})")]
    TooManyDomains(usize),
    #[error("too many mappings in domain (limit {0})")]
    TooManyMappings(usize),
    #[error("too many mappings in all domains (limit {0})")]
    TooManyTotalMappings(usize),
    #[error("properties area is {got} bytes, probe_size is {need}")]
    ProbeBufferTooSmall { got: u64, need: u32 },
    #[error("descriptor: {0}")]
    Nested(#[from] NestedError),
    #[error("endpoint {endpoint} does not take table format {format:#x}")]
    FormatUnsupported { endpoint: u32, format: u8 },
    #[error("domain {0} has another table")]
    TableMismatch(u32),
    #[error("domain {0} is not a table domain")]
    NotTableDomain(u32),
    #[error("endpoint {0} has no PASID support")]
    NoPasid(u32),
    #[error("pasid {pasid:#x} is wider than endpoint {endpoint}'s {bits} bits")]
    PasidOutOfRange { endpoint: u32, pasid: u32, bits: u8 },
    #[error("PAGE_REQUESTS without F_PAGE_REQUEST")]
    PageRequestsNotNegotiated,
    #[error("endpoint {0} cannot raise page requests")]
    NoPageRequests(u32),
    #[error("too many PASID attachments (limit {0})")]
    TooManyPasids(usize),
    #[error("page response: {0}")]
    PageResp(#[from] crate::fault_queue::pages::PageRespError),
    #[error("host: {0}")]
    Host(#[from] BridgeError),
}

impl RequestError {
    /// The single mapping from errors to virtio-iommu status codes.
    pub fn status(&self) -> Status {
        use RequestError::*;
        match self {
            Truncated { .. } | ReservedNotZero | UnknownFlags(_) | DomainKindMismatch(_) => {
                Status::Inval
            }
            NotAttached { .. } | BypassDomain(_) | EmptyRange { .. } => Status::Inval,
            Reserved { .. } | Overlap { .. } | ProbeBufferTooSmall { .. } => Status::Inval,
            NoEndpoint(_) | NoDomain(_) => Status::NoEnt,
            DomainOutOfRange(_) | Misaligned(_) | OutsideInputRange { .. } => Status::Range,
            PhysOverflow | WouldSplit { .. } => Status::Range,
            TooManyDomains(_) | TooManyMappings(_) | TooManyPasids(_) => Status::NoMem,
            TooManyTotalMappings(_) => Status::NoMem,
            TableMismatch(_) | NotTableDomain(_) | PageRequestsNotNegotiated => Status::Inval,
            FormatUnsupported { .. } | NoPasid(_) | NoPageRequests(_) => Status::Unsupp,
            PasidOutOfRange { .. } => Status::Range,
            Nested(e) => match e {
                NestedError::BadRange { .. } | NestedError::PasidTooWide(_) => Status::Range,
                _ => Status::Inval,
            },
            PageResp(_) => Status::Inval,
            Host(e) => host_status(e),
        }
    }
}

/// A host refusal as the guest sees it. The kernel's errno is the best
/// description of whose fault it was.
fn host_status(e: &BridgeError) -> Status {
    match e {
        BridgeError::NotGuestRam { .. } => Status::Fault,
        BridgeError::Unsupported(_) | BridgeError::NotCdev => Status::Unsupp,
        BridgeError::Host { .. } => Status::DevErr,
        BridgeError::Kernel { errno, .. } => match *errno {
            libc::ENOMEM | libc::ENOSPC => Status::NoMem,
            // Address in a reserved or unusable range, overlap, alignment.
            libc::EINVAL | libc::EEXIST | libc::EADDRINUSE => Status::Inval,
            libc::ERANGE | libc::EOVERFLOW => Status::Range,
            libc::EOPNOTSUPP | libc::ENOTTY | libc::ENODEV => Status::Unsupp,
            libc::EFAULT => Status::Fault,
            // ENOENT, EBUSY, EPERM, EIO...: our own objects misbehaved.
            _ => Status::DevErr,
        },
    }
}

/// A descriptor chain we cannot use at all: it is returned with used
/// length 0 and nothing written.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("buffer {0:#x}+{1:#x} is outside guest memory")]
    OutsideMemory(u64, u64),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("writable part holds {0} of the {1} reply bytes")]
    ShortWritable(usize, usize),
}
