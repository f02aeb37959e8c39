// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Feature bits and the 40-byte configuration space.

use vm_memory::ByteValued;

use crate::wire;

/// Device feature bits (virtio-iommu, ratified).
pub mod features {
    pub(crate) const INPUT_RANGE: u64 = 1 << 0;
    pub(crate) const DOMAIN_RANGE: u64 = 1 << 1;
    pub(crate) const MAP_UNMAP: u64 = 1 << 2;
    pub(crate) const PROBE: u64 = 1 << 4;
    pub(crate) const MMIO: u64 = 1 << 5;
    pub(crate) const BYPASS_CONFIG: u64 = 1 << 6;
    /// Legacy F_BYPASS (bit 3) is never offered.
    pub const DEVICE_FEATURES: u64 =
        INPUT_RANGE | DOMAIN_RANGE | MAP_UNMAP | PROBE | MMIO | BYPASS_CONFIG;
    /// Extension F_ATTACH_TABLE (spec-notes/protocol.md 3.2). Inside the device it is
    /// always this bit; on the wire it is `DeviceConfig::attach_table_bit`.
    pub const ATTACH_TABLE: u64 = 1 << 7;
    /// Default wire bit of F_ATTACH_TABLE.
    pub(crate) const DEFAULT_ATTACH_TABLE_BIT: u8 = 7;
    /// Extension F_PAGE_REQUEST, internal bit (wire: `page_request_bit`).
    pub const PAGE_REQUEST: u64 = 1 << 10;
    pub(crate) const DEFAULT_PAGE_REQUEST_BIT: u8 = 10;
}

use crate::wire::CONFIG_SIZE;
/// Bytes of properties in each PROBE reply (QEMU uses the same value).
pub(crate) const PROBE_SIZE: u32 = 512;

/// The configuration-space values an operator chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    pub page_size_mask: u64,
    pub input_start: u64,
    pub input_end: u64,
    pub domain_start: u32,
    pub domain_end: u32,
    /// Initial value of the bypass byte (restored when a new guest connects).
    pub boot_bypass: bool,
    /// Wire bit of F_ATTACH_TABLE; None: not offered.
    pub attach_table_bit: Option<u8>,
    /// Wire bit of F_PAGE_REQUEST; None: not offered. Offered only with
    /// F_ATTACH_TABLE.
    pub page_request_bit: Option<u8>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            // 4 KiB granule; every larger power of two is fine for the model.
            page_size_mask: !0xfff,
            input_start: 0,
            input_end: (1 << 48) - 1,
            domain_start: 0,
            domain_end: u32::MAX,
            boot_bypass: true,
            attach_table_bit: Some(features::DEFAULT_ATTACH_TABLE_BIT),
            page_request_bit: Some(features::DEFAULT_PAGE_REQUEST_BIT),
        }
    }
}

impl DeviceConfig {
    /// (wire bit, internal bit) of each offered extension.
    fn extensions(&self) -> impl Iterator<Item = (u8, u64)> {
        let at = self.attach_table_bit;
        // F_PAGE_REQUEST means nothing without tables to fault on.
        let pr = at.and(self.page_request_bit);
        [
            at.map(|b| (b, features::ATTACH_TABLE)),
            pr.map(|b| (b, features::PAGE_REQUEST)),
        ]
        .into_iter()
        .flatten()
    }

    /// The device-specific feature bits offered on the wire.
    pub(crate) fn offered_features(&self) -> u64 {
        self.extensions()
            .fold(features::DEVICE_FEATURES, |f, (b, _)| f | 1u64 << b)
    }

    /// The driver's acknowledged bits as the device uses them: extension
    /// bits moved from their wire position to the internal one.
    pub(crate) fn internal_features(&self, wire: u64) -> u64 {
        let mut out = wire & !(features::ATTACH_TABLE | features::PAGE_REQUEST);
        for (b, _) in self.extensions() {
            out &= !(1u64 << b);
        }
        for (b, internal) in self.extensions() {
            if wire & (1u64 << b) != 0 {
                out |= internal;
            }
        }
        out
    }

    /// The mapping granule: the lowest set bit of page_size_mask.
    pub(crate) fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }

    /// Serialize the config space with the current bypass byte.
    pub(crate) fn to_bytes(self, bypass: bool) -> [u8; CONFIG_SIZE] {
        let config = wire::Config {
            page_size_mask: self.page_size_mask.into(),
            input_start: self.input_start.into(),
            input_end: self.input_end.into(),
            domain_start: self.domain_start.into(),
            domain_end: self.domain_end.into(),
            probe_size: PROBE_SIZE.into(),
            bypass: u8::from(bypass),
            reserved: [0; 3],
        };
        let mut b = [0u8; CONFIG_SIZE];
        b.copy_from_slice(config.as_slice());
        b
    }
}

/// `--page-response-timeout-ms` by default (spec-notes/page-requests.md
/// argues the figure).
pub(crate) const DEFAULT_PAGE_RESPONSE_TIMEOUT_MS: u64 = 10_000;

/// Bounds on what one guest may make us hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Endpoints, those given at start and those added over the control
    /// socket together.
    pub max_endpoints: usize,
    pub max_domains: usize,
    pub max_mappings: usize,
    /// Mappings of all domains together.
    pub max_total_mappings: usize,
    pub max_events: usize,
    /// PASID attachments (ATTACH_TABLE with PASID_VALID), all endpoints.
    pub max_pasids: usize,
    /// Page-request groups outstanding (raised, not yet completed).
    pub max_page_requests: usize,
    /// A group the driver has not answered after this is completed by the
    /// device (None: never).
    pub page_response_timeout: Option<std::time::Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_endpoints: 1 << 16,
            max_domains: 1 << 16,
            max_mappings: 1 << 20,
            max_total_mappings: 1 << 20,
            max_events: 1024,
            max_pasids: 4096,
            max_page_requests: 512,
            page_response_timeout: Some(std::time::Duration::from_millis(
                DEFAULT_PAGE_RESPONSE_TIMEOUT_MS,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_is_the_ratified_40_bytes() {
        let c = DeviceConfig {
            page_size_mask: 0x1000,
            input_start: 0x10,
            input_end: 0x20,
            domain_start: 3,
            domain_end: 9,
            boot_bypass: false,
            attach_table_bit: None,
            page_request_bit: None,
        };
        let b = c.to_bytes(true);
        assert_eq!(b.len(), 40);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x10);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x20);
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_le_bytes(b[32..36].try_into().unwrap()),
            PROBE_SIZE
        );
        assert_eq!(b[36], 1);
        assert_eq!(&b[37..40], &[0, 0, 0]);
    }

    #[test]
    fn granule_is_lowest_bit() {
        let c = DeviceConfig {
            page_size_mask: 0x4020_1000,
            ..Default::default()
        };
        assert_eq!(c.granule(), 0x1000);
    }

    #[test]
    fn attach_table_bit_moves_between_wire_and_device() {
        let mut c = DeviceConfig::default();
        assert_ne!(c.offered_features() & features::ATTACH_TABLE, 0);
        assert_eq!(c.internal_features(1 << 7 | 1), features::ATTACH_TABLE | 1);
        c.attach_table_bit = Some(8);
        assert_eq!(c.offered_features() & (1 << 7), 0);
        assert_ne!(c.offered_features() & (1 << 8), 0);
        assert_eq!(c.internal_features(1 << 8), features::ATTACH_TABLE);
        assert_eq!(c.internal_features(1 << 7), 0, "bit 7 was not offered");
        c.attach_table_bit = None;
        assert_eq!(c.offered_features(), features::DEVICE_FEATURES);
        assert_eq!(c.internal_features(1 << 7), 0);
    }

    #[test]
    fn page_request_bit_needs_attach_table() {
        let mut c = DeviceConfig::default();
        assert_ne!(c.offered_features() & (1 << 10), 0);
        assert_eq!(
            c.internal_features(1 << 10 | 1 << 7),
            features::PAGE_REQUEST | features::ATTACH_TABLE
        );
        c.page_request_bit = Some(12);
        assert_eq!(c.internal_features(1 << 12), features::PAGE_REQUEST);
        assert_eq!(c.internal_features(1 << 10), 0, "bit 10 not offered now");
        c.attach_table_bit = None;
        assert_eq!(c.offered_features() & (1 << 12), 0);
        assert_eq!(c.internal_features(1 << 12) & features::PAGE_REQUEST, 0);
    }

    #[test]
    fn legacy_bypass_is_never_offered() {
        assert_eq!(features::DEVICE_FEATURES & (1 << 3), 0);
    }
}
