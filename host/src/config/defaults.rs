//! Defaults of the daemons' settings. Configuration is the ground floor: the roles read
//! their defaults from here (and re-export them where their own configs name them).

use std::time::Duration;

/// How often an idle side of an agent link says it is alive (`heartbeat`).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long an agent may be out of contact before its in-flight runs are marked `lost`
/// (`[controller] agent-lost-after`).
pub const DEFAULT_AGENT_LOST_AFTER: Duration = Duration::from_secs(60);

/// Bytes of log output the controller keeps on disk for a logging method that is not
/// taking it (`[controller] log-buffer-limit`).
pub const DEFAULT_LOG_BUFFER_LIMIT: u64 = 256 << 20;
