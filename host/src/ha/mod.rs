//! High availability (issue 7, in progress): active/passive controllers. Built so far:
//! fencing tokens on the shared state and on commands (`token`), fencing levels and
//! the race delay (`fencing`). Leadership through etcd leases and the standby's
//! takeover are not built yet.

pub mod fencing;
pub mod token;
