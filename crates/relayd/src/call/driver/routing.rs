//! Which call a message belongs to: [`SessionTable`] routes each Call-ID (the terminal's and
//! every server leg's) to the inbox of the driver of the call that owns it, and
//! [`SessionInput`] is what goes into that inbox — from the relay's dispatcher, from the
//! transactions of the call's legs and requests, and from the driver's own tasks (DNS,
//! billing commits).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rsip::{Request, Response};
use sip_core::endpoint::{IncomingRequest, ServerTx};
use sip_core::Peer;

use super::runner::RunnerQueue;
use crate::call::{LegEvent, LegId, Token};

/// What the dispatcher, the endpoint's transactions and the driver's own tasks hand to a
/// call's driver. It travels boxed (see [`Inbox`]), so its size does not matter.
#[derive(Debug)]
pub enum SessionInput {
    /// A request on one of the call's Call-IDs.
    Request(IncomingRequest),
    /// A CANCEL for the terminal's INVITE.
    Cancel {
        /// The CANCEL request.
        req: Request,
        /// The CANCEL's transaction (answer 200).
        tx: ServerTx,
        /// The INVITE's transaction.
        invite: ServerTx,
    },
    /// An ACK for a 2xx on one of the call's Call-IDs.
    Ack(Request),
    /// A response that matched no transaction (a server re-sending its 2xx).
    Stray(Response),
    /// What a server leg's INVITE got.
    Leg {
        /// Which leg.
        leg: LegId,
        /// What it got.
        event: LegEvent,
    },
    /// Where a leg's server is.
    Resolved {
        /// Which leg.
        leg: LegId,
        /// Its address, or `None`.
        peer: Option<Peer>,
    },
    /// The final answer to a request the call waits for.
    Answered {
        /// The request's token.
        token: Token,
        /// The final response.
        resp: Response,
    },
    /// A billing command committed (or failed).
    Billed {
        /// The command's token.
        token: Token,
        /// What became of it.
        result: Result<(), String>,
    },
    /// The relay is shutting down: end everything now.
    Shutdown,
    /// An operator ends this session (the admin API).
    End {
        /// The session's id.
        session_id: String,
    },
}

/// Routes messages to live calls by Call-ID. Sharded, so dispatching takes one small lock
/// among many and calls never contend with each other.
///
/// A Call-ID is kept as a 64-bit SipHash under a key chosen at start-up, not as a copy of
/// its text (two or more per call, for the call's life). Two live Call-IDs with the same
/// hash — odds about n²/2⁶⁵, 2·10⁻¹¹ for 30,000 calls, and not to be aimed at, since the key
/// never leaves the process — would share one call's inbox; that call finds none of its
/// dialogs in the other's messages and answers them as it answers any stranger's.
pub struct SessionTable {
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<HashMap<u64, Inbox>>>,
    /// The runners calls are placed on (see [`super::runner`]), started with the first call.
    runners: std::sync::OnceLock<Vec<Arc<RunnerQueue>>>,
    /// The key the next call gets on its runner.
    next_key: std::sync::atomic::AtomicU64,
}

const TABLE_SHARDS: usize = 64;

/// A call's mailbox: a queue shared by its senders and its driver, and the runner the call
/// is on (see [`super::runner`]), which it schedules the call on when something arrives.
/// Lighter than a tokio channel (which allocates a block of 32 slots and its bookkeeping per
/// call, 0.8 KiB kept for the call's whole life): a call lives as long as its sessions.
struct Mailbox {
    queue: Mutex<Queue>,
    closed: AtomicBool,
    runner: Arc<RunnerQueue>,
    key: u64,
}

/// A mailbox's inputs, and whether the call is on its runner's ready queue (or running)
/// already: one entry there is enough. Both under one lock, so that an input is either
/// seen by the run in progress or schedules another.
#[derive(Default)]
struct Queue {
    inputs: VecDeque<Box<SessionInput>>,
    scheduled: bool,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("key", &self.key)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Mailbox {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending end of a call's inbox. Inputs travel boxed, so that a queue of them stays
/// small whatever they carry.
#[derive(Clone, Debug)]
pub struct Inbox(Arc<Mailbox>);

/// The receiving end of a call's inbox, owned by the call's driver.
#[derive(Debug)]
pub struct InboxReceiver(Arc<Mailbox>);

/// A new inbox for call `key` on `runner`: its sending and receiving ends.
pub(crate) fn inbox(runner: Arc<RunnerQueue>, key: u64) -> (Inbox, InboxReceiver) {
    let mailbox = Arc::new(Mailbox {
        // Scheduled until the call is started on its runner, which runs it then anyway.
        queue: Mutex::new(Queue {
            inputs: VecDeque::new(),
            scheduled: true,
        }),
        closed: AtomicBool::new(false),
        runner,
        key,
    });
    (Inbox(mailbox.clone()), InboxReceiver(mailbox))
}

impl Inbox {
    /// Hands `input` to the call; gives it back when the call has ended.
    #[allow(clippy::result_large_err)]
    pub fn send(&self, input: SessionInput) -> Result<(), SessionInput> {
        {
            let mut queue = self.0.queue();
            // Checked under the lock the receiver's drop takes: nothing is queued after.
            if self.0.closed.load(Ordering::Acquire) {
                return Err(input);
            }
            queue.inputs.push_back(Box::new(input));
            if std::mem::replace(&mut queue.scheduled, true) {
                return Ok(());
            }
        }
        self.0.runner.schedule(self.0.key);
        Ok(())
    }

    /// Whether the call has ended (its receiver is gone).
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
}

impl InboxReceiver {
    /// The runner the call is placed on, and its key there: where to start it.
    pub(crate) fn runner(&self) -> (Arc<RunnerQueue>, u64) {
        (self.0.runner.clone(), self.0.key)
    }

    /// The next input waiting, if any. When there is none, the next one to arrive schedules
    /// the call on its runner again.
    pub fn try_recv(&mut self) -> Option<SessionInput> {
        let mut queue = self.0.queue();
        let input = queue.inputs.pop_front();
        if input.is_none() {
            queue.scheduled = false;
        }
        input.map(|i| *i)
    }
}

impl Drop for InboxReceiver {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        self.0.closed.store(true, Ordering::Release);
        queue.inputs.clear();
    }
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..TABLE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            runners: std::sync::OnceLock::new(),
            next_key: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl SessionTable {
    /// The key `call_id` is routed by.
    pub(crate) fn key(&self, call_id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one(call_id)
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Inbox>> {
        self.shards[(key >> 48) as usize % TABLE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// An inbox for a new call, on one of the runners, which start with the first call (on
    /// the runtime it is placed from): two per CPU, so that calls spread over every worker
    /// and none waits long behind the others of its runner.
    pub(crate) fn new_inbox(&self) -> (Inbox, InboxReceiver) {
        let runners = self.runners.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            (0..(2 * cpus).clamp(2, 64))
                .map(|_| {
                    let queue = Arc::new(RunnerQueue::default());
                    tokio::spawn(super::runner::run(queue.clone()));
                    queue
                })
                .collect()
        });
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let runner = &runners[(key % runners.len() as u64) as usize];
        inbox(runner.clone(), key)
    }

    /// Routes `call_id` to a call's inbox; returns the key to unroute it by.
    pub fn insert(&self, call_id: &str, inbox: Inbox) -> u64 {
        let key = self.key(call_id);
        self.shard(key).insert(key, inbox);
        key
    }

    /// Stops routing the Call-ID whose key ([`SessionTable::insert`]) is `key`.
    pub fn remove(&self, key: u64) {
        let mut shard = self.shard(key);
        shard.remove(&key);
        // A load peak's room is given back once the shard is under a quarter full.
        if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
            let keep = (shard.len() * 2).max(32);
            shard.shrink_to(keep);
        }
    }

    /// The inbox of the call owning `call_id`.
    pub fn get(&self, call_id: &str) -> Option<Inbox> {
        let key = self.key(call_id);
        self.shard(key).get(&key).cloned()
    }

    /// Hands `input` to the call owning `call_id`; gives it back when there is none.
    #[allow(clippy::result_large_err)]
    pub fn deliver(&self, call_id: &str, input: SessionInput) -> Result<(), SessionInput> {
        match self.get(call_id) {
            Some(tx) => tx.send(input),
            None => Err(input),
        }
    }

    /// Tells every call to end (relay shutdown).
    pub fn shutdown_all(&self) {
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            for tx in map.values() {
                let _ = tx.send(SessionInput::Shutdown);
            }
        }
    }

    /// How many Call-IDs are routed (two or more per call).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no Call-ID is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_inbox_hands_inputs_over_in_order_schedules_its_call_once_and_says_when_it_ended() {
        let runner = Arc::new(RunnerQueue::default());
        let (inbox, mut rx) = inbox(runner.clone(), 7);
        // Before the call is started it counts as scheduled: starting runs it anyway.
        inbox.send(SessionInput::Shutdown).unwrap();
        inbox
            .send(SessionInput::Stray(rsip::Response::default()))
            .unwrap();
        assert!(runner.ready_keys().is_empty());
        assert!(matches!(rx.try_recv(), Some(SessionInput::Shutdown)));
        assert!(matches!(rx.try_recv(), Some(SessionInput::Stray(_))));
        assert!(rx.try_recv().is_none());
        // Emptied: the next input schedules the call, once however many follow.
        inbox.send(SessionInput::Shutdown).unwrap();
        inbox.send(SessionInput::Shutdown).unwrap();
        assert_eq!(runner.ready_keys(), vec![7]);
        assert!(rx.try_recv().is_some() && rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
        inbox.send(SessionInput::Shutdown).unwrap();
        assert_eq!(runner.ready_keys(), vec![7, 7]);
        // The call ends: what is sent afterwards comes back.
        assert!(!inbox.is_closed());
        drop(rx);
        assert!(inbox.is_closed());
        assert!(matches!(
            inbox.send(SessionInput::Shutdown),
            Err(SessionInput::Shutdown)
        ));
    }

    #[test]
    fn the_table_gives_back_a_peaks_room_once_the_calls_are_gone() {
        let table = SessionTable::default();
        let (me, _rx) = inbox(Arc::new(RunnerQueue::default()), 1);
        let ids: Vec<String> = (0..20_000).map(|i| format!("call-{i}")).collect();
        let keys: Vec<u64> = ids.iter().map(|id| table.insert(id, me.clone())).collect();
        let room = |t: &SessionTable| -> usize {
            t.shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).capacity())
                .sum()
        };
        assert!(room(&table) >= 20_000);
        for key in keys {
            table.remove(key);
        }
        assert!(table.get("call-1").is_none());
        assert!(
            room(&table) <= TABLE_SHARDS * 128,
            "room left: {}",
            room(&table)
        );
    }
}
