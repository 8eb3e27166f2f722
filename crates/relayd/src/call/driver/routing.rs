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
use tokio::sync::Notify;

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
pub struct SessionTable {
    shards: Vec<Mutex<HashMap<String, Inbox>>>,
}

const TABLE_SHARDS: usize = 64;

/// A call's mailbox: a queue and a wake-up, shared by its senders and its driver. Lighter
/// than a tokio channel (which allocates a block of 32 slots and its bookkeeping per call,
/// 0.8 KiB kept for the call's whole life): a call lives as long as its sessions.
#[derive(Debug, Default)]
struct Mailbox {
    queue: Mutex<VecDeque<Box<SessionInput>>>,
    wake: Notify,
    closed: AtomicBool,
}

impl Mailbox {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<SessionInput>>> {
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

/// A new inbox for a call: its sending and receiving ends.
pub fn inbox() -> (Inbox, InboxReceiver) {
    let mailbox = Arc::new(Mailbox::default());
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
            queue.push_back(Box::new(input));
        }
        // A permit is kept if the driver is not waiting yet: no wake-up is lost.
        self.0.wake.notify_one();
        Ok(())
    }

    /// Whether the call has ended (its receiver is gone).
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
}

impl InboxReceiver {
    /// The next input. (Never `None`: the driver holds a sender of its own; the `Option`
    /// keeps the shape of a channel's `recv`.)
    pub async fn recv(&mut self) -> Option<SessionInput> {
        loop {
            if let Some(input) = self.0.queue().pop_front() {
                return Some(*input);
            }
            self.0.wake.notified().await;
        }
    }
}

impl Drop for InboxReceiver {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        self.0.closed.store(true, Ordering::Release);
        queue.clear();
    }
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            shards: (0..TABLE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }
}

impl SessionTable {
    fn shard(&self, call_id: &str) -> std::sync::MutexGuard<'_, HashMap<String, Inbox>> {
        let h = call_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        self.shards[h % TABLE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Routes `call_id` to a call's inbox.
    pub fn insert(&self, call_id: &str, inbox: Inbox) {
        self.shard(call_id).insert(call_id.to_string(), inbox);
    }

    /// Stops routing `call_id`.
    pub fn remove(&self, call_id: &str) {
        let mut shard = self.shard(call_id);
        shard.remove(call_id);
        // A load peak's room is given back once the shard is under a quarter full.
        if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
            let keep = (shard.len() * 2).max(32);
            shard.shrink_to(keep);
        }
    }

    /// The inbox of the call owning `call_id`.
    pub fn get(&self, call_id: &str) -> Option<Inbox> {
        self.shard(call_id).get(call_id).cloned()
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

    #[tokio::test]
    async fn an_inbox_hands_inputs_over_in_order_and_says_when_its_call_has_ended() {
        let (inbox, mut rx) = inbox();
        // Sent before the driver waits: the wake-up is kept.
        inbox.send(SessionInput::Shutdown).unwrap();
        inbox
            .send(SessionInput::Stray(rsip::Response::default()))
            .unwrap();
        assert!(matches!(rx.recv().await, Some(SessionInput::Shutdown)));
        assert!(matches!(rx.recv().await, Some(SessionInput::Stray(_))));
        // Sent while the driver waits, from another task.
        let sender = inbox.clone();
        let later = tokio::spawn(async move { sender.send(SessionInput::Shutdown).is_ok() });
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the driver was never woken");
        assert!(matches!(got, Some(SessionInput::Shutdown)));
        assert!(later.await.unwrap());
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
        let (me, _rx) = inbox();
        let ids: Vec<String> = (0..20_000).map(|i| format!("call-{i}")).collect();
        for id in &ids {
            table.insert(id, me.clone());
        }
        let room = |t: &SessionTable| -> usize {
            t.shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).capacity())
                .sum()
        };
        assert!(room(&table) >= 20_000);
        for id in &ids {
            table.remove(id);
        }
        assert!(table.get("call-1").is_none());
        assert!(
            room(&table) <= TABLE_SHARDS * 128,
            "room left: {}",
            room(&table)
        );
    }
}
