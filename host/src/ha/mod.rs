//! High availability (issue 7, in progress): active/passive controllers. Built so far:
//! fencing tokens on the shared state and on commands (`token`). Leadership through
//! etcd leases, fencing levels and the standby's takeover are not built yet.

pub mod token;
