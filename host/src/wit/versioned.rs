//! A component's exports, whichever `trellis:plugin` version it was built for.
//!
//! Each point has one enum with a variant per served version and the point's calls as
//! methods in the current version's types; an older variant converts at the boundary.
//! Adapters in `points/` call these and never see a version. Serving a new version
//! means: its bindings beside `v0_1`, a variant here, and conversions for what changed.

use super::{
    command_transport, fence_agent, lifecycle, log_browser, logging_method, types, v0_1, v0_2,
};
use crate::runtime::manifest::WitVersion;
use crate::runtime::state::InstanceState;
use std::collections::BTreeSet;
use wasmtime::Result;
use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre, Resource, ResourceAny};
use wasmtime_wasi::p2::DynPollable;

use crate::wit::Point;

type S<'a> = &'a mut Store<InstanceState>;
type Answer<T> = Result<std::result::Result<T, types::Error>>;

/// The `trellis:plugin` versions this host serves, oldest first.
pub const SERVED: &[&str] = &["0.1.0", "0.2.0", "0.3.0"];
/// The newest: what `wit/` holds, the SDK builds for, and new plugins should target.
pub const CURRENT: &str = SERVED[SERVED.len() - 1];

/// Which served version a component's exports are, by its manifest's `wit` (checked
/// against the component before it gets here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V0_1,
    V0_2,
    V0_3,
}

impl Version {
    pub fn of(wit: WitVersion) -> Option<Version> {
        match wit.to_string().as_str() {
            "0.1.0" => Some(Version::V0_1),
            "0.2.0" => Some(Version::V0_2),
            "0.3.0" => Some(Version::V0_3),
            _ => None,
        }
    }
}

/// One variant per served version of a point's exports.
macro_rules! versions {
    ($name:ident, $iface:ident) => {
        #[derive(Clone)]
        pub enum $name {
            V0_1(v0_1::$iface::Guest),
            V0_2(v0_2::$iface::Guest),
            V0_3($iface::Guest),
        }
    };
}

versions!(Lifecycle, lifecycle);
versions!(LoggingMethod, logging_method);
versions!(LogBrowser, log_browser);
versions!(CommandTransport, command_transport);
versions!(FenceAgent, fence_agent);

/// Export lookups resolved once against the `InstancePre`, for one version.
pub(crate) enum ExportIndices {
    V0_1 {
        lifecycle: v0_1::lifecycle::GuestIndices,
        transport: Option<v0_1::command_transport::GuestIndices>,
        logging: Option<v0_1::logging_method::GuestIndices>,
        browser: Option<v0_1::log_browser::GuestIndices>,
        fence: Option<v0_1::fence_agent::GuestIndices>,
    },
    V0_2 {
        lifecycle: v0_2::lifecycle::GuestIndices,
        transport: Option<v0_2::command_transport::GuestIndices>,
        logging: Option<v0_2::logging_method::GuestIndices>,
        browser: Option<v0_2::log_browser::GuestIndices>,
        fence: Option<v0_2::fence_agent::GuestIndices>,
    },
    V0_3 {
        lifecycle: lifecycle::GuestIndices,
        transport: Option<command_transport::GuestIndices>,
        logging: Option<logging_method::GuestIndices>,
        browser: Option<log_browser::GuestIndices>,
        fence: Option<fence_agent::GuestIndices>,
    },
}

/// The typed exports of one instance.
pub struct Exports {
    pub lifecycle: Lifecycle,
    pub transport: Option<CommandTransport>,
    pub logging: Option<LoggingMethod>,
    pub browser: Option<LogBrowser>,
    pub fence: Option<FenceAgent>,
}

/// `ExportIndices::$variant` from version module `$m`'s `GuestIndices::new`, for the
/// points in `points` only.
macro_rules! indices {
    ($variant:ident, $m:ident, $pre:expr, $points:expr) => {{
        let (pre, points) = ($pre, $points);
        let want = |p: Point| points.contains(&p);
        ExportIndices::$variant {
            lifecycle: $m::lifecycle::GuestIndices::new(pre)?,
            transport: want(Point::CommandTransport)
                .then(|| $m::command_transport::GuestIndices::new(pre))
                .transpose()?,
            logging: want(Point::LoggingMethod)
                .then(|| $m::logging_method::GuestIndices::new(pre))
                .transpose()?,
            browser: want(Point::LogBrowser)
                .then(|| $m::log_browser::GuestIndices::new(pre))
                .transpose()?,
            fence: want(Point::FenceAgent)
                .then(|| $m::fence_agent::GuestIndices::new(pre))
                .transpose()?,
        }
    }};
}

impl ExportIndices {
    pub fn new(
        version: Version,
        pre: &InstancePre<InstanceState>,
        points: &BTreeSet<Point>,
    ) -> Result<ExportIndices> {
        Ok(match version {
            Version::V0_1 => indices!(V0_1, v0_1, pre, points),
            Version::V0_2 => indices!(V0_2, v0_2, pre, points),
            Version::V0_3 => indices!(V0_3, super, pre, points),
        })
    }

    /// The typed exports of a fresh instance.
    pub fn load(&self, store: S<'_>, instance: &Instance) -> Result<Exports> {
        macro_rules! load {
            ($v:ident, $lifecycle:expr, $transport:expr, $logging:expr, $browser:expr, $fence:expr) => {
                Exports {
                    lifecycle: Lifecycle::$v($lifecycle.load(&mut *store, instance)?),
                    transport: $transport
                        .as_ref()
                        .map(|i| i.load(&mut *store, instance).map(CommandTransport::$v))
                        .transpose()?,
                    logging: $logging
                        .as_ref()
                        .map(|i| i.load(&mut *store, instance).map(LoggingMethod::$v))
                        .transpose()?,
                    browser: $browser
                        .as_ref()
                        .map(|i| i.load(&mut *store, instance).map(LogBrowser::$v))
                        .transpose()?,
                    fence: $fence
                        .as_ref()
                        .map(|i| i.load(&mut *store, instance).map(FenceAgent::$v))
                        .transpose()?,
                }
            };
        }
        Ok(match self {
            ExportIndices::V0_1 {
                lifecycle,
                transport,
                logging,
                browser,
                fence,
            } => load!(V0_1, lifecycle, transport, logging, browser, fence),
            ExportIndices::V0_2 {
                lifecycle,
                transport,
                logging,
                browser,
                fence,
            } => load!(V0_2, lifecycle, transport, logging, browser, fence),
            ExportIndices::V0_3 {
                lifecycle,
                transport,
                logging,
                browser,
                fence,
            } => load!(V0_3, lifecycle, transport, logging, browser, fence),
        })
    }
}

impl Lifecycle {
    pub async fn init(&self, store: S<'_>, config: &str) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.call_init(store, config).await,
            Self::V0_2(g) => g.call_init(store, config).await,
            Self::V0_3(g) => g.call_init(store, config).await,
        }
    }
}

impl LoggingMethod {
    pub async fn runs_on(&self, store: S<'_>) -> Result<logging_method::Side> {
        match self {
            Self::V0_1(g) => g.call_runs_on(store).await.map(Into::into),
            Self::V0_2(g) => g.call_runs_on(store).await.map(Into::into),
            Self::V0_3(g) => g.call_runs_on(store).await,
        }
    }

    pub async fn open(&self, store: S<'_>, meta: &types::LogMetadata) -> Answer<ResourceAny> {
        match self {
            Self::V0_1(g) => g.call_open(store, meta).await,
            Self::V0_2(g) => g.call_open(store, meta).await,
            Self::V0_3(g) => g.call_open(store, meta).await,
        }
    }

    pub async fn write(
        &self,
        store: S<'_>,
        writer: ResourceAny,
        batch: &types::EventBatch,
    ) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.writer().call_write(store, writer, batch).await,
            Self::V0_2(g) => g.writer().call_write(store, writer, batch).await,
            Self::V0_3(g) => g.writer().call_write(store, writer, batch).await,
        }
    }

    pub async fn close(&self, store: S<'_>, writer: ResourceAny, final_count: u64) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.writer().call_close(store, writer, final_count).await,
            Self::V0_2(g) => g.writer().call_close(store, writer, final_count).await,
            Self::V0_3(g) => g.writer().call_close(store, writer, final_count).await,
        }
    }
}

impl LogBrowser {
    pub async fn read(
        &self,
        store: S<'_>,
        log: &types::LogMetadata,
        request: &log_browser::PageRequest,
    ) -> Answer<log_browser::Page> {
        match self {
            Self::V0_1(g) => {
                let r = g.call_read(store, log, &request.into()).await?;
                Ok(r.map(Into::into))
            }
            Self::V0_2(g) => {
                let r = g.call_read(store, log, &request.into()).await?;
                Ok(r.map(Into::into))
            }
            Self::V0_3(g) => g.call_read(store, log, request).await,
        }
    }

    pub async fn tail(
        &self,
        store: S<'_>,
        log: &types::LogMetadata,
        step: Option<&str>,
        count: u32,
    ) -> Answer<types::EventBatch> {
        match self {
            Self::V0_1(g) => g.call_tail(store, log, step, count).await,
            Self::V0_2(g) => g.call_tail(store, log, step, count).await,
            Self::V0_3(g) => g.call_tail(store, log, step, count).await,
        }
    }

    pub async fn completeness(
        &self,
        store: S<'_>,
        log: &types::LogMetadata,
    ) -> Answer<log_browser::LogCompleteness> {
        match self {
            Self::V0_1(g) => Ok(g.call_completeness(store, log).await?.map(Into::into)),
            Self::V0_2(g) => Ok(g.call_completeness(store, log).await?.map(Into::into)),
            Self::V0_3(g) => g.call_completeness(store, log).await,
        }
    }
}

impl CommandTransport {
    /// Whether this transport says when it is ready (0.3.0 and later: `subscribe`);
    /// older ones are polled.
    pub fn has_readiness(&self) -> bool {
        matches!(self, Self::V0_3(_))
    }

    /// The channel's readiness pollable (None: a transport from before 0.3.0, polled).
    pub async fn subscribe_channel(
        &self,
        store: S<'_>,
        channel: ResourceAny,
    ) -> Result<Option<Resource<DynPollable>>> {
        match self {
            Self::V0_1(_) | Self::V0_2(_) => Ok(None),
            Self::V0_3(g) => g.channel().call_subscribe(store, channel).await.map(Some),
        }
    }

    /// The listener's readiness pollable (None: a transport from before 0.3.0, polled).
    pub async fn subscribe_listener(
        &self,
        store: S<'_>,
        listener: ResourceAny,
    ) -> Result<Option<Resource<DynPollable>>> {
        match self {
            Self::V0_1(_) | Self::V0_2(_) => Ok(None),
            Self::V0_3(g) => g.listener().call_subscribe(store, listener).await.map(Some),
        }
    }

    pub async fn connect(&self, store: S<'_>, agent: &str) -> Answer<ResourceAny> {
        match self {
            Self::V0_1(g) => g.call_connect(store, agent).await,
            Self::V0_2(g) => g.call_connect(store, agent).await,
            Self::V0_3(g) => g.call_connect(store, agent).await,
        }
    }

    pub async fn listen(&self, store: S<'_>) -> Answer<ResourceAny> {
        match self {
            Self::V0_1(g) => g.call_listen(store).await,
            Self::V0_2(g) => g.call_listen(store).await,
            Self::V0_3(g) => g.call_listen(store).await,
        }
    }

    pub async fn accept(
        &self,
        store: S<'_>,
        listener: ResourceAny,
        timeout_ms: u32,
    ) -> Answer<Option<ResourceAny>> {
        match self {
            Self::V0_1(g) => g.listener().call_accept(store, listener, timeout_ms).await,
            Self::V0_2(g) => g.listener().call_accept(store, listener, timeout_ms).await,
            Self::V0_3(g) => g.listener().call_accept(store, listener, timeout_ms).await,
        }
    }

    /// Takes the frames: a 0.1.0 transport gets them converted without copying payloads.
    pub async fn send(
        &self,
        store: S<'_>,
        channel: ResourceAny,
        frames: Vec<command_transport::Frame>,
    ) -> Answer<()> {
        match self {
            Self::V0_1(g) => {
                let frames: Vec<v0_1::command_transport::Frame> =
                    frames.into_iter().map(Into::into).collect();
                g.channel().call_send(store, channel, &frames).await
            }
            Self::V0_2(g) => {
                let frames: Vec<v0_2::command_transport::Frame> =
                    frames.into_iter().map(Into::into).collect();
                g.channel().call_send(store, channel, &frames).await
            }
            Self::V0_3(g) => g.channel().call_send(store, channel, &frames).await,
        }
    }

    pub async fn receive(
        &self,
        store: S<'_>,
        channel: ResourceAny,
        timeout_ms: u32,
    ) -> Answer<Vec<command_transport::Frame>> {
        match self {
            Self::V0_1(g) => {
                let r = g.channel().call_receive(store, channel, timeout_ms).await?;
                Ok(r.map(|fs| fs.into_iter().map(Into::into).collect()))
            }
            Self::V0_2(g) => {
                let r = g.channel().call_receive(store, channel, timeout_ms).await?;
                Ok(r.map(|fs| fs.into_iter().map(Into::into).collect()))
            }
            Self::V0_3(g) => g.channel().call_receive(store, channel, timeout_ms).await,
        }
    }

    pub async fn commit(
        &self,
        store: S<'_>,
        channel: ResourceAny,
        lane: command_transport::Lane,
        seq: u64,
    ) -> Answer<()> {
        match self {
            Self::V0_1(g) => {
                g.channel()
                    .call_commit(store, channel, lane.into(), seq)
                    .await
            }
            Self::V0_2(g) => {
                g.channel()
                    .call_commit(store, channel, lane.into(), seq)
                    .await
            }
            Self::V0_3(g) => g.channel().call_commit(store, channel, lane, seq).await,
        }
    }
}

type Params = Vec<(String, String)>;

impl FenceAgent {
    pub async fn metadata(&self, store: S<'_>) -> Result<fence_agent::AgentInfo> {
        match self {
            Self::V0_1(g) => g.call_metadata(store).await.map(Into::into),
            Self::V0_2(g) => g.call_metadata(store).await.map(Into::into),
            Self::V0_3(g) => g.call_metadata(store).await,
        }
    }

    pub async fn validate(&self, store: S<'_>, device: &Params) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.call_validate(store, device).await,
            Self::V0_2(g) => g.call_validate(store, device).await,
            Self::V0_3(g) => g.call_validate(store, device).await,
        }
    }

    pub async fn status(&self, store: S<'_>, device: &Params) -> Answer<fence_agent::PowerState> {
        match self {
            Self::V0_1(g) => Ok(g.call_status(store, device).await?.map(Into::into)),
            Self::V0_2(g) => Ok(g.call_status(store, device).await?.map(Into::into)),
            Self::V0_3(g) => g.call_status(store, device).await,
        }
    }

    pub async fn fence(
        &self,
        store: S<'_>,
        device: &Params,
        action: fence_agent::FenceAction,
    ) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.call_fence(store, device, action.into()).await,
            Self::V0_2(g) => g.call_fence(store, device, action.into()).await,
            Self::V0_3(g) => g.call_fence(store, device, action).await,
        }
    }

    pub async fn monitor(&self, store: S<'_>, device: &Params) -> Answer<()> {
        match self {
            Self::V0_1(g) => g.call_monitor(store, device).await,
            Self::V0_2(g) => g.call_monitor(store, device).await,
            Self::V0_3(g) => g.call_monitor(store, device).await,
        }
    }

    pub async fn list(&self, store: S<'_>, device: &Params) -> Answer<Vec<fence_agent::Target>> {
        match self {
            Self::V0_1(g) => {
                let r = g.call_list(store, device).await?;
                Ok(r.map(|ts| ts.into_iter().map(Into::into).collect()))
            }
            Self::V0_2(g) => {
                let r = g.call_list(store, device).await?;
                Ok(r.map(|ts| ts.into_iter().map(Into::into).collect()))
            }
            Self::V0_3(g) => g.call_list(store, device).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_version_has_bindings() {
        for v in SERVED {
            let wit = WitVersion::parse(v).unwrap();
            assert!(Version::of(wit).is_some(), "no bindings for served {v}");
        }
        assert_eq!(
            Version::of(WitVersion::parse(CURRENT).unwrap()),
            Some(Version::V0_3)
        );
    }
}
