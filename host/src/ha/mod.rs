//! High availability (issue 7, in progress): active/passive controllers. The role
//! (`role`: campaign, or stand by, fence, take over), leadership on etcd (`leader`),
//! fencing tokens on the shared state and on commands (`token`), fencing levels and
//! the race delay (`fencing`). Storage fencing is not built yet.

pub mod fencing;
pub mod leader;
pub mod role;
pub mod status;
pub mod token;
