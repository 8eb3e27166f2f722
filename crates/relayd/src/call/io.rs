//! What goes into a call and what comes out of it (the sans-IO boundary, in the shape of
//! quinn-proto's `Endpoint`/`Connection`): [`Input`]s the driver hands in with the current
//! time, [`Output`]s it drains and carries out. Transactions, sockets, DNS and the billing
//! writer stay on the driver's side; the call names them by [`TxId`], [`LegId`] and
//! [`Token`].

use std::collections::VecDeque;
use std::time::SystemTime;

use bytes::Bytes;

use billing::record::EndCause;
use rsip::{Request, Response};
use sip_core::dialog::DialogId;
use sip_core::Peer;

use crate::billing_control::SessionStart;
use crate::directory::ServerRef;

/// A server transaction the driver holds for the call: the terminal's INVITE, or a request
/// that came in one of the call's dialogs (RFC 3261 §17.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxId(pub u64);

/// One INVITE leg of the relay's own towards an application server: an inquiry, or the
/// new leg of a change or a transfer (RFC 3261 §17.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegId(pub u64);

/// Something the call waits for: the final answer to a request it sent, or the commit of a
/// billing command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

/// What the call waits for, by [`Token`]: a handful at a time, so a list (the smallest
/// room a hash table takes is more than the few entries it ever holds here, for every call).
#[derive(Debug)]
pub(crate) struct Awaited<V>(Vec<(Token, V)>);

impl<V> Default for Awaited<V> {
    fn default() -> Self {
        Awaited(Vec::new())
    }
}

impl<V> Awaited<V> {
    /// Waits for `token`, to do `then` when it comes.
    pub(crate) fn insert(&mut self, token: Token, then: V) {
        self.0.push((token, then));
    }

    /// What was to be done when `token` came, if it was awaited.
    pub(crate) fn remove(&mut self, token: &Token) -> Option<V> {
        let at = self.0.iter().position(|(t, _)| t == token)?;
        let (_, then) = self.0.swap_remove(at);
        if self.0.is_empty() {
            // A call waits now and then: between waits, it keeps no room.
            self.0 = Vec::new();
        }
        Some(then)
    }

    /// Whether nothing is awaited.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One of the two legs of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The terminal's leg (the relay is UAS).
    Terminal,
    /// The application server's leg (the relay is UAC).
    Server,
}

impl Side {
    /// The other leg.
    pub fn other(self) -> Side {
        match self {
            Side::Terminal => Side::Server,
            Side::Server => Side::Terminal,
        }
    }
}

/// A request that opened a server transaction, as the call sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The transaction to answer it on.
    pub tx: TxId,
    /// The request.
    pub req: Request,
    /// Where it came from (responses go back there).
    pub from: Peer,
}

/// What an inquiry leg's INVITE client transaction got.
#[derive(Debug, Clone)]
pub enum LegEvent {
    /// A 100 (Trying): the server heard; it now has the answer timeout to answer.
    Trying,
    /// A 101–199.
    Provisional(Response),
    /// A 2xx (again for each retransmission the server sends).
    Answered(Response),
    /// A final failure, or no answer in time (408, with no response).
    Failed {
        /// The status code (408 for silence, 503 when it could not be sent).
        code: u16,
        /// The response, when there was one.
        resp: Option<Response>,
    },
}

/// What the driver hands to a call.
#[derive(Debug)]
pub enum Input {
    /// A request in one of the call's dialogs, with the dialog id the driver read from it
    /// (RFC 3261 §12.2.2: Call-ID, To tag, From tag).
    Request {
        /// The request and its transaction.
        incoming: Incoming,
        /// Its dialog id; `None` without a To tag.
        dialog: Option<DialogId>,
    },
    /// A CANCEL of the terminal's INVITE (RFC 3261 §9.2), on its own transaction.
    Cancel {
        /// The CANCEL's transaction.
        tx: TxId,
        /// The CANCEL.
        req: Request,
    },
    /// An ACK for a 2xx (RFC 3261 §13.2.2.4), which no transaction takes.
    Ack {
        /// The ACK.
        req: Request,
        /// Its dialog id.
        dialog: Option<DialogId>,
    },
    /// A response no transaction took: a server re-sending its 2xx because our ACK was lost.
    Stray {
        /// The response.
        resp: Response,
        /// Its dialog id, seen as the UAC of the request it answers.
        dialog: Option<DialogId>,
    },
    /// What a leg's INVITE got.
    Leg {
        /// Which leg.
        leg: LegId,
        /// What it got.
        event: LegEvent,
    },
    /// Where a leg's server is (RFC 3263), or `None` when it cannot be reached.
    Resolved {
        /// Which leg.
        leg: LegId,
        /// The server's address.
        peer: Option<Peer>,
    },
    /// The final answer to a request sent with an answer token (a timeout comes as 408).
    Answered {
        /// The token the request was sent with.
        token: Token,
        /// The final response.
        resp: Response,
    },
    /// A billing command is committed, or failed.
    Billed {
        /// The command's token.
        token: Token,
        /// What became of it.
        result: Result<(), String>,
    },
    /// The relay is shutting down: end everything now.
    Shutdown,
    /// An operator ends one session (the admin API): BYE on both legs, billed with cause
    /// `admin`. Another session of the same call goes on.
    End {
        /// The session's id.
        session_id: String,
    },
}

/// What a call asks the driver to do.
#[derive(Debug)]
pub enum Output {
    /// Answer a server transaction.
    Respond {
        /// The transaction.
        tx: TxId,
        /// The response.
        resp: Response,
    },
    /// Find where `server` is (RFC 3263); the answer comes back as [`Input::Resolved`].
    Resolve {
        /// The leg it is for.
        leg: LegId,
        /// The server.
        server: ServerRef,
    },
    /// Start a leg's INVITE client transaction; its events come back as [`Input::Leg`].
    Invite {
        /// The leg.
        leg: LegId,
        /// The INVITE.
        req: Request,
        /// Where to.
        peer: Peer,
    },
    /// Send a request on a client transaction; with a token, its final answer comes back
    /// as [`Input::Answered`], without one it is not waited for.
    Request {
        /// The request.
        req: Request,
        /// Where to.
        peer: Peer,
        /// The token of the answer, when the call waits for it.
        answer: Option<Token>,
    },
    /// Send a message outside any transaction, as it goes on the wire: an ACK for a 2xx
    /// (RFC 3261 §13.2.2.4; a server leg keeps its ACK that way, to send it again), or a
    /// fork's further 2xx to the terminal, which the call resends itself (§13.3.1.4).
    Stateless {
        /// The message, serialised.
        msg: Bytes,
        /// Where to.
        peer: Peer,
    },
    /// Route a new Call-ID (a leg's) to this call.
    Route {
        /// The Call-ID.
        call_id: String,
    },
    /// Commit a billing command; the result comes back as [`Input::Billed`].
    Bill {
        /// The command's token.
        token: Token,
        /// The command.
        cmd: BillingCmd,
    },
    /// A charge request on a session's server leg (claim 4), for the charging code: the
    /// leg, matched by its full dialog id and the server's address, vouches for the server.
    Charge {
        /// The MESSAGE and its transaction.
        incoming: Incoming,
        /// The session it was sent in.
        session_id: String,
    },
}

/// A write to the billing store that the call waits for before it goes on.
#[derive(Debug, Clone)]
pub enum BillingCmd {
    /// Journal a session: the 2xx handing it to the terminal goes out once committed.
    Open(SessionStart),
    /// Close a session's record.
    Close {
        /// The session.
        session_id: String,
        /// Why it ended.
        cause: EndCause,
        /// When (wall clock, from the monotonic start).
        ended_at: SystemTime,
    },
    /// Close one billing segment and open the next (a change or a transfer), in order.
    Segment {
        /// The segment closed.
        closing: String,
        /// Why.
        cause: EndCause,
        /// When the one ends and the other starts.
        at: SystemTime,
        /// The segment opened.
        open: SessionStart,
    },
}

impl BillingCmd {
    /// Whether the command journals a session (or a segment) rather than only closing one.
    pub fn opens(&self) -> bool {
        matches!(self, BillingCmd::Open(_) | BillingCmd::Segment { .. })
    }
}

/// The call's queue of outputs and its counter of ids (legs and tokens).
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Output>,
    next_id: u64,
}

impl Outbox {
    /// Queues an output.
    pub(crate) fn push(&mut self, out: Output) {
        self.queue.push_back(out);
    }

    /// Queues a response on transaction `tx`.
    pub(crate) fn respond(&mut self, tx: TxId, resp: Response) {
        self.queue.push_back(Output::Respond { tx, resp });
    }

    /// Queues an ACK built for this send.
    pub(crate) fn ack(&mut self, req: Request, peer: Peer) {
        self.queue.push_back(Output::Stateless {
            msg: sip_core::message::to_bytes(req),
            peer,
        });
    }

    /// Queues a request not waited for.
    pub(crate) fn send(&mut self, req: Request, peer: Peer) {
        self.queue.push_back(Output::Request {
            req,
            peer,
            answer: None,
        });
    }

    /// Queues a request whose final answer comes back with the returned token.
    pub(crate) fn send_waiting(&mut self, req: Request, peer: Peer) -> Token {
        let token = self.token();
        self.queue.push_back(Output::Request {
            req,
            peer,
            answer: Some(token),
        });
        token
    }

    /// A new token.
    pub(crate) fn token(&mut self) -> Token {
        self.next_id += 1;
        Token(self.next_id)
    }

    /// A new leg id.
    pub(crate) fn leg(&mut self) -> LegId {
        self.next_id += 1;
        LegId(self.next_id)
    }

    /// The next output.
    pub(crate) fn pop(&mut self) -> Option<Output> {
        self.queue.pop_front()
    }

    /// Gives back the queue's room once it is drained (a call keeps its outbox for life).
    pub(crate) fn shrink(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }
}
