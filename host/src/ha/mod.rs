//! High availability (issue 7, in progress): active/passive controllers. Built so far:
//! leadership on etcd (`leader`), fencing tokens on the shared state and on commands
//! (`token`), fencing levels and the race delay (`fencing`). The role that joins them
//! in the daemon (the standby's watch, fence, take over) is not built yet.

pub mod fencing;
pub mod leader;
pub mod token;
