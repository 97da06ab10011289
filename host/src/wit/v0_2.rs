//! `trellis:plugin@0.2.0`, generated from the frozen `wit/v0.2.0/`, and its conversions
//! into the current version's types.
//!
//! 0.3.0 differs from 0.2.0 only in `command-transport` (channel and listener gained
//! `subscribe`; a 0.2.0 transport is polled, as before), but every interface of a package
//! carries the package's version, so each 0.2.0 export has its own bindings here. Types that live in `types` (errors, log metadata, event batches) and the
//! host's capabilities are the current ones (`with`), so most calls need no conversion.

wasmtime::component::bindgen!({
    path: "../wit/v0.2.0",
    world: "trellis:plugin/host",
    imports: { default: async },
    exports: { default: async },
    with: {
        "trellis:host": crate::wit::trellis::host,
        "trellis:plugin/types": crate::wit::types,
    },
});

pub use exports::trellis::plugin::{
    command_transport, fence_agent, lifecycle, log_browser, logging_method,
};

use super::{
    command_transport as now_transport, fence_agent as now_fence, log_browser as now_browser,
    logging_method as now_logging,
};

/// `From` between two versions' copies of an enum whose cases did not change.
macro_rules! same_enum {
    ($from:ty => $to:ty { $($case:ident),* $(,)? }) => {
        impl From<$from> for $to {
            fn from(v: $from) -> $to {
                match v {
                    $(<$from>::$case => <$to>::$case,)*
                }
            }
        }
    };
}

same_enum!(logging_method::Side => now_logging::Side { Agent, Controller });
same_enum!(now_transport::Lane => command_transport::Lane { Control, Bulk });
same_enum!(command_transport::Lane => now_transport::Lane { Control, Bulk });
same_enum!(now_fence::FenceAction => fence_agent::FenceAction { Off, On, Reboot });
same_enum!(fence_agent::PowerState => now_fence::PowerState { On, Off, Unknown });
same_enum!(fence_agent::Action => now_fence::Action {
    On, Off, Reboot, Status, Monitor, List, Metadata, ValidateAll
});

impl From<now_transport::Frame> for command_transport::Frame {
    fn from(f: now_transport::Frame) -> Self {
        Self {
            lane: f.lane.into(),
            seq: f.seq,
            payload: f.payload,
        }
    }
}

impl From<command_transport::Frame> for now_transport::Frame {
    fn from(f: command_transport::Frame) -> Self {
        Self {
            lane: f.lane.into(),
            seq: f.seq,
            payload: f.payload,
        }
    }
}

impl From<&now_browser::PageRequest> for log_browser::PageRequest {
    fn from(r: &now_browser::PageRequest) -> Self {
        Self {
            step: r.step.clone(),
            cursor: r.cursor.clone(),
            limit: r.limit,
        }
    }
}

impl From<log_browser::Page> for now_browser::Page {
    fn from(p: log_browser::Page) -> Self {
        Self {
            events: p.events,
            next: p.next,
            total: p.total,
        }
    }
}

impl From<log_browser::LogCompleteness> for now_browser::LogCompleteness {
    fn from(c: log_browser::LogCompleteness) -> Self {
        use log_browser::LogCompleteness as Old;
        match c {
            Old::Open => Self::Open,
            Old::Complete(n) => Self::Complete(n),
            Old::Incomplete(m) => Self::Incomplete(now_browser::MissingEvents {
                expected: m.expected,
                present: m.present,
            }),
        }
    }
}

impl From<fence_agent::Parameter> for now_fence::Parameter {
    fn from(p: fence_agent::Parameter) -> Self {
        Self {
            name: p.name,
            description: p.description,
            required: p.required,
            secret: p.secret,
            default_value: p.default_value,
        }
    }
}

impl From<fence_agent::AgentInfo> for now_fence::AgentInfo {
    fn from(a: fence_agent::AgentInfo) -> Self {
        Self {
            name: a.name,
            description: a.description,
            parameters: a.parameters.into_iter().map(Into::into).collect(),
            actions: a.actions.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<fence_agent::Target> for now_fence::Target {
    fn from(t: fence_agent::Target) -> Self {
        Self {
            id: t.id,
            alias: t.alias,
        }
    }
}
