//! Snapshot store (filled by the snapshot issue): base/function/argument nodes, delta pages, lineage, restore mapping.
