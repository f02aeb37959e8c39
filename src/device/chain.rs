// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Gathering a request out of a descriptor chain and scattering the reply
//! back, without allocating: the guest may split a request at any byte,
//! across direct or indirect descriptors.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, Permissions};

use crate::device::error::ChainError;
use crate::device::mem_view::{copy_in, copy_out, OneRegion};
use crate::wire::MAX_READABLE;

/// Writable buffers remembered by `gather`, so that the reply is written
/// without walking the chain (and re-reading indirect tables) again.
const WRITABLE_SEGMENTS: usize = 4;

/// The readable part (its first MAX_READABLE bytes) and the writable size.
#[derive(Clone)]
pub struct Gathered {
    pub readable: [u8; MAX_READABLE],
    /// Bytes of `readable` that hold data.
    pub copied: usize,
    pub readable_len: u64,
    pub writable_len: u64,
    /// The first writable buffers (address, length), in chain order.
    segments: [(GuestAddress, u32); WRITABLE_SEGMENTS],
    nsegments: usize,
}

impl Gathered {
    pub fn new() -> Self {
        Gathered {
            readable: [0; MAX_READABLE],
            copied: 0,
            readable_len: 0,
            writable_len: 0,
            segments: [(GuestAddress(0), 0); WRITABLE_SEGMENTS],
            nsegments: 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.readable[..self.copied]
    }
}

impl Default for Gathered {
    fn default() -> Self {
        Self::new()
    }
}

/// Walk the chain once: copy the start of the readable part, check that every
/// writable buffer lies in guest memory, and that no readable descriptor
/// follows a writable one.
pub fn gather<M>(chain: &DescriptorChain<M>, g: &mut Gathered) -> Result<(), ChainError>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    let mem = chain.memory();
    g.copied = 0;
    g.readable_len = 0;
    g.writable_len = 0;
    g.nsegments = 0;
    for desc in chain.clone() {
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            if !writable_range(mem, desc.addr(), desc.len() as usize) {
                return Err(ChainError::OutsideMemory(desc.addr().raw_value(), len));
            }
            g.writable_len += len;
            if g.nsegments < WRITABLE_SEGMENTS {
                g.segments[g.nsegments] = (desc.addr(), desc.len());
                g.nsegments += 1;
            }
        } else {
            if g.writable_len != 0 {
                return Err(ChainError::ReadableAfterWritable);
            }
            let n = (desc.len() as usize).min(MAX_READABLE - g.copied);
            if n > 0 {
                read_at(mem, desc.addr(), &mut g.readable[g.copied..g.copied + n])
                    .map_err(|()| ChainError::OutsideMemory(desc.addr().raw_value(), len))?;
                g.copied += n;
            }
            g.readable_len += len;
        }
    }
    Ok(())
}

/// Write `data` at the start of the writable part that `gather` found in
/// `chain`. Returns the bytes written.
pub fn scatter_gathered<M>(
    chain: &DescriptorChain<M>,
    g: &Gathered,
    data: &[u8],
) -> Result<usize, ChainError>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    let mem = chain.memory();
    // Nearly always: the reply fits in the first writable buffer.
    if let Some(&(addr, len)) = g.segments[..g.nsegments].first() {
        if data.len() <= len as usize {
            write_at(mem, addr, data)?;
            return Ok(data.len());
        }
    }
    let mut done = 0;
    for &(addr, len) in &g.segments[..g.nsegments] {
        if done == data.len() {
            return Ok(done);
        }
        let n = (len as usize).min(data.len() - done);
        write_at(mem, addr, &data[done..done + n])?;
        done += n;
    }
    if done == data.len() {
        Ok(done)
    } else if g.nsegments == WRITABLE_SEGMENTS {
        // The reply reaches past the buffers remembered: walk the chain.
        scatter(chain, data)
    } else {
        Err(ChainError::ShortWritable(done, data.len()))
    }
}

/// Write `data` at the start of the writable part. Returns the bytes written.
pub fn scatter<M>(chain: &DescriptorChain<M>, data: &[u8]) -> Result<usize, ChainError>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    let mem = chain.memory();
    let mut done = 0;
    for desc in chain.clone().writable() {
        if done == data.len() {
            break;
        }
        let n = (desc.len() as usize).min(data.len() - done);
        write_at(mem, desc.addr(), &data[done..done + n])?;
        done += n;
    }
    if done < data.len() {
        return Err(ChainError::ShortWritable(done, data.len()));
    }
    Ok(done)
}

// vm-memory's `read_slice`, `write_slice` and `check_range` walk a slice
// iterator even for a range inside one region (a few hundred instructions
// each, most of a request's cost: spec-notes/benchmarks.md). A request's
// buffers lie in one region nearly always: take that region's slice
// (`OneRegion`: the requestq's view remembers the region), and the general
// path only for a range that crosses regions.

/// A chain of one device-writable buffer of at least `data.len()` bytes
/// (what drivers post on the eventq): `data` written at its start, in one
/// region lookup (`Some(Ok(n))`, or `Some(Err)` when the buffer is not
/// guest memory); None for any other shape (`gather` it).
pub fn write_single<M>(chain: &DescriptorChain<M>, data: &[u8]) -> Option<Result<usize, ChainError>>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    let d = chain.clone().next()?;
    if !d.is_write_only() || d.has_next() || (d.len() as usize) < data.len() {
        return None;
    }
    Some(write_at(chain.memory(), d.addr(), data).map(|()| data.len()))
}

/// Is `[addr, addr + len)` guest memory the device may write?
fn writable_range<G: OneRegion + ?Sized>(mem: &G, addr: GuestAddress, len: usize) -> bool {
    mem.slice_in_one_region(addr, len).is_some() || mem.check_range(addr, len, Permissions::Write)
}

/// Copy guest memory at `addr` into `buf`.
fn read_at<G: OneRegion + ?Sized>(mem: &G, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ()> {
    if let Some(slice) = mem.slice_in_one_region(addr, buf.len()) {
        copy_out(&slice, buf);
        return Ok(());
    }
    mem.read_slice(buf, addr).map_err(|_| ())
}

fn write_at<G: OneRegion + ?Sized>(
    mem: &G,
    addr: GuestAddress,
    data: &[u8],
) -> Result<(), ChainError> {
    if let Some(slice) = mem.slice_in_one_region(addr, data.len()) {
        copy_in(&slice, data);
        return Ok(());
    }
    mem.write_slice(data, addr)
        .map_err(|_| ChainError::OutsideMemory(addr.raw_value(), data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Two adjacent regions, [0, 0x2000) and [0x2000, 0x4000), then a hole.
    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x2000)])
            .unwrap()
    }

    #[test]
    fn a_range_inside_one_region_takes_one_lookup() {
        let mem = two_regions();
        write_at(&mem, GuestAddress(0x100), b"inside").unwrap();
        let mut buf = [0u8; 6];
        read_at(&mem, GuestAddress(0x100), &mut buf).unwrap();
        assert_eq!(&buf, b"inside");
        assert!(writable_range(&mem, GuestAddress(0x100), 6));
    }

    #[test]
    fn a_range_across_two_regions_takes_the_general_path() {
        let mem = two_regions();
        write_at(&mem, GuestAddress(0x1ffd), b"across").unwrap();
        let mut buf = [0u8; 6];
        read_at(&mem, GuestAddress(0x1ffd), &mut buf).unwrap();
        assert_eq!(&buf, b"across");
        assert!(writable_range(&mem, GuestAddress(0x1ffd), 6));
    }

    #[test]
    fn a_range_into_a_hole_is_refused() {
        let mem = two_regions();
        let mut buf = [0u8; 6];
        assert!(read_at(&mem, GuestAddress(0x3ffd), &mut buf).is_err());
        assert!(write_at(&mem, GuestAddress(0x3ffd), b"beyond").is_err());
        assert!(!writable_range(&mem, GuestAddress(0x3ffd), 6));
        assert!(!writable_range(&mem, GuestAddress(0x5000), 1));
    }
}
