// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The ARM_SMMU3 table format: the guest's Stream Table Entry (its first two
//! words, naming the guest's Context Descriptor table) checked as the
//! kernel checks a vSTE, and INVALIDATE turned into SMMUv3 commands for the
//! vIOMMU (IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3). Layouts from the SMMUv3
//! architecture (STE 5.2, commands 4.x) as Linux's arm-smmu-v3.h spells
//! them; see spec-notes/nested.md for the mapping table.

use super::request::{InvScope, Invalidate, NestedError};
use crate::wire::{INV_CACHE_CONFIG, INV_CACHE_TLB};

// STE word 0.
pub const STE0_V: u64 = 1;
const STE0_CFG_SHIFT: u32 = 1;
const STE0_CFG_MASK: u64 = 0b111 << STE0_CFG_SHIFT;
pub const CFG_ABORT: u64 = 0;
pub const CFG_BYPASS: u64 = 4;
pub const CFG_S1_TRANS: u64 = 5;
const STE0_S1FMT: u64 = 0b11 << 4;
const STE0_S1CTXPTR: u64 = ((1 << 52) - 1) & !((1 << 6) - 1);
const STE0_S1CDMAX: u64 = 0b11111 << 59;
/// What a guest may set in word 0 (the kernel's STRTAB_STE_0_NESTING_ALLOWED).
const STE0_ALLOWED: u64 = STE0_V | STE0_CFG_MASK | STE0_S1FMT | STE0_S1CTXPTR | STE0_S1CDMAX;
// STE word 1: S1DSS, S1CIR, S1COR, S1CSH, S1STALLD, EATS.
const STE1_EATS_SHIFT: u32 = 28;
const STE1_EATS_MASK: u64 = 0b11 << STE1_EATS_SHIFT;
const STE1_ALLOWED: u64 = 0xff | (1 << 27) | STE1_EATS_MASK;

// Commands (word 0 bits 7:0 are the opcode).
pub const OP_CFGI_CD_ALL: u64 = 0x06;
pub const OP_TLBI_NH_ALL: u64 = 0x10;
pub const OP_TLBI_NH_ASID: u64 = 0x11;
pub const OP_TLBI_NH_VA: u64 = 0x12;
pub const OP_TLBI_NH_VAA: u64 = 0x13;
pub const OP_ATC_INV: u64 = 0x40;
const CFGI_0_SID_SHIFT: u32 = 32;
const TLBI_0_ASID_SHIFT: u32 = 48;
const TLBI_1_LEAF: u64 = 1;
const VA_MASK: u64 = !0xfff;
const ATC_0_SID_SHIFT: u32 = 32;
/// ATC_INV Size 52: the whole ATC of the stream.
const ATC_1_SIZE_ALL: u64 = 52;

/// Per-address TLBI commands at most; a longer range is widened to the
/// whole ASID (or all ASIDs). 4 KiB steps: the smallest translation granule,
/// so no entry of any granule inside the range is missed.
pub const MAX_VA_COMMANDS: u64 = 32;

/// The kernel's test of a vSTE (arm_smmu_validate_vste): with V clear
/// anything goes (it is an abort STE); otherwise only the allowed fields,
/// Config abort, bypass or stage-1, EATS abort or translate.
pub fn check_vste(ste: [u64; 2]) -> Result<(), NestedError> {
    if ste[0] & STE0_V == 0 {
        return Ok(());
    }
    if ste[0] & !STE0_ALLOWED != 0 || ste[1] & !STE1_ALLOWED != 0 {
        return Err(NestedError::BadSte(ste[0], ste[1]));
    }
    let cfg = (ste[0] & STE0_CFG_MASK) >> STE0_CFG_SHIFT;
    if ![CFG_ABORT, CFG_BYPASS, CFG_S1_TRANS].contains(&cfg) {
        return Err(NestedError::BadSte(ste[0], ste[1]));
    }
    if (ste[1] & STE1_EATS_MASK) >> STE1_EATS_SHIFT > 1 {
        return Err(NestedError::BadSte(ste[0], ste[1]));
    }
    Ok(())
}

/// Does the vSTE turn on ATS (stage-1 with EATS = translate)?
pub fn vste_ats(ste: [u64; 2]) -> bool {
    ste[0] & STE0_V != 0
        && (ste[0] & STE0_CFG_MASK) >> STE0_CFG_SHIFT == CFG_S1_TRANS
        && (ste[1] & STE1_EATS_MASK) >> STE1_EATS_SHIFT == 1
}

/// What the host SMMU allows in commands (from IOMMU_GET_HW_INFO's
/// struct iommu_hw_info_arm_smmuv3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmmuInfo {
    /// IDR0.ASID16: 16-bit ASIDs (else 8).
    pub asid16: bool,
    /// IDR0.ATS.
    pub ats: bool,
    /// Erratum flag: every TLBI/CFGI must be issued twice.
    pub repeat: bool,
}

impl SmmuInfo {
    /// From struct iommu_hw_info_arm_smmuv3 {flags, __reserved, idr[6],
    /// iidr, aidr}.
    pub fn parse(data: &[u8]) -> Self {
        let le32 = |o: usize| {
            data.get(o..o + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        let (flags, idr0) = (le32(0), le32(8));
        SmmuInfo {
            asid16: idr0 & (1 << 12) != 0,
            ats: idr0 & (1 << 10) != 0,
            repeat: flags & 1 != 0,
        }
    }
}

/// The commands carrying out `inv` for a domain whose table is `ste` and
/// whose endpoints have the virtual stream IDs `vsids` (the vDEVICEs'
/// virt_ids): each command two little-endian words, appended to `out`.
/// Whatever the commands cannot say exactly is widened.
pub fn commands(
    inv: &Invalidate,
    ste: [u64; 2],
    vsids: &[u32],
    smmu: SmmuInfo,
    out: &mut Vec<[u64; 2]>,
) {
    let start = out.len();
    if inv.caches & INV_CACHE_CONFIG != 0 {
        // The guest's CD table changed: drop every cached CD of the streams
        // (a PASID's CD alone would need SSID support checks; all is wider).
        for &sid in vsids {
            out.push([OP_CFGI_CD_ALL | (u64::from(sid) << CFGI_0_SID_SHIFT), 0]);
        }
    }
    if inv.caches & INV_CACHE_TLB != 0 {
        let asid_max = if smmu.asid16 { 0xffff } else { 0xff };
        let asid = inv.id.filter(|&a| a <= asid_max);
        let leaf = if inv.leaf { TLBI_1_LEAF } else { 0 };
        let all = [OP_TLBI_NH_ALL, 0];
        match (inv.scope, asid) {
            _ if inv.global => out.push(all),
            // A domain may hold many ASIDs (one per CD): all of its VMID.
            (InvScope::Domain, _) => out.push(all),
            (InvScope::Pasid, Some(a)) => out.push([OP_TLBI_NH_ASID | (a << TLBI_0_ASID_SHIFT), 0]),
            (InvScope::Pasid, None) => out.push(all),
            (
                InvScope::Address {
                    address,
                    nr_pages,
                    page_shift,
                },
                a,
            ) => {
                let bytes = nr_pages.checked_shl(u32::from(page_shift));
                let steps = bytes.map(|b| b.div_ceil(0x1000));
                match steps.filter(|&s| s <= MAX_VA_COMMANDS) {
                    Some(steps) => {
                        for i in 0..steps {
                            let va = (address + (i << 12)) & VA_MASK;
                            out.push(match a {
                                Some(a) => [OP_TLBI_NH_VA | (a << TLBI_0_ASID_SHIFT), va | leaf],
                                None => [OP_TLBI_NH_VAA, va | leaf],
                            });
                        }
                    }
                    None => out.push(match a {
                        Some(a) => [OP_TLBI_NH_ASID | (a << TLBI_0_ASID_SHIFT), 0],
                        None => all,
                    }),
                }
            }
        }
        // A device with ATS caches translations too.
        if smmu.ats && vste_ats(ste) {
            for &sid in vsids {
                out.push([
                    OP_ATC_INV | (u64::from(sid) << ATC_0_SID_SHIFT),
                    ATC_1_SIZE_ALL,
                ]);
            }
        }
    }
    if smmu.repeat {
        let n = out.len();
        out.extend_from_within(start..n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s1(ctx: u64) -> [u64; 2] {
        [STE0_V | (CFG_S1_TRANS << STE0_CFG_SHIFT) | ctx, 0]
    }

    fn inv(scope: InvScope, caches: u8, id: Option<u64>) -> Invalidate {
        Invalidate {
            domain: 1,
            scope,
            caches,
            leaf: false,
            global: false,
            pasid: None,
            id,
        }
    }

    #[test]
    fn vstes_are_checked_like_the_kernel_does() {
        assert_eq!(check_vste(s1(0x4_0000)), Ok(()));
        assert_eq!(check_vste([STE0_V | (CFG_BYPASS << 1), 0]), Ok(()));
        assert_eq!(check_vste([STE0_V, 0]), Ok(()), "abort");
        assert_eq!(check_vste([0x1234 << 8, 7]), Ok(()), "V clear: ignored");
        // Stage-2 and nested configs are the host's, not the guest's.
        for cfg in [6u64, 7, 1] {
            assert!(check_vste([STE0_V | (cfg << 1), 0]).is_err(), "{cfg}");
        }
        // S2 fields in word 2.. are not passed; word 1 outside the list.
        assert!(check_vste([s1(0)[0], 1 << 40]).is_err());
        assert!(check_vste([s1(0)[0] | (1 << 52), 0]).is_err());
        // EATS: abort or translate only.
        assert_eq!(check_vste([s1(0)[0], 1 << 28]), Ok(()));
        assert!(check_vste([s1(0)[0], 2 << 28]).is_err());
        assert!(vste_ats([s1(0)[0], 1 << 28]));
        assert!(!vste_ats(s1(0)));
        assert!(check_vste([s1(0x1000)[0] | STE0_S1CDMAX | STE0_S1FMT, 0xff | (1 << 27)]).is_ok());
    }

    #[test]
    fn invalidations_become_commands_widened_never_narrowed() {
        let smmu = SmmuInfo {
            asid16: true,
            ats: false,
            repeat: false,
        };
        let ste = s1(0x1000);
        let run = |i: Invalidate, smmu: SmmuInfo| {
            let mut v = Vec::new();
            commands(&i, ste, &[8, 0x10], smmu, &mut v);
            v
        };
        // Config: every stream's CDs.
        assert_eq!(
            run(inv(InvScope::Domain, INV_CACHE_CONFIG, None), smmu),
            vec![[0x6 | (8 << 32), 0], [0x6 | (0x10 << 32), 0]]
        );
        // Domain: all ASIDs, even with an ID.
        assert_eq!(
            run(inv(InvScope::Domain, INV_CACHE_TLB, Some(5)), smmu),
            vec![[OP_TLBI_NH_ALL, 0]]
        );
        assert_eq!(
            run(inv(InvScope::Pasid, INV_CACHE_TLB, Some(5)), smmu),
            vec![[OP_TLBI_NH_ASID | (5 << 48), 0]]
        );
        assert_eq!(
            run(inv(InvScope::Pasid, INV_CACHE_TLB, None), smmu),
            vec![[OP_TLBI_NH_ALL, 0]]
        );
        // An ASID the SMMU cannot hold (8-bit ASIDs): all.
        let small = SmmuInfo {
            asid16: false,
            ..smmu
        };
        assert_eq!(
            run(inv(InvScope::Pasid, INV_CACHE_TLB, Some(0x100)), small),
            vec![[OP_TLBI_NH_ALL, 0]]
        );
        // Addresses: one command per 4 KiB, leaf passed on.
        let mut a = inv(
            InvScope::Address {
                address: 0x20_0000,
                nr_pages: 2,
                page_shift: 12,
            },
            INV_CACHE_TLB,
            Some(3),
        );
        a.leaf = true;
        assert_eq!(
            run(a, smmu),
            vec![
                [OP_TLBI_NH_VA | (3 << 48), 0x20_0000 | 1],
                [OP_TLBI_NH_VA | (3 << 48), 0x20_1000 | 1]
            ]
        );
        // A 2 MiB page: its 4 KiB pieces may be cached apart; 512 steps is
        // over the limit, so the whole ASID.
        let big = inv(
            InvScope::Address {
                address: 0x20_0000,
                nr_pages: 1,
                page_shift: 21,
            },
            INV_CACHE_TLB,
            Some(3),
        );
        assert_eq!(run(big, smmu), vec![[OP_TLBI_NH_ASID | (3 << 48), 0]]);
        let no_id = inv(
            InvScope::Address {
                address: 0x5000,
                nr_pages: 1,
                page_shift: 12,
            },
            INV_CACHE_TLB,
            None,
        );
        assert_eq!(run(no_id, smmu), vec![[OP_TLBI_NH_VAA, 0x5000]]);
        let mut g = no_id;
        g.global = true;
        assert_eq!(run(g, smmu), vec![[OP_TLBI_NH_ALL, 0]]);
        // ATS on (SMMU and vSTE): the streams' ATCs too; erratum: twice.
        let ats = SmmuInfo {
            ats: true,
            repeat: true,
            ..smmu
        };
        let mut v = Vec::new();
        commands(
            &inv(InvScope::Domain, INV_CACHE_TLB, None),
            [ste[0], 1 << 28],
            &[8],
            ats,
            &mut v,
        );
        let once = [[OP_TLBI_NH_ALL, 0], [OP_ATC_INV | (8 << 32), 52]];
        assert_eq!(v, [once, once].concat());
    }

    #[test]
    fn hw_info_fields() {
        let mut d = vec![0u8; 40];
        d[0] = 1;
        d[8..12].copy_from_slice(&((1u32 << 12) | (1 << 10)).to_le_bytes());
        assert_eq!(
            SmmuInfo::parse(&d),
            SmmuInfo {
                asid16: true,
                ats: true,
                repeat: true
            }
        );
        assert_eq!(SmmuInfo::parse(&[]), SmmuInfo::default());
    }
}
