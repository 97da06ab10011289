//! High availability: active/passive controllers (docs/HA.md). The role (`role`:
//! campaign, or stand by, fence, take over), leadership on etcd (`leader`), fencing
//! tokens on the shared state and on commands (`token`), fencing levels and the race
//! delay (`fencing`), and what a controller reports of all this (`status`: `GET
//! /api/cluster`, `trellis cluster status`, metrics). The fence devices themselves are
//! fence-agent plugins (`points::fence`; Redfish and GlusterFS samples in `plugins/`).

pub mod fencing;
pub mod leader;
pub mod role;
pub mod status;
pub mod token;
