// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The connection's fault queue (page requests and their responses).

use iommufd_bindings::iommufd::iommu_hwpt_page_response;
use log::Level;

use super::{HostDevice, IommufdHost, KernelQueue};
use crate::iommufd_bridge::abi::{bytes_of, page_response};
use crate::iommufd_bridge::ids::FaultId;
use crate::iommufd_bridge::sys::FaultQueue;
use crate::iommufd_bridge::{BridgeError, PageResponse, Result};
use crate::log_limit::limited;

/// What `write_page_responses` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::iommufd_bridge) struct ResponseWrites {
    /// write() calls made.
    pub writes: u64,
    /// Responses the kernel took.
    pub taken: u64,
}

/// Write struct iommu_hwpt_page_response {cookie, code} records, up to 64
/// in one write(); `each(i, result)` for every one not taken, in order:
/// Ok(false) refused as unknown (the kernel had completed the group:
/// EINVAL), or the error. The kernel takes responses in order and stops at
/// the first it refuses, returning the bytes it took, or (none taken) that
/// response's errno: so write, skip the refused one, go on. (Also the
/// software host's test fault socket's.)
pub(in crate::iommufd_bridge) fn write_page_responses(
    w: &mut impl std::io::Write,
    responses: &[PageResponse],
    each: &mut dyn FnMut(usize, Result<bool>),
) -> ResponseWrites {
    let mut writes = 0;
    let mut taken = 0;
    const RESP: usize = std::mem::size_of::<iommu_hwpt_page_response>();
    const BATCH: usize = 64;
    for (base, chunk) in responses.chunks(BATCH).enumerate() {
        let base = base * BATCH;
        let mut buf = [iommu_hwpt_page_response::default(); BATCH];
        for (b, &r) in buf.iter_mut().zip(chunk) {
            *b = page_response(r);
        }
        let mut i = 0;
        while i < chunk.len() {
            writes += 1;
            match w.write(bytes_of(&buf[i..chunk.len()])) {
                Ok(n) if n >= RESP && n % RESP == 0 => {
                    // Never more than asked (the kernel's write returns
                    // the bytes it took of ours).
                    let k = (n / RESP).min(chunk.len() - i);
                    taken += k as u64;
                    i += k;
                }
                Ok(n) => {
                    let detail = format!("{n} bytes of a response");
                    each(
                        base + i,
                        Err(BridgeError::Host {
                            op: "fault queue write",
                            detail,
                        }),
                    );
                    i += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    each(base + i, Ok(false));
                    i += 1;
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    each(
                        base + i,
                        Err(BridgeError::Kernel {
                            op: "fault queue write",
                            errno,
                        }),
                    );
                    i += 1;
                }
            }
        }
    }
    ResponseWrites { writes, taken }
}

impl<D: HostDevice> IommufdHost<D> {
    /// The connection's fault queue, made when the first table with
    /// PAGE_REQUESTS needs it (IOMMU_FAULT_QUEUE_ALLOC).
    pub(super) fn fault_queue(&mut self) -> Result<FaultId> {
        if let Some(q) = &self.fault {
            return Ok(q.id);
        }
        let FaultQueue { id, file } = self.fd.fault_queue_alloc()?;
        limited!(Level::Info, "iommufd: fault queue {id} for this connection");
        self.fault = Some(KernelQueue { id, file });
        Ok(id)
    }

    pub(super) fn write_responses(
        &mut self,
        responses: &[PageResponse],
        each: &mut dyn FnMut(usize, Result<bool>),
    ) {
        let Some(KernelQueue { file, .. }) = self.fault.as_mut() else {
            for i in 0..responses.len() {
                each(i, Err(BridgeError::Unsupported("no fault queue")));
            }
            return;
        };
        let mut stale = 0;
        let done = write_page_responses(file, responses, &mut |i, r| {
            if let Ok(false) = r {
                stale += 1;
            }
            each(i, r)
        });
        self.response_writes += done.writes;
        self.responses_written += done.taken;
        self.responses_stale += stale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's fault FD as write() sees it: responses in order, stop
    /// at the first unknown cookie (EINVAL when it is the first).
    struct KernelResponses {
        outstanding: Vec<u32>,
        writes: usize,
    }

    impl std::io::Write for KernelResponses {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            let mut done = 0;
            for r in buf.chunks_exact(8) {
                let cookie = u32::from_le_bytes(r[..4].try_into().unwrap());
                match self.outstanding.iter().position(|&c| c == cookie) {
                    Some(p) => {
                        self.outstanding.remove(p);
                        done += 8;
                    }
                    None => break,
                }
            }
            if done == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(done)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn page_responses_go_in_batches_and_a_refused_one_is_skipped() {
        let mut k = KernelResponses {
            outstanding: (1..=100).filter(|c| c % 10 != 5).collect(),
            writes: 0,
        };
        let rs: Vec<PageResponse> = (1..=100)
            .map(|cookie| PageResponse {
                cookie,
                outcome: crate::iommufd_bridge::PageOutcome::Success,
            })
            .collect();
        let mut got = Vec::new();
        let done = write_page_responses(&mut k, &rs, &mut |i, r| got.push((i, r.unwrap())));
        // Only the refused ones are reported, in order.
        assert!(got.iter().all(|g| !g.1), "{got:?}");
        let stale: Vec<_> = got.iter().map(|g| g.0 + 1).collect();
        assert_eq!(stale, vec![5, 15, 25, 35, 45, 55, 65, 75, 85, 95]);
        assert_eq!(done.taken, 90);
        let writes = done.writes;
        assert!(k.outstanding.is_empty());
        // Chunks of 64 and 36; each refusal costs a failed write and one
        // that goes on: 1 + 2 * 6 for the first (6 refused), 2 * 4 for the
        // second (starts with one): 21 writes for 100 responses.
        assert_eq!(k.writes, 21);
        assert_eq!(writes, 21, "the count the host reports");
    }
}
