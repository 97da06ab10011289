//! `command-transport` on the host side. Failure policy: reconnect — a broken link
//! (an error, a trap, a timeout) ends the `Link`; the session layer above opens a new
//! one on a fresh instance and resends every frame the peer has not acknowledged.
//!
//! Accepted channels live in the listener's instance (a resource belongs to the store
//! that made it), so they share it behind a lock.

use crate::points::bindings::command_transport::{Frame, Lane};
use crate::runtime::{Instance, Plugin, PluginError};
use std::sync::Arc;
use tokio::sync::Mutex;
use wasmtime::component::ResourceAny;

/// One end of a controller-agent link.
pub struct Link {
    plugin: Arc<Plugin>,
    inst: Arc<Mutex<Instance>>,
    channel: ResourceAny,
}

/// The controller's listener.
pub struct Listener {
    plugin: Arc<Plugin>,
    inst: Arc<Mutex<Instance>>,
    listener: ResourceAny,
}

fn frames_size(frames: &[Frame]) -> usize {
    frames.iter().map(|f| f.payload.len() + 16).sum()
}

/// Agent side: connect to the controller.
pub async fn connect(plugin: Arc<Plugin>, agent: &str) -> Result<Link, PluginError> {
    let mut inst = plugin.instantiate().await?;
    let guest = inst
        .exports
        .transport
        .clone()
        .ok_or_else(|| plugin.not_implemented("command-transport"))?;
    let agent = agent.to_string();
    let r = crate::guarded!(*plugin, &mut inst, "connect", |store| guest
        .connect(store, &agent))?;
    let channel = plugin.answer("connect", r)?;
    Ok(Link {
        plugin,
        inst: Arc::new(Mutex::new(inst)),
        channel,
    })
}

/// Controller side: start listening.
pub async fn listen(plugin: Arc<Plugin>) -> Result<Listener, PluginError> {
    let mut inst = plugin.instantiate().await?;
    let guest = inst
        .exports
        .transport
        .clone()
        .ok_or_else(|| plugin.not_implemented("command-transport"))?;
    let r = crate::guarded!(*plugin, &mut inst, "listen", |store| guest.listen(store))?;
    let listener = plugin.answer("listen", r)?;
    Ok(Listener {
        plugin,
        inst: Arc::new(Mutex::new(inst)),
        listener,
    })
}

impl Listener {
    pub async fn accept(&self, timeout_ms: u32) -> Result<Option<Link>, PluginError> {
        let p = &self.plugin;
        let mut inst = self.inst.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at listen");
        let l = self.listener;
        let r = crate::guarded!(p, &mut inst, "accept", |store| guest
            .accept(store, l, timeout_ms))?;
        let ch = p.answer("accept", r)?;
        Ok(ch.map(|channel| Link {
            plugin: p.clone(),
            inst: self.inst.clone(),
            channel,
        }))
    }

    /// True once the listener's instance failed (a trap): listen again on a new one.
    pub async fn is_broken(&self) -> bool {
        self.inst.lock().await.is_poisoned()
    }
}

impl Link {
    pub async fn send(&self, frames: Vec<Frame>) -> Result<(), PluginError> {
        let p = &self.plugin;
        let mut inst = self.inst.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "send", |store| guest.send(store, ch, frames))?;
        p.answer("send", r)
    }

    pub async fn receive(&self, timeout_ms: u32) -> Result<Vec<Frame>, PluginError> {
        let p = &self.plugin;
        let mut inst = self.inst.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "receive", |store| guest
            .receive(store, ch, timeout_ms))?;
        let frames = p.answer("receive", r)?;
        p.check_return(&mut inst, "receive", frames_size(&frames))?;
        Ok(frames)
    }

    pub async fn commit(&self, lane: Lane, seq: u64) -> Result<(), PluginError> {
        let p = &self.plugin;
        let mut inst = self.inst.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "commit", |store| guest
            .commit(store, ch, lane, seq))?;
        p.answer("commit", r)
    }

    /// True once the link's instance failed: open a new link.
    pub async fn is_broken(&self) -> bool {
        self.inst.lock().await.is_poisoned()
    }
}

/// An accepted link shares the listener's instance, which lives on: its channel must be
/// dropped in the guest explicitly, or every reconnect would leave one behind (with
/// whatever it holds — a socket, a Kafka consumer still fetching). A link with an
/// instance of its own goes away with the instance.
impl Drop for Link {
    fn drop(&mut self) {
        if Arc::strong_count(&self.inst) == 1 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (plugin, inst, channel) = (self.plugin.clone(), self.inst.clone(), self.channel);
        rt.spawn(async move {
            let mut inst = inst.lock().await;
            if inst.is_poisoned() {
                return;
            }
            // Guest code (the channel's destructor): on the guarded path, like a call.
            let r = plugin
                .drop_resource(&mut inst, "drop-channel", channel)
                .await;
            if let Err(e) = r {
                tracing::warn!("dropping a closed link's channel: {e}");
            }
        });
    }
}
