//! The way into an instance actor for published events, with backpressure.
//!
//! Publishes reach the actor without waiting for delivery (contract §9), so a
//! producer faster than the fan-out would grow the actor's mailbox without
//! bound. The inbox counts the publishes handed to the actor and not yet
//! handled; past `limits.publish_queue` of them, the next publisher waits
//! until its own publish has been fanned out before it is answered. Slow
//! clients never cause that wait (they are evicted instead); only an instance
//! whose fan-out is busier than the machine can keep up with does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Addr;

use super::messages::{Publish, QueueTicket};
use super::InstanceActor;
use crate::events::Event;

/// One instance actor's address with its count of publishes in flight.
#[derive(Clone)]
pub struct Inbox {
    addr: Addr<InstanceActor>,
    waiting: Arc<AtomicUsize>,
    bound: usize,
}

impl Inbox {
    pub fn new(addr: Addr<InstanceActor>, waiting: Arc<AtomicUsize>, bound: usize) -> Self {
        Self {
            addr,
            waiting,
            bound,
        }
    }

    pub fn addr(&self) -> &Addr<InstanceActor> {
        &self.addr
    }

    /// Hands `events` to the actor, in order behind every earlier publish.
    /// Returns at once while fewer than the bound wait to be fanned out;
    /// otherwise once these events have been. `true` when it waited.
    pub async fn publish(&self, events: Arc<[Event]>) -> bool {
        let over = self.waiting.load(Ordering::Acquire) >= self.bound;
        let msg = Publish::new(events).queued(QueueTicket::take(&self.waiting));
        if over {
            // An error means the actor stopped (instance deleted): nothing to deliver to.
            let _ = self.addr.send(msg).await;
        } else {
            self.addr.do_send(msg);
        }
        over
    }
}
