//! `command-transport` on the host side. Failure policy: reconnect — a broken link
//! (an error, a trap, a timeout) ends the `Link`; the session layer above opens a new
//! one on a fresh instance and resends every frame the peer has not acknowledged.
//!
//! Accepted channels live in the listener's instance (a resource belongs to the store
//! that made it), so they share it behind a lock.
//!
//! **Readiness.** A transport built for 0.3.0 or later gives each channel and listener a
//! `wasi:io/poll` pollable (`subscribe`). One *waiter* task per instance holds the
//! instance while nobody calls it and waits on every armed pollable of that instance at
//! once (wasmtime-wasi's `poll` over the store's resource table: host code, no guest code
//! runs). When one is ready it disarms it and wakes its link; the link calls `receive`
//! (which re-arms it). A caller interrupts the wait and takes the instance first
//! (`Shared::lock`), so a link never waits on another link's idle wait. An idle link
//! thus makes no plugin call until a frame arrives or one is due out. Transports from
//! before 0.3.0 have no pollable and are polled, as they always were (`Polling`).

use crate::runtime::{Instance, Plugin, PluginError};
use crate::wit::command_transport::{Frame, Lane};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard, Notify};
use wasmtime::component::{Resource, ResourceAny};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::io::poll::{Host as Poll, HostPollable};

/// How often a controller-side link of a transport without readiness (before 0.3.0)
/// polls: a zero-timeout `receive`, then a wait in the host (its instance is shared).
pub const POLL_SHARED: Duration = Duration::from_millis(5);

/// How long an agent-side `receive` of a transport without readiness waits in the
/// plugin (its instance is its own) when nothing is due out.
pub const POLL_OWN_MS: u32 = 20;

/// How often a listener without readiness is asked for a new agent.
const POLL_ACCEPT: Duration = Duration::from_millis(25);

/// How a link learns that `receive` may have something.
enum Polling {
    /// The transport's pollable, through the instance's waiter.
    Events(Arc<Armed>),
    /// No pollable, a shared instance: `receive(0)`, then wait this long in the host.
    Outside(Duration),
    /// No pollable, an instance of its own: `receive` waits inside the plugin.
    Inside,
}

/// One registered pollable: the waiter waits on it while `armed`.
struct Armed {
    /// The waiter found it ready and nobody has called `receive`/`accept` since.
    ready: AtomicBool,
    wake: Notify,
}

struct Registration {
    /// The pollable's handle in the instance's resource table.
    rep: u32,
    armed: bool,
    link: Arc<Armed>,
}

/// The bookkeeping of an instance's waiter.
#[derive(Default)]
struct Waiter {
    /// Tasks about to call into the instance: the waiter lets go of it for them.
    wanting: AtomicUsize,
    interrupt: Notify,
    registry: std::sync::Mutex<Registry>,
    /// Links and listeners in the instance; the waiter ends when the last one goes.
    users: AtomicUsize,
    closed: AtomicBool,
}

impl Waiter {
    fn enter(&self) {
        self.users.fetch_add(1, SeqCst);
    }

    /// The instance is of no more use (its first link or listener never came to be).
    fn close(&self) {
        self.closed.store(true, SeqCst);
        self.interrupt.notify_one();
    }

    fn leave(&self) {
        if self.users.fetch_sub(1, SeqCst) == 1 {
            self.closed.store(true, SeqCst);
            self.interrupt.notify_one();
        }
    }
}

#[derive(Default)]
struct Registry {
    next: u64,
    entries: HashMap<u64, Registration>,
}

/// An instance with the links (and listener) in it.
struct Shared {
    plugin: Arc<Plugin>,
    inst: Mutex<Instance>,
    /// None: the transport has no readiness (before 0.3.0).
    waiter: Option<Waiter>,
}

/// Decrements `wanting` when the lock is taken, or when the wait for it is abandoned.
struct Wanting<'a>(&'a AtomicUsize);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Shared {
    fn new(plugin: Arc<Plugin>, inst: Instance) -> Arc<Shared> {
        let events = inst
            .exports
            .transport
            .as_ref()
            .is_some_and(|t| t.has_readiness());
        let shared = Arc::new(Shared {
            plugin,
            inst: Mutex::new(inst),
            waiter: events.then(Waiter::default),
        });
        if shared.waiter.is_some() {
            tokio::spawn(wait_loop(shared.clone()));
        }
        shared
    }

    /// The instance, for a call: the waiter is told to let go of it first.
    async fn lock(&self) -> MutexGuard<'_, Instance> {
        let Some(w) = &self.waiter else {
            return self.inst.lock().await;
        };
        w.wanting.fetch_add(1, SeqCst);
        let _wanting = Wanting(&w.wanting);
        w.interrupt.notify_one();
        self.inst.lock().await
    }

    /// Register `pollable` (just returned by `subscribe`, in `inst`): its link is woken
    /// when it is ready. Call with the instance locked.
    fn register(&self, pollable: Resource<DynPollable>) -> (u64, Arc<Armed>) {
        let w = self
            .waiter
            .as_ref()
            .expect("only transports with readiness subscribe");
        let armed = Arc::new(Armed {
            ready: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let mut r = w.registry.lock().unwrap();
        r.next += 1;
        let id = r.next;
        r.entries.insert(
            id,
            Registration {
                rep: pollable.rep(),
                armed: true,
                link: armed.clone(),
            },
        );
        (id, armed)
    }

    /// Wait on `id`'s pollable again (after a `receive`/`accept`). Call with the
    /// instance locked, so the waiter sees it when it next takes the instance.
    fn rearm(&self, id: u64) {
        if let Some(w) = &self.waiter
            && let Some(e) = w.registry.lock().unwrap().entries.get_mut(&id)
        {
            e.armed = true;
        }
    }

    /// Drop `id`'s pollable (before whatever it belongs to goes). Instance locked.
    fn unregister(&self, inst: &mut Instance, id: u64) {
        let Some(w) = &self.waiter else { return };
        let Some(e) = w.registry.lock().unwrap().entries.remove(&id) else {
            return;
        };
        let table = &mut inst.store.data_mut().table;
        if let Err(err) = HostPollable::drop(table, Resource::<DynPollable>::new_own(e.rep)) {
            tracing::warn!("dropping a link's pollable: {err}");
        }
    }

    /// The instance's first link or listener (`connect`, `listen`): subscribe it and
    /// count it as the waiter's user; if it cannot be subscribed, the waiter ends.
    async fn first_user(
        self: &Arc<Shared>,
        resource: ResourceAny,
        listener: bool,
        otherwise: Polling,
    ) -> Result<(Polling, u64), PluginError> {
        let subscribed = {
            let mut inst = self.lock().await;
            self.subscribe(&mut inst, resource, listener, otherwise)
                .await
        };
        if let Some(w) = &self.waiter {
            match &subscribed {
                Ok(_) => w.enter(),
                Err(_) => w.close(),
            }
        }
        subscribed
    }

    /// Subscribe `resource` (a channel or the listener) if the transport can, in `inst`.
    async fn subscribe(
        self: &Arc<Shared>,
        inst: &mut Instance,
        resource: ResourceAny,
        listener: bool,
        otherwise: Polling,
    ) -> Result<(Polling, u64), PluginError> {
        if self.waiter.is_none() {
            return Ok((otherwise, 0));
        }
        let p = &self.plugin;
        let guest = inst.exports.transport.clone().expect("checked at creation");
        let pollable = if listener {
            crate::guarded!(p, inst, "subscribe", |store| guest
                .subscribe_listener(store, resource))?
        } else {
            crate::guarded!(p, inst, "subscribe", |store| guest
                .subscribe_channel(store, resource))?
        };
        let pollable = pollable.expect("a transport with readiness has subscribe");
        let (id, armed) = self.register(pollable);
        Ok((Polling::Events(armed), id))
    }
}

/// The waiter of one instance (see the module docs). Ends once its last link or
/// listener is gone, or the instance died (its links are woken to find out).
async fn wait_loop(sh: Arc<Shared>) {
    let w = sh.waiter.as_ref().expect("spawned for a waiter");
    loop {
        if w.closed.load(SeqCst) {
            return;
        }
        // The lock is fair: callers already queued for it go first, and this waits
        // behind them without spinning.
        let mut inst = sh.inst.lock().await;
        if w.wanting.load(SeqCst) > 0 || w.closed.load(SeqCst) {
            // A caller is about to queue (or queued behind us): let it go first.
            drop(inst);
            tokio::task::yield_now().await;
            continue;
        }
        if inst.is_poisoned() {
            for e in w.registry.lock().unwrap().entries.values() {
                e.link.ready.store(true, SeqCst);
                e.link.wake.notify_one();
            }
            return;
        }
        let armed: Vec<(u64, u32)> = w
            .registry
            .lock()
            .unwrap()
            .entries
            .iter()
            .filter(|(_, e)| e.armed)
            .map(|(id, e)| (*id, e.rep))
            .collect();
        if armed.is_empty() {
            drop(inst);
            w.interrupt.notified().await;
            continue;
        }
        let pollables = armed
            .iter()
            .map(|(_, rep)| Resource::<DynPollable>::new_borrow(*rep))
            .collect();
        let ready = {
            let table = &mut inst.store.data_mut().table;
            tokio::select! {
                r = Poll::poll(table, pollables) => Some(r),
                _ = w.interrupt.notified() => None,
            }
        };
        let Some(ready) = ready else { continue };
        let mut registry = w.registry.lock().unwrap();
        let ready: Vec<u64> = match ready {
            Ok(indices) => indices
                .into_iter()
                .filter_map(|i| armed.get(i as usize).map(|(id, _)| *id))
                .collect(),
            Err(e) => {
                // A pollable the host cannot wait on: let every link call and find out.
                tracing::warn!(plugin = %sh.plugin.name, "waiting on the transport's pollables: {e}");
                armed.iter().map(|(id, _)| *id).collect()
            }
        };
        for id in ready {
            if let Some(e) = registry.entries.get_mut(&id) {
                e.armed = false;
                e.link.ready.store(true, SeqCst);
                e.link.wake.notify_one();
            }
        }
    }
}

/// One end of a controller-agent link.
pub struct Link {
    shared: Arc<Shared>,
    channel: ResourceAny,
    polling: Polling,
    /// The pollable's registration (0: none).
    registration: u64,
    /// Accepted on a listener: the instance outlives the link (see `Drop`).
    accepted: bool,
}

/// The controller's listener.
pub struct Listener {
    shared: Arc<Shared>,
    listener: ResourceAny,
    polling: Polling,
    registration: u64,
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
    let shared = Shared::new(plugin, inst);
    let (polling, registration) = shared.first_user(channel, false, Polling::Inside).await?;
    Ok(Link {
        shared,
        channel,
        polling,
        registration,
        accepted: false,
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
    let shared = Shared::new(plugin, inst);
    let (polling, registration) = shared
        .first_user(listener, true, Polling::Outside(POLL_ACCEPT))
        .await?;
    Ok(Listener {
        shared,
        listener,
        polling,
        registration,
    })
}

impl Polling {
    /// Whether to call `receive`/`accept` now, and with which timeout, for a caller
    /// that would wait up to `wait` for something to arrive.
    fn call_now(&self, wait: Duration) -> Option<u32> {
        match self {
            Polling::Events(armed) => armed.ready.swap(false, SeqCst).then_some(0),
            Polling::Outside(_) => Some(0),
            Polling::Inside => Some(wait.as_millis().min(u32::MAX as u128) as u32),
        }
    }

    async fn readable(&self) {
        match self {
            Polling::Events(armed) => {
                if !armed.ready.load(SeqCst) {
                    armed.wake.notified().await
                }
            }
            Polling::Outside(every) => tokio::time::sleep(*every).await,
            // `receive` waited in the plugin already.
            Polling::Inside => {}
        }
    }
}

impl Listener {
    pub async fn accept(&self, timeout_ms: u32) -> Result<Option<Link>, PluginError> {
        let p = &self.shared.plugin;
        let mut inst = self.shared.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at listen");
        let l = self.listener;
        let r = crate::guarded!(p, &mut inst, "accept", |store| guest
            .accept(store, l, timeout_ms))?;
        self.shared.rearm(self.registration);
        let Some(channel) = p.answer("accept", r)? else {
            return Ok(None);
        };
        let (polling, registration) = self
            .shared
            .subscribe(&mut inst, channel, false, Polling::Outside(POLL_SHARED))
            .await?;
        if let Some(w) = &self.shared.waiter {
            w.enter();
        }
        Ok(Some(Link {
            shared: self.shared.clone(),
            channel,
            polling,
            registration,
            accepted: true,
        }))
    }

    /// The next agent, when one may be there: waits for the listener's readiness (or
    /// polls a transport without it), then accepts without waiting in the plugin.
    pub async fn next(&self) -> Result<Option<Link>, PluginError> {
        if self.polling.call_now(Duration::ZERO).is_none() {
            self.polling.readable().await;
            if self.polling.call_now(Duration::ZERO).is_none() {
                return Ok(None);
            }
        }
        let accepted = self.accept(0).await?;
        if accepted.is_none() && matches!(self.polling, Polling::Outside(_)) {
            self.polling.readable().await;
        }
        Ok(accepted)
    }

    /// True once the listener's instance failed (a trap): listen again on a new one.
    pub async fn is_broken(&self) -> bool {
        self.shared.lock().await.is_poisoned()
    }
}

impl Link {
    pub async fn send(&self, frames: Vec<Frame>) -> Result<(), PluginError> {
        let p = &self.shared.plugin;
        let mut inst = self.shared.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "send", |store| guest.send(store, ch, frames))?;
        p.answer("send", r)
    }

    pub async fn receive(&self, timeout_ms: u32) -> Result<Vec<Frame>, PluginError> {
        let p = &self.shared.plugin;
        let mut inst = self.shared.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "receive", |store| guest
            .receive(store, ch, timeout_ms))?;
        self.shared.rearm(self.registration);
        let frames = p.answer("receive", r)?;
        p.check_return(&mut inst, "receive", frames_size(&frames))?;
        Ok(frames)
    }

    /// What arrived, if anything may have. A link whose transport has readiness calls
    /// `receive` when its pollable was ready, or when `busy` (frames are going out: the
    /// peer's acknowledgements are taken at once, not after the waiter's next turn);
    /// otherwise it waits up to `wait` for readiness (outside the plugin, holding
    /// nothing) and calls nothing if none came. A transport without readiness is polled
    /// as before: `receive(0)` on a shared instance, or `receive` waiting up to `wait`
    /// inside the plugin on an instance of its own.
    pub async fn receive_ready(
        &self,
        busy: bool,
        wait: Duration,
    ) -> Result<Vec<Frame>, PluginError> {
        let ms = |d: Duration| d.as_millis().min(u32::MAX as u128) as u32;
        match &self.polling {
            Polling::Events(armed) => {
                let mut ready = busy || armed.ready.swap(false, SeqCst);
                if !ready && !wait.is_zero() {
                    let _ = tokio::time::timeout(wait, self.polling.readable()).await;
                    ready = armed.ready.swap(false, SeqCst);
                }
                if !ready {
                    return Ok(Vec::new());
                }
                self.receive(0).await
            }
            Polling::Outside(_) => self.receive(0).await,
            Polling::Inside => self.receive(if busy { 0 } else { ms(wait) }).await,
        }
    }

    /// Resolves when `receive_ready` may find something: the pollable is ready (event-
    /// driven), or the polling interval passed (a transport without readiness).
    /// Cancel-safe: use it in a `select!` with the caller's other reasons to wake.
    pub async fn readable(&self) {
        self.polling.readable().await
    }

    /// Whether this link is event-driven (its transport has readiness).
    pub fn is_event_driven(&self) -> bool {
        matches!(self.polling, Polling::Events(_))
    }

    pub async fn commit(&self, lane: Lane, seq: u64) -> Result<(), PluginError> {
        let p = &self.shared.plugin;
        let mut inst = self.shared.lock().await;
        let guest = inst.exports.transport.clone().expect("checked at connect");
        let ch = self.channel;
        let r = crate::guarded!(p, &mut inst, "commit", |store| guest
            .commit(store, ch, lane, seq))?;
        p.answer("commit", r)
    }

    /// True once the link's instance failed: open a new link.
    pub async fn is_broken(&self) -> bool {
        self.shared.lock().await.is_poisoned()
    }
}

/// The listener's pollable goes before the listener (the instance may live on in its
/// links); an instance that nothing uses any more goes with its last user.
impl Drop for Listener {
    fn drop(&mut self) {
        let Some(w) = &self.shared.waiter else { return };
        w.leave();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, id) = (self.shared.clone(), self.registration);
        rt.spawn(async move {
            let mut inst = shared.lock().await;
            shared.unregister(&mut inst, id);
        });
    }
}

/// An accepted link shares the listener's instance, which lives on: its channel must be
/// dropped in the guest explicitly, or every reconnect would leave one behind (with
/// whatever it holds — a socket, a Kafka consumer still fetching). Its pollable goes
/// first (it belongs to the channel's stream). A link with an instance of its own goes
/// away with the instance.
impl Drop for Link {
    fn drop(&mut self) {
        if let Some(w) = &self.shared.waiter {
            // The last user gone, the waiter lets go of the instance.
            w.leave();
        }
        if !self.accepted {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, channel, id) = (self.shared.clone(), self.channel, self.registration);
        rt.spawn(async move {
            let mut inst = shared.lock().await;
            if inst.is_poisoned() {
                return;
            }
            shared.unregister(&mut inst, id);
            // Guest code (the channel's destructor): on the guarded path, like a call.
            let r = shared
                .plugin
                .drop_resource(&mut inst, "drop-channel", channel)
                .await;
            if let Err(e) = r {
                tracing::warn!("dropping a closed link's channel: {e}");
            }
        });
    }
}
