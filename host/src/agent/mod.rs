//! The agent role: runs a job's steps and streams their output.
//! (Registration, heartbeats and the transport session come with the controller.)

pub mod artifacts;
pub mod budget;
pub mod exec;
pub mod mask;
pub mod multiline;
pub mod tracking;
pub mod worker;
