// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hash map of the hot paths (endpoints, domains, virtual waiters): std's `HashMap` with foldhash's seeded hasher instead of
//! SipHash-1-3, which cost a third of a relayed fault's instructions
//! (spec-notes/benchmarks.md). The seed is random per process, so keys a
//! guest chooses cannot be aimed at one bucket; and every map here is
//! bounded by an option anyway.

/// A `HashMap` with a fast, seeded hasher.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
