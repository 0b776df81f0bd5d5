//! Deterministic simulation of Kafka lanes, partition logs and schedulers on
//! one thread, driven by a seeded schedule of deliveries, delays, lost
//! replies, leader changes, node crashes and consumer restarts.
//!
//! What runs is Ferry's own logic: records become invoke commands through
//! `ferry_ingress::record::invoke`, every replica applies the log with
//! `GroupState::apply`, attempts start from what `Invocation::attempt` and
//! `PartitionState::runnable` say on the node that leads, and only once that
//! node has applied an entry of its own term (as `ferry_log::node::leads`
//! requires). What is modelled: the network (a proposal commits, or is lost
//! with its leader, or commits while its proposer hears of a failure), Raft
//! (a committed log per group; an election picks a live node, whose
//! applied state may lag), Kafka (offsets, a committed offset per
//! partition, a consumer that restarts from it) and the handler (`Counter`
//! with one journaled step per invocation, like `Once/run`).
//!
//! After every step the invariants of ARCHITECTURE.md are checked: every
//! offset at or below Kafka's committed offset has exactly one invocation;
//! replicas that applied the same entries have the same digest; no
//! journaled step runs again once its result is committed; each key's
//! records are handled in offset order. At the end, with faults stopped,
//! every record is handled exactly once.
//!
//! `SIM_SEEDS=<n>` runs n seeds (default 300), `SIM_SEED=<s>` one; a
//! failure prints the command that replays it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;
use ferry_ingress::record::{self, Origin, Record, Sink};
use ferry_partition::partitioner::partition_of;
use ferry_partition::state::{Completion, GroupState, Status};
use ferry_partition::wire::v1::{
    AttemptId, Command, Effect, HandlerType, Invoke, JournalEntry, Outcome, Response, Retention, ServiceType, Source,
    StateOp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NODES: usize = 3;
const GROUPS: u32 = 2;
const KAFKA_PARTITIONS: usize = 2;
const KEYS: usize = 5;
const RECORDS: usize = 40;
const FAULT_STEPS: usize = 600;
const QUIET_STEPS_MAX: usize = 20_000;

type NodeId = usize;

/// A proposal waiting at a leader, and who hears of its outcome.
struct Proposal {
    command: Command,
    from: Proposer,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proposer {
    /// Kafka partition `kp`'s lane into the group, in its consumer generation.
    Lane { kp: usize, generation: u64 },
    /// The effect of attempt `key`.
    Attempt { key: u64 },
    /// The blank entry that opens a term.
    Blank,
}

/// One Raft group: its committed log, the reference state of that log, and
/// each node's replica.
struct Group {
    log: Vec<(u64, Command)>,
    /// The state after applying the whole log, and its digest after each entry.
    reference: GroupState,
    digests: Vec<u128>,
    leader: Option<(NodeId, u64)>,
    term: u64,
    /// The index (1-based) of the blank entry of the leader's term, once committed.
    term_start: Option<usize>,
    pending: VecDeque<Proposal>,
    replicas: Vec<Replica>,
}

struct Replica {
    state: GroupState,
    applied: usize,
}

impl Replica {
    fn new() -> Replica {
        Replica { state: GroupState::default(), applied: 0 }
    }
}

/// A running attempt: on which node, under which term, and what it will
/// propose. Like the scheduler's, it counts as running until its effect is
/// applied on the node that ran it (or that node stops leading).
struct Running {
    key: u64,
    id: String,
    node: NodeId,
    term: u64,
    group: u32,
    /// `None` once proposed.
    effect: Option<Effect>,
    /// The log length once its effect committed.
    committed_at: Option<usize>,
}

/// Per Kafka partition: the consumer's view and its lanes.
struct Consumer {
    /// The offset of the next record to read.
    position: usize,
    /// Kafka's committed offset: every offset below it is done.
    committed: usize,
    /// Bumped on every restart; replies of an older generation are dropped.
    generation: u64,
    pending: BTreeSet<usize>,
    highest_read: Option<usize>,
    lanes: BTreeMap<u32, Lane>,
}

#[derive(Default)]
struct Lane {
    queued: Vec<(usize, Invoke)>,
    in_flight: Option<Vec<(usize, Invoke)>>,
}

struct Sim {
    rng: StdRng,
    topic: Vec<Vec<(String, u64)>>,
    groups: Vec<Group>,
    alive: Vec<bool>,
    consumers: Vec<Consumer>,
    attempts: Vec<Running>,
    /// Executions of each invocation's step, and the token it committed.
    executions: HashMap<String, u64>,
    committed_steps: HashMap<String, String>,
    sink: Sink,
    origins: Vec<Origin>,
    steps: usize,
    next_attempt: u64,
    /// The Kafka record of each invocation id seen: it never changes, so
    /// each invocation is decoded once however often the checks run.
    records: RefCell<HashMap<String, Option<(i32, i64)>>>,
}

fn fail(seed: u64, what: &str) -> ! {
    panic!("seed {seed}: {what}\nreplay: SIM_SEED={seed} cargo nextest run -p ferry-chaos-tests --test simulation");
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        // Each key lives in one Kafka partition, its records in offset order.
        let mut topic = vec![Vec::new(); KAFKA_PARTITIONS];
        let mut seqs = [0u64; KEYS];
        for _ in 0..RECORDS {
            let key = rng.random_range(0..KEYS);
            seqs[key] += 1;
            topic[key % KAFKA_PARTITIONS].push((format!("k{key}"), seqs[key]));
        }
        let groups = (0..GROUPS)
            .map(|_| Group {
                log: Vec::new(),
                reference: GroupState::default(),
                digests: Vec::new(),
                leader: None,
                term: 0,
                term_start: None,
                pending: VecDeque::new(),
                replicas: (0..NODES).map(|_| Replica::new()).collect(),
            })
            .collect();
        let consumers = (0..KAFKA_PARTITIONS)
            .map(|_| Consumer {
                position: 0,
                committed: 0,
                generation: 0,
                pending: BTreeSet::new(),
                highest_read: None,
                lanes: BTreeMap::new(),
            })
            .collect();
        let sink = Sink {
            service: "Counter".to_owned(),
            handler: "add".to_owned(),
            service_ty: ServiceType::VirtualObject,
            handler_ty: HandlerType::Exclusive,
            unavailable: None,
            retention: Retention::FOREVER,
        };
        let origins = (0..KAFKA_PARTITIONS)
            .map(|kp| Origin {
                subscription: "sub_sim".to_owned(),
                topic: "t".to_owned(),
                partition: kp as i32,
                producer: ferry_partition::partitioner::kafka_producer_id("sub_sim", "sub_sim", "t", None, kp as i32),
                ordered: false,
                dead_letter: None,
            })
            .collect();
        Sim {
            rng,
            topic,
            groups,
            alive: vec![true; NODES],
            consumers,
            attempts: Vec::new(),
            executions: HashMap::new(),
            committed_steps: HashMap::new(),
            sink,
            origins,
            steps: 0,
            next_attempt: 0,
            records: RefCell::default(),
        }
    }

    /// A leader whose replica has applied the blank entry of its term: the
    /// node that may act on its applied state.
    fn acting_leader(&self, g: usize) -> Option<(NodeId, u64)> {
        let group = &self.groups[g];
        let (node, term) = group.leader?;
        let start = group.term_start?;
        (group.replicas[node].applied >= start).then_some((node, term))
    }

    fn elect(&mut self, g: usize) {
        let live: Vec<NodeId> = (0..NODES).filter(|&n| self.alive[n]).collect();
        if live.is_empty() {
            return;
        }
        let node = live[self.rng.random_range(0..live.len())];
        self.lose_leader(g);
        let group = &mut self.groups[g];
        group.term += 1;
        group.leader = Some((node, group.term));
        group.pending.push_back(Proposal { command: Command::Invoke(Arc::new(Vec::new())), from: Proposer::Blank });
    }

    /// The leader goes: a prefix of what it had pending still commits (it
    /// reached a quorum), the rest is lost; proposers hear of a failure
    /// either way, so a committed proposal may be sent again.
    fn lose_leader(&mut self, g: usize) {
        let Some((_, term)) = self.groups[g].leader.take() else { return };
        self.groups[g].term_start = None;
        let pending: Vec<Proposal> = self.groups[g].pending.drain(..).collect();
        let survive = self.rng.random_range(0..=pending.len());
        for (i, proposal) in pending.into_iter().enumerate() {
            if i < survive {
                let from = match proposal.from {
                    Proposer::Blank => None,
                    from => Some(from),
                };
                self.commit(g, term, proposal.command, from);
            }
            self.reply(proposal.from, g, None);
        }
    }

    /// Appends a committed entry: applied to the reference state, the step
    /// tokens it commits recorded.
    fn commit(&mut self, g: usize, term: u64, command: Command, from: Option<Proposer>) -> Response {
        let group = &mut self.groups[g];
        let effects: Vec<Effect> = match &command {
            Command::Effects { effects, .. } => effects.clone(),
            _ => Vec::new(),
        };
        let response = group.reference.apply(command.clone());
        group.log.push((term, command));
        group.digests.push(group.reference.digest());
        if from == Some(Proposer::Blank) && group.leader.is_some_and(|(_, t)| t == term) {
            group.term_start = Some(group.log.len());
        }
        let committed_at = group.log.len();
        if let Some(Proposer::Attempt { key }) = from {
            if let Some(attempt) = self.attempts.iter_mut().find(|a| a.key == key) {
                attempt.committed_at = Some(committed_at);
            }
        }
        if let Response::Effects(outcomes) = &response {
            for (effect, outcome) in effects.iter().zip(outcomes) {
                if let (Effect::Progress { id, entries, .. }, Outcome::Applied) = (effect, outcome) {
                    let token = String::from_utf8_lossy(&entries[0].body).into_owned();
                    self.committed_steps.insert(id.clone(), token);
                }
            }
        }
        response
    }

    fn reply(&mut self, from: Proposer, g: usize, response: Option<Response>) {
        if let (Proposer::Attempt { key }, None) = (from, &response) {
            // The scheduler hears its effect failed and frees the slot: the
            // invocation runs again, from what its journal holds.
            self.attempts.retain(|a| a.key != key);
        }
        let Proposer::Lane { kp, generation } = from else { return };
        let consumer = &mut self.consumers[kp];
        if consumer.generation != generation {
            return;
        }
        let lane = consumer.lanes.entry(g as u32).or_default();
        let Some(batch) = lane.in_flight.take() else { return };
        match response {
            Some(_) => {
                for (offset, _) in &batch {
                    consumer.pending.remove(offset);
                }
            }
            // Retried as it was: the same batch, in front of what queued since.
            None => {
                let queued = std::mem::take(&mut lane.queued);
                lane.queued = batch.into_iter().chain(queued).collect();
            }
        }
    }

    fn step(&mut self, faults: bool) {
        self.steps += 1;
        let choice = self.rng.random_range(0..100);
        match choice {
            0..=14 => self.poll(),
            15..=29 => self.send_lanes(),
            30..=44 => self.commit_next(),
            45..=59 => self.apply_some(),
            60..=72 => self.start_attempt(),
            73..=85 => self.finish_attempt(),
            86..=89 => self.commit_kafka(),
            90..=93 if faults => {
                let g = self.rng.random_range(0..GROUPS as usize);
                self.elect(g);
            }
            94..=95 if faults => self.crash_node(),
            96..=97 if faults => {
                let kp = self.rng.random_range(0..KAFKA_PARTITIONS);
                self.restart_consumer(kp);
            }
            98..=99 if faults => self.drop_pending(),
            _ => {
                // Without faults: a group without a leader elects one.
                if let Some(g) = (0..GROUPS as usize).find(|&g| self.groups[g].leader.is_none()) {
                    self.elect(g);
                }
                for n in 0..NODES {
                    self.alive[n] = true;
                }
            }
        }
    }

    /// A consumer reads a few records and queues their invokes in lanes.
    fn poll(&mut self) {
        let kp = self.rng.random_range(0..KAFKA_PARTITIONS);
        let count = self.rng.random_range(1..=4);
        for _ in 0..count {
            let consumer = &mut self.consumers[kp];
            let offset = consumer.position;
            let Some((key, seq)) = self.topic[kp].get(offset).cloned() else { return };
            consumer.position += 1;
            consumer.pending.insert(offset);
            consumer.highest_read = consumer.highest_read.max(Some(offset));
            let record = Record {
                offset: offset as i64,
                key: Some(Bytes::from(key.into_bytes())),
                payload: Bytes::from(seq.to_string()),
                headers: Vec::new(),
                timestamp_ms: None,
            };
            let (g, invoke) = record::invoke(&self.origins[kp], &self.sink, record, GROUPS, self.steps as u64);
            consumer.lanes.entry(g).or_default().queued.push((offset, invoke));
        }
    }

    /// Every idle lane with queued records sends them to its group's leader.
    fn send_lanes(&mut self) {
        for kp in 0..KAFKA_PARTITIONS {
            let generation = self.consumers[kp].generation;
            for g in 0..GROUPS {
                let lane = self.consumers[kp].lanes.entry(g).or_default();
                if lane.in_flight.is_some() || lane.queued.is_empty() {
                    continue;
                }
                let batch = std::mem::take(&mut lane.queued);
                let command = Command::Invoke(Arc::new(batch.iter().map(|(_, invoke)| invoke.clone()).collect()));
                lane.in_flight = Some(batch);
                let from = Proposer::Lane { kp, generation };
                if self.groups[g as usize].leader.is_some() {
                    self.groups[g as usize].pending.push_back(Proposal { command, from });
                } else {
                    self.reply(from, g as usize, None);
                }
            }
        }
    }

    /// A group's oldest pending proposal commits.
    fn commit_next(&mut self) {
        let g = self.rng.random_range(0..GROUPS as usize);
        let Some((_, term)) = self.groups[g].leader else { return };
        let Some(proposal) = self.groups[g].pending.pop_front() else { return };
        let response = self.commit(g, term, proposal.command, Some(proposal.from));
        // Now and then the reply to a forwarded append is lost on its way:
        // the lane retries. (An attempt's effect is proposed on the leader
        // itself, which answers once it has applied it.)
        let forwarded = matches!(proposal.from, Proposer::Lane { .. });
        let answer = if forwarded && self.rng.random_range(0..10) == 0 { None } else { Some(response) };
        self.reply(proposal.from, g, answer);
    }

    /// A live replica applies some of what is committed; its state must match
    /// the reference state at the same index.
    fn apply_some(&mut self) {
        let (g, node) = (self.rng.random_range(0..GROUPS as usize), self.rng.random_range(0..NODES));
        if !self.alive[node] {
            return;
        }
        let count = self.rng.random_range(1..=3);
        let group = &mut self.groups[g];
        let replica = &mut group.replicas[node];
        for _ in 0..count {
            let Some((_, command)) = group.log.get(replica.applied) else { break };
            replica.state.apply(command.clone());
            replica.applied += 1;
            let (digest, expected) = (replica.state.digest(), group.digests[replica.applied - 1]);
            assert_eq!(digest, expected, "replica {node} of group {g} differs at index {}", replica.applied);
        }
    }

    /// The acting leader of a group starts an attempt of a runnable
    /// invocation, from its own applied state. The handler runs the step at
    /// once when the journal lacks it, or goes on past it and completes.
    fn start_attempt(&mut self) {
        let g = self.rng.random_range(0..GROUPS as usize);
        let Some((node, term)) = self.acting_leader(g) else { return };
        // What a scheduler that lost leadership stopped, and attempts whose
        // effect its node has applied, run no more.
        let applied = self.groups[g].replicas[node].applied;
        self.attempts.retain(|a| {
            a.group != g as u32 || ((a.node, a.term) == (node, term) && a.committed_at.is_none_or(|at| at > applied))
        });
        let state = &self.groups[g].replicas[node].state;
        let running_ids: BTreeSet<&str> =
            self.attempts.iter().filter(|a| a.group == g as u32).map(|a| a.id.as_str()).collect();
        let mut next = None;
        state
            .partition()
            .runnable_ids(|id| {
                if running_ids.contains(id) {
                    return ControlFlow::Continue(());
                }
                next = Some(id.to_owned());
                ControlFlow::Break(())
            })
            .unwrap();
        let Some(inv) = next.and_then(|id| state.partition().invocation(&id).unwrap()) else { return };
        let attempt: AttemptId = inv.attempt().expect("runnable invocations are ready");
        let id = inv.id.clone();
        let effect = match inv.journal.first() {
            None => {
                if let Some(token) = self.committed_steps.get(&id) {
                    panic!("the step of {id} runs again, though its result {token} is committed");
                }
                let n = self.executions.entry(id.clone()).or_default();
                *n += 1;
                let token = format!("{id}/{n}");
                let entry = JournalEntry { ty: 0x0411, body: Bytes::from(token.into_bytes()) };
                Effect::Progress {
                    id,
                    attempt,
                    entries: vec![entry],
                    state: vec![],
                    sleeps: vec![],
                    run_now: true,
                    sends: vec![],
                    awaits_signal: false,
                    promises: vec![],
                    arrived: 0,
                }
            }
            Some(step) => {
                let token = String::from_utf8_lossy(&step.body).into_owned();
                assert_eq!(self.committed_steps.get(&id), Some(&token), "{id} went on past an uncommitted step");
                let key = inv.target.key.clone().expect("keyed");
                let seq: u64 = String::from_utf8_lossy(&inv.payload).parse().expect("seq payload");
                let values = state.partition().object_state("Counter", &key).unwrap();
                let read =
                    |name: &str| values.get(name.as_bytes()).map_or(0, |b| String::from_utf8_lossy(b).parse().unwrap());
                let (count, last): (u64, u64) = (read("count"), read("last"));
                assert!(seq > last, "{key}: record {seq} handled after {last}");
                let set = |name: &str, value: u64| StateOp::Set {
                    key: Bytes::copy_from_slice(name.as_bytes()),
                    value: Bytes::from(value.to_string()),
                };
                let state = vec![set("count", count + 1), set("last", seq)];
                let result = Completion::Success(Bytes::new());
                Effect::Complete { id, attempt, state, result, sends: vec![], promises: vec![] }
            }
        };
        self.next_attempt += 1;
        let key = self.next_attempt;
        let id = effect.id().to_owned();
        self.attempts.push(Running { key, id, node, term, group: g as u32, effect: Some(effect), committed_at: None });
    }

    /// An attempt ends: its effect goes to the leader it started under, if
    /// that node still leads in the same term; otherwise it is dropped.
    fn finish_attempt(&mut self) {
        let ready: Vec<usize> = (0..self.attempts.len()).filter(|&i| self.attempts[i].effect.is_some()).collect();
        if ready.is_empty() {
            return;
        }
        let i = ready[self.rng.random_range(0..ready.len())];
        let running = &mut self.attempts[i];
        let effect = running.effect.take().expect("not proposed yet");
        let group = &mut self.groups[running.group as usize];
        if group.leader == Some((running.node, running.term)) {
            let command = Command::Effects { at_ms: self.steps as u64, effects: vec![effect] };
            group.pending.push_back(Proposal { command, from: Proposer::Attempt { key: running.key } });
        } else {
            self.attempts.swap_remove(i);
        }
    }

    /// Kafka commits each consumer's progress: the offset below which every
    /// read record's append has committed.
    fn commit_kafka(&mut self) {
        for consumer in &mut self.consumers {
            let done = match consumer.pending.first() {
                Some(&lowest) => lowest,
                None => consumer.highest_read.map_or(0, |h| h + 1),
            };
            assert!(done >= consumer.committed, "the committed offset moved back");
            consumer.committed = done;
        }
    }

    /// A node crashes and comes back: it leads nothing, its attempts are
    /// gone, and its replicas restart from an earlier point (a snapshot)
    /// and apply the log again.
    fn crash_node(&mut self) {
        let node = self.rng.random_range(0..NODES);
        for g in 0..GROUPS as usize {
            if self.groups[g].leader.is_some_and(|(n, _)| n == node) {
                self.lose_leader(g);
            }
            let group = &mut self.groups[g];
            let keep = self.rng.random_range(0..=group.replicas[node].applied);
            let mut replica = Replica::new();
            for (_, command) in &group.log[..keep] {
                replica.state.apply(command.clone());
            }
            replica.applied = keep;
            group.replicas[node] = replica;
        }
        self.attempts.retain(|a| a.node != node);
        self.alive[node] = self.rng.random_range(0..2) == 0;
    }

    /// A consumer restarts from Kafka's committed offset, forgetting its lanes;
    /// appends it had in flight may still commit.
    fn restart_consumer(&mut self, kp: usize) {
        let consumer = &mut self.consumers[kp];
        consumer.generation += 1;
        consumer.position = consumer.committed;
        consumer.pending.clear();
        consumer.highest_read = consumer.committed.checked_sub(1);
        consumer.lanes.clear();
    }

    /// The newest pending proposal of a group is lost (its message dropped).
    fn drop_pending(&mut self) {
        let g = self.rng.random_range(0..GROUPS as usize);
        if let Some(proposal) = self.groups[g].pending.pop_back() {
            self.reply(proposal.from, g, None);
            if proposal.from == Proposer::Blank {
                // A leader whose first entry is lost cannot act; another election follows.
                self.lose_leader(g);
            }
        }
    }

    /// Exactly once per offset: every offset below a consumer's committed
    /// offset has exactly one invocation in the committed logs.
    fn check(&self) {
        let mut invoked: HashMap<(i32, i64), usize> = HashMap::new();
        let mut records = self.records.borrow_mut();
        for group in &self.groups {
            let p = group.reference.partition();
            p.invocation_ids(|id| {
                let record = records.entry(id.to_owned()).or_insert_with(|| {
                    match p.invocation(id).unwrap().expect("listed").source {
                        Source::Kafka(source) => Some((source.partition, source.offset)),
                        Source::Ingress | Source::Service { .. } => None,
                    }
                });
                if let Some(record) = record {
                    *invoked.entry(*record).or_default() += 1;
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        }
        if let Some((at, n)) = invoked.iter().find(|(_, &n)| n > 1) {
            panic!("offset {at:?} has {n} invocations");
        }
        for (kp, consumer) in self.consumers.iter().enumerate() {
            for offset in 0..consumer.committed {
                assert!(
                    invoked.contains_key(&(kp as i32, offset as i64)),
                    "committed offset {kp}/{offset} has no invocation"
                );
            }
        }
    }

    fn done(&self) -> bool {
        self.consumers.iter().zip(&self.topic).all(|(c, t)| c.committed == t.len())
            && self.groups.iter().all(|g| {
                let counts = g.reference.partition().status_counts().unwrap();
                counts[Status::Completed.index()] == counts.iter().sum::<u64>()
                    && g.replicas.iter().all(|r| r.applied == g.log.len())
            })
    }

    /// At the end: every record handled once, each key counted in full.
    fn check_final(&self) {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (key, _) in self.topic.iter().flatten() {
            *counts.entry(key.clone()).or_default() += 1;
        }
        for (key, expected) in counts {
            let g = partition_of(ferry_partition::partitioner::key_hash("Counter", &key), GROUPS) as usize;
            let values = self.groups[g].reference.partition().object_state("Counter", &key).unwrap();
            let count: u64 = String::from_utf8_lossy(&values[&b"count"[..]]).parse().unwrap();
            assert_eq!(count, expected, "{key}");
        }
    }
}

fn run(seed: u64) {
    let outcome = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        for _ in 0..FAULT_STEPS {
            sim.step(true);
            sim.check();
        }
        let mut quiet = 0;
        while !sim.done() {
            quiet += 1;
            assert!(quiet < QUIET_STEPS_MAX, "no progress without faults");
            sim.step(false);
            sim.check();
        }
        sim.check_final();
        sim.steps
    });
    if let Err(panic) = outcome {
        fail(seed, ferry_telemetry::panic_message(panic.as_ref()));
    }
}

#[test]
fn seeded_schedules_keep_every_invariant() {
    let seeds: Vec<u64> = match (std::env::var("SIM_SEED"), std::env::var("SIM_SEEDS")) {
        (Ok(seed), _) => vec![seed.parse().expect("SIM_SEED")],
        (_, Ok(n)) => (0..n.parse().expect("SIM_SEEDS")).collect(),
        _ => (0..300).collect(),
    };
    let started = std::time::Instant::now();
    for &seed in &seeds {
        run(seed);
    }
    println!("{} seeds in {:?}", seeds.len(), started.elapsed());
}
