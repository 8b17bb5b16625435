//! The downlink (DESIGN §8, issue 16) through the real binary: commands published to JetStream
//! the way the platform does (`SAHOOL_COMMANDS`, `Nats-Msg-Id` = command id), a simulated
//! Modbus RTU bus on a pseudo-terminal that counts every write, and the results read back from
//! `SAHOOL_IOT` (`sahool.iot.actuator.result`), each checked against the contract. Every test
//! tries to break one guarantee: at most one write per command id, never stale, only what the
//! config allows, applied means confirmed, nothing left running, results once and in order.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{json, Value};
use support::commands::{
    check_results, final_of, final_status, id_of, parse_time, publish_command, read_results, show,
    statuses, Uplink, COMMANDS_STREAM, CONSUMER,
};
use support::pty::{wait_port_open, SerialLink};
use support::sim_modbus::{SimBus, Slave};
use support::{shipped_section, Cluster, Gateway, Nats, StreamMessage};
use time::OffsetDateTime;

/// Anything a test waits for arrives within this on a loaded machine.
const WITHIN: Duration = Duration::from_secs(60);
const FIELD: &str = "field-1";
const PORT: &str = "rs485-1";

/// The slaves: unit 7 holds pump-1 (coil 0), valve-3 (coil 1), pump-2 (coil 2), dosing-1
/// (holding register 10, ×0.1) and the tank-5 level (register 0: 50.0, above pump-1's limit);
/// unit 8 the tank-6 level (5.0, below pump-2's limit); unit 9 a welded relay (valve-9).
const UNIT: u8 = 7;
const PUMP: u16 = 0;
const VALVE: u16 = 1;
const PUMP2: u16 = 2;
const DOSING: u16 = 10;
const STUCK_UNIT: u8 = 9;

fn slaves() -> Vec<Slave> {
    vec![
        Slave::new(UNIT)
            .coil(PUMP, false)
            .coil(VALVE, false)
            .coil(PUMP2, false)
            .holding(0, &[500])
            .holding(DOSING, &[0]),
        Slave::new(8).holding(0, &[50]),
        Slave::new(STUCK_UNIT).coil(0, false).stuck(),
    ]
}

/// The port, its two tank sensors and the actuators, as issue 16 declares them.
fn farm(link: &SerialLink) -> String {
    format!(
        r#"
[[serial]]
name = "{PORT}"
path = "{path}"
protocol = "modbus-rtu"
baud = 19200
timeout = "200ms"
poll_interval = "1s"

[[fields]]
id = "{FIELD}"
  [[fields.sensors]]
  device_id = "tank-5"
  sensor_type = "water_level"
  modbus = {{ port = "{PORT}", unit = 7, register = 0, type = "u16", scale = 0.1 }}
  [[fields.sensors]]
  device_id = "tank-6"
  sensor_type = "water_level"
  modbus = {{ port = "{PORT}", unit = 8, register = 0, type = "u16", scale = 0.1 }}

  [[fields.actuators]]
  id = "valve-3"
  kind = "switch"
  modbus = {{ port = "{PORT}", unit = 7, coil = {VALVE} }}

  [[fields.actuators]]
  id = "pump-1"
  kind = "switch"
  requires_on = ["valve-3"]
  block_when = {{ sensor = "tank-5/water_level", below = 10.0 }}
  modbus = {{ port = "{PORT}", unit = 7, coil = {PUMP} }}

  [[fields.actuators]]
  id = "pump-2"
  kind = "switch"
  block_when = {{ sensor = "tank-6/water_level", below = 10.0 }}
  modbus = {{ port = "{PORT}", unit = 7, coil = {PUMP2} }}

  [[fields.actuators]]
  id = "dosing-1"
  kind = "setpoint"
  range = [0.0, 100.0]
  modbus = {{ port = "{PORT}", unit = 7, register = {DOSING}, type = "u16", scale = 0.1 }}

  [[fields.actuators]]
  id = "valve-9"
  kind = "switch"
  modbus = {{ port = "{PORT}", unit = {STUCK_UNIT}, coil = 0 }}
"#,
        path = link.path.display()
    )
}

/// Commands on, without the kernel's clock state in the way: test machines rarely run a time
/// service, and `clock_unsynced` has its own test with the shipped defaults.
const COMMANDS: &str = "[commands]\nenabled = true\nrequire_clock_sync = false\n";

/// The platform side: one nats-server, or a 3-node cluster.
enum Platform {
    Single(Nats),
    Cluster(Cluster),
}

impl Platform {
    async fn client(&self) -> async_nats::Client {
        match self {
            Self::Single(n) => n.client().await,
            Self::Cluster(c) => c.client().await,
        }
    }

    fn servers(&self) -> Vec<String> {
        match self {
            Self::Single(n) => vec![n.url()],
            Self::Cluster(c) => c.urls(),
        }
    }

    fn nats(&mut self) -> &mut Nats {
        match self {
            Self::Single(n) => n,
            Self::Cluster(_) => panic!("a single server's test"),
        }
    }
}

/// Everything a downlink test needs, running: NATS with both streams, the simulated bus, the
/// gateway with its consumer bound and its port open.
struct Rig {
    platform: Platform,
    /// The gateway's way to NATS when the test cuts it ([`Rig::start_via_uplink`]).
    uplink: Option<Uplink>,
    bus: SimBus,
    _link: SerialLink,
    gateway: Gateway,
    /// The config as the gateway was started with (without the harness's sections).
    config: String,
}

impl Rig {
    async fn start() -> Self {
        Self::start_on(single().await, COMMANDS, "").await
    }

    /// As [`start`](Self::start), the gateway reaching NATS through an [`Uplink`].
    async fn start_via_uplink() -> Self {
        let platform = single().await;
        let Platform::Single(nats) = &platform else {
            unreachable!()
        };
        let uplink = Uplink::to(nats.port).await;
        Self::start_with(platform, Some(uplink), "", COMMANDS, "").await
    }

    /// `commands`: the `[commands]` section; `sections`: more config before the port.
    async fn start_on(platform: Platform, commands: &str, sections: &str) -> Self {
        Self::start_with(platform, None, "", commands, sections).await
    }

    /// `nats_auth`: more of the `[nats]` section (the gateway's user).
    async fn start_with(
        platform: Platform,
        uplink: Option<Uplink>,
        nats_auth: &str,
        commands: &str,
        sections: &str,
    ) -> Self {
        let mut link = SerialLink::plugged("usb-FTDI_USB-RS485_Cable_DL0W1NK-if00-port0");
        let bus = SimBus::spawn(link.take_pty().into_async(), slaves());
        let servers = match &uplink {
            Some(u) => vec![u.url()],
            None => platform.servers(),
        };
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let config = format!(
            "[nats]\nservers = [{}]\n{nats_auth}\n\n{commands}\n{sections}\n{}",
            servers.join(", "),
            farm(&link)
        );
        let gateway = Gateway::start(&config);
        let rig = Self {
            platform,
            uplink,
            bus,
            _link: link,
            gateway,
            config,
        };
        wait_port_open(&rig.gateway, PORT);
        rig.wait_consumer().await;
        rig
    }

    /// Until the gateway's durable consumer exists (it delivers from the stream's first
    /// message, so this only makes timings start from a gateway that is listening).
    async fn wait_consumer(&self) {
        self.wait_consumer_info("the consumer", |_| true).await;
    }

    /// Polls the gateway's consumer until it exists and `done` holds of it.
    async fn wait_consumer_info(
        &self,
        what: &str,
        done: impl Fn(&jetstream::consumer::Info) -> bool,
    ) -> jetstream::consumer::Info {
        let js = jetstream::new(self.platform.client().await);
        let deadline = Instant::now() + WITHIN;
        let mut last = None;
        loop {
            if let Ok(stream) = js.get_stream(COMMANDS_STREAM).await {
                if let Ok(info) = stream.consumer_info(CONSUMER).await {
                    if done(&info) {
                        return info;
                    }
                    last = Some(info);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not so within {WITHIN:?} ({last:?}):\n{}",
                self.gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Publishes a command as the platform does, under `msg_id` (see [`publish_command`]).
    async fn publish_as(&self, command: &Value, msg_id: &str) {
        publish_command(self.platform.client().await, command, msg_id, WITHIN).await;
    }

    async fn publish(&self, command: &Value) {
        self.publish_as(command, id_of(command)).await;
    }

    /// The result events in the stream, in stream order.
    async fn results(&self) -> Vec<StreamMessage> {
        let deadline = Instant::now() + WITHIN;
        loop {
            let client = self.platform.client().await;
            // A cluster electing a new stream leader times a read out for a moment (the
            // reader panics in its own task then): read again.
            match tokio::spawn(read_results(client)).await {
                Ok(results) => return results,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reading SAHOOL_IOT: {e}; again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("cannot read SAHOOL_IOT: {e}"),
            }
        }
    }

    /// Polls the results until `done` holds; returns them, checked (see [`check_results`]).
    async fn wait_results(
        &self,
        what: &str,
        done: impl Fn(&[StreamMessage]) -> bool,
    ) -> Vec<StreamMessage> {
        let deadline = Instant::now() + WITHIN;
        loop {
            let results = self.results().await;
            if done(&results) {
                check_results(&results);
                return results;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; results so far:\n{}\n--- gateway log ---\n{}",
                show(&results),
                self.gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Publishes the command and waits until it is `applied`; any other end fails the test.
    async fn apply(&self, command: &Value) -> Vec<StreamMessage> {
        self.publish(command).await;
        let results = self.wait_final(std::slice::from_ref(command)).await;
        assert_eq!(
            final_status(&results, id_of(command)),
            "applied",
            "{}",
            show(&results)
        );
        results
    }

    /// Waits until every command has its final result.
    async fn wait_final(&self, commands: &[Value]) -> Vec<StreamMessage> {
        let ids: Vec<&str> = commands.iter().map(id_of).collect();
        self.wait_results(&format!("final results of {} commands", ids.len()), |r| {
            ids.iter().all(|id| final_of(r, id).is_some())
        })
        .await
    }

    /// After [`settle`], the results again (checked), which hold at least `earlier`.
    async fn settled(&self, earlier: Vec<StreamMessage>) -> Vec<StreamMessage> {
        settle().await;
        let results = self.results().await;
        check_results(&results);
        assert!(results.len() >= earlier.len(), "results disappeared");
        results
    }

    /// valve-3 `on` with `duration_s` 5, applied: the command and the results so far.
    async fn on_for_5s(&self) -> (Value, Vec<StreamMessage>) {
        let on = with(command("valve-3", "on"), "duration_s", json!(5));
        self.publish(&on).await;
        let results = self.wait_final(std::slice::from_ref(&on)).await;
        assert_eq!(final_status(&results, id_of(&on)), "applied");
        (on, results)
    }

    /// Waits for the `switched_off` that ends the `on`.
    async fn wait_switched_off(&self, on: &Value) -> Vec<StreamMessage> {
        self.wait_results("switched_off", |r| {
            statuses(r, id_of(on)).iter().any(|s| s == "switched_off")
        })
        .await
    }

    /// valve-3 was written once; else the panic shows its requests on the bus and the log.
    fn assert_valve_written_once(&self) {
        self.assert_valve_writes(1, "");
    }

    /// valve-3 was written `expected` times; else the panic shows its requests on the bus,
    /// `context` and the log.
    fn assert_valve_writes(&self, expected: u32, context: &str) {
        let requests: Vec<_> = self
            .bus
            .seen()
            .into_iter()
            .filter(|r| r.unit == UNIT && r.start == VALVE)
            .collect();
        assert_eq!(
            self.coil_writes(VALVE),
            expected,
            "requests on the bus: {requests:?}\n{context}\n--- gateway log ---\n{}",
            self.gateway.log()
        );
    }

    fn coil_writes(&self, coil: u16) -> u32 {
        self.bus.coil_writes(UNIT, coil)
    }
}

async fn single() -> Platform {
    let nats = Nats::with_platform_stream().await;
    nats.create_stream(COMMANDS_STREAM, &["sahool.commands.>"])
        .await;
    Platform::Single(nats)
}

/// A command as `contracts/actuator_command.v1.json` has it, issued now, expiring in a minute.
fn command(actuator: &str, action: &str) -> Value {
    let now = OffsetDateTime::now_utc();
    command_at(actuator, action, now, now + time::Duration::minutes(1))
}

/// A command for an actuator of [`FIELD`].
fn command_at(
    actuator: &str,
    action: &str,
    issued: OffsetDateTime,
    expires: OffsetDateTime,
) -> Value {
    support::commands::command_at(FIELD, actuator, action, issued, expires)
}

/// `n` commands for valve-3, `first` then the other action by turns, issued 1 ms apart from
/// now, each valid for 5 minutes.
fn alternating(n: i64, first: &str) -> Vec<Value> {
    let other = if first == "on" { "off" } else { "on" };
    let start = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let action = if i % 2 == 0 { first } else { other };
            let issued = start + time::Duration::milliseconds(i);
            command_at(
                "valve-3",
                action,
                issued,
                issued + time::Duration::minutes(5),
            )
        })
        .collect()
}

/// How many `accepted` results: each precedes a command's write.
fn accepted(results: &[StreamMessage]) -> usize {
    results
        .iter()
        .filter(|m| m.body["payload"]["status"] == "accepted")
        .count()
}

/// The command with `payload[key] = value` (`value`, `duration_s`).
fn with(mut command: Value, key: &str, value: Value) -> Value {
    command["payload"][key] = value;
    command
}

/// Long enough for a second write of something already applied to show on the bus.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_is_written_once() {
    let rig = Rig::start().await;
    let on = command("valve-3", "on");
    // The platform retries with a new message id: JetStream stores both, the gateway sees both.
    rig.publish(&on).await;
    rig.publish_as(&on, &format!("{}-retry", id_of(&on))).await;
    let js = jetstream::new(rig.platform.client().await);
    let mut stream = js.get_stream(COMMANDS_STREAM).await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 2);

    let results = rig.wait_final(std::slice::from_ref(&on)).await;
    let results = rig.settled(results).await;
    assert_eq!(statuses(&results, id_of(&on)), ["accepted", "applied"]);
    assert_eq!(rig.coil_writes(VALVE), 1);
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(true));
    // Both deliveries were acked: nothing left for the consumer to deliver again.
    let info = stream.consumer_info(CONSUMER).await.expect("consumer");
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
}

/// Approximates "SIGKILL after the inbox commit and before the ack": the gateway is killed a
/// few milliseconds after each command is stored, at delays that land before, around and
/// after its receipt, and started again; JetStream redelivers what was not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_around_receipt_writes_each_command_once() {
    let mut rig = Rig::start().await;
    let mut commands = Vec::new();
    for (i, delay_ms) in [0u64, 5, 20, 50, 120].into_iter().enumerate() {
        let action = if i % 2 == 0 { "on" } else { "off" };
        let c = command("valve-3", action);
        rig.publish(&c).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        rig.gateway.kill9();
        rig.gateway.resume();
        commands.push(c);
        // Each command is done before the next, so every one is a real change of state.
        rig.wait_final(&commands).await;
    }
    let results = rig.wait_final(&commands).await;
    let results = rig.settled(results).await;
    for c in &commands {
        assert_eq!(
            final_status(&results, id_of(c)),
            "applied",
            "{}",
            show(&results)
        );
    }
    rig.assert_valve_writes(commands.len() as u32, &show(&results));
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(true));
}

/// SIGKILL after the write and before the result: the test sees the write on the bus and kills
/// the gateway at once; after the restart the command is confirmed by reading, not written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_write_reports_applied_once_without_a_second_write() {
    let mut rig = Rig::start().await;
    let on = command("valve-3", "on");
    rig.publish(&on).await;
    let deadline = Instant::now() + WITHIN;
    while rig.coil_writes(VALVE) == 0 {
        assert!(
            Instant::now() < deadline,
            "no write:\n{}",
            rig.gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    rig.gateway.kill9();
    rig.gateway.resume();
    let results = rig.wait_final(std::slice::from_ref(&on)).await;
    let results = rig.settled(results).await;
    assert_eq!(statuses(&results, id_of(&on)), ["accepted", "applied"]);
    rig.assert_valve_written_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_alternating_commands_end_in_the_last_state_issued() {
    let rig = Rig::start().await;
    // off, on, off, ..., on: the last one issued switches on.
    let commands = alternating(100, "off");
    for c in &commands {
        rig.publish(c).await;
    }
    let results = rig.wait_final(&commands).await;
    let results = rig.settled(results).await;
    let last = final_of(&results, id_of(&commands[99])).expect("final of the last");
    assert_eq!(last["status"], "applied", "{}", show(&results));
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(true));
    // Every write is a command's, accepted first; none without one.
    let accepted = accepted(&results);
    assert_eq!(rig.coil_writes(VALVE) as usize, accepted);
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for c in &commands {
        *by_status
            .entry(final_status(&results, id_of(c)))
            .or_default() += 1;
    }
    assert!(
        by_status
            .keys()
            .all(|s| s == "applied" || s == "superseded"),
        "{by_status:?}"
    );
}

/// The gateway is down (so is its link to NATS) until after `expires_at`; the commands are
/// delivered then, and one that was already past its expiry when the platform sent it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_delivered_after_expires_at_are_never_written() {
    let mut rig = Rig::start().await;
    rig.gateway.terminate();
    let now = OffsetDateTime::now_utc();
    let soon = command_at("valve-3", "on", now, now + time::Duration::seconds(3));
    let past = command_at(
        "dosing-1",
        "set",
        now - time::Duration::seconds(60),
        now - time::Duration::seconds(1),
    );
    let past = with(past, "value", json!(20.0));
    rig.publish(&soon).await;
    rig.publish(&past).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.gateway.resume();
    let commands = [soon, past];
    let results = rig.wait_final(&commands).await;
    for c in &commands {
        assert_eq!(
            statuses(&results, id_of(c)),
            ["expired"],
            "{}",
            show(&results)
        );
    }
    settle().await;
    assert_eq!(rig.coil_writes(VALVE), 0);
    assert_eq!(rig.bus.register_writes(UNIT, DOSING), 0);
}

/// A command queued behind another for the same actuator, whose `expires_at` passes while it
/// waits, is never written: `expired`, not a late write. valve-11 sits on a unit that never
/// answers, so its first command holds the actuator, retrying the write, until its own expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_expires_while_queued_behind_another_is_never_written() {
    const FIELD_2: &str = "field-2";
    let absent = format!(
        "[[fields]]\nid = \"{FIELD_2}\"\n  [[fields.actuators]]\n  id = \"valve-11\"\n  kind = \"switch\"\n  \
         modbus = {{ port = \"{PORT}\", unit = 11, coil = 0 }}\n"
    );
    let rig = Rig::start_on(single().await, COMMANDS, &absent).await;
    let now = OffsetDateTime::now_utc();
    let holding = support::commands::command_at(
        FIELD_2,
        "valve-11",
        "on",
        now,
        now + time::Duration::seconds(8),
    );
    let queued = support::commands::command_at(
        FIELD_2,
        "valve-11",
        "off",
        now + time::Duration::milliseconds(1),
        now + time::Duration::seconds(3),
    );
    rig.publish(&holding).await;
    rig.publish(&queued).await;
    let results = rig.wait_final(&[holding.clone(), queued.clone()]).await;
    assert_eq!(
        final_status(&results, id_of(&holding)),
        "failed",
        "{}",
        show(&results)
    );
    let expired = final_of(&results, id_of(&queued)).expect("a final result");
    assert_eq!(expired["status"], "expired", "{}", show(&results));
    // It arrived well inside its life, so it expired waiting, not on arrival.
    assert!(
        parse_time(&expired["at"]) >= parse_time(&queued["payload"]["expires_at"]),
        "{}",
        show(&results)
    );
    // Coil writes to unit 11: 0xFF00 is `on`, 0x0000 `off`.
    let writes: Vec<u16> = rig
        .bus
        .seen()
        .into_iter()
        .filter(|r| r.unit == 11 && r.function == 0x05)
        .map(|r| r.count)
        .collect();
    assert!(
        writes.contains(&0xFF00) && !writes.contains(&0),
        "writes to valve-11 (the `on` retried, never the queued `off`): {writes:x?}\n{}",
        rig.gateway.log()
    );
}

/// The farm's uplink is down (the platform's NATS is up and takes the commands) past one
/// command's `expires_at` but not another's: on reconnect the first is `expired` without a
/// write, the second applied (the demo's step: queued at the platform, applied on reconnect
/// unless expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_down_past_expires_at_means_expired_and_the_rest_applied() {
    let rig = Rig::start_via_uplink().await;
    let uplink = rig.uplink.as_ref().expect("an uplink");
    uplink.cut();
    let now = OffsetDateTime::now_utc();
    let stale = command_at("valve-3", "on", now, now + time::Duration::seconds(3));
    let fresh = with(command("dosing-1", "set"), "value", json!(30.0));
    rig.publish(&stale).await;
    rig.publish(&fresh).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.coil_writes(VALVE), 0);
    uplink.restore();
    let results = rig.wait_final(&[stale.clone(), fresh.clone()]).await;
    assert_eq!(
        statuses(&results, id_of(&stale)),
        ["expired"],
        "{}",
        show(&results)
    );
    assert_eq!(
        final_status(&results, id_of(&fresh)),
        "applied",
        "{}",
        show(&results)
    );
    rig.settled(results).await;
    assert_eq!(rig.coil_writes(VALVE), 0);
    assert_eq!(rig.bus.register_writes(UNIT, DOSING), 1);
}

/// SIGKILL after the inbox commit and before the ack, for certain: the uplink holds what the
/// gateway sends, so the command is delivered, committed and acked, the ack waits in the link;
/// the gateway is killed and the ack lost with the connection. JetStream delivers the command
/// again to the restarted gateway, whose inbox knows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_the_inbox_commit_and_the_ack_writes_once() {
    let mut rig = Rig::start_via_uplink().await;
    // The consumer's pull request reaches the server before the hold.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let uplink = rig.uplink.take().expect("an uplink");
    uplink.hold();
    let on = command("valve-3", "on");
    rig.publish(&on).await;
    let buffer = rig.gateway.data_dir().join("buffer.db");
    let id = id_of(&on).to_string();
    let committed = tokio::task::spawn_blocking(move || {
        let db = rusqlite::Connection::open_with_flags(
            buffer,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the buffer read-only");
        db.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let deadline = Instant::now() + WITHIN;
        while Instant::now() < deadline {
            let found: Option<i64> = db
                .query_row("SELECT 1 FROM commands WHERE command_id = ?1", [&id], |r| {
                    r.get(0)
                })
                .ok();
            if found.is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    })
    .await
    .expect("inbox poll");
    assert!(committed, "no inbox row:\n{}", rig.gateway.log());
    // Long enough for the ack to be sent (into the held link).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let js = jetstream::new(rig.platform.client().await);
    let stream = js.get_stream(COMMANDS_STREAM).await.expect("stream");
    let info = stream.consumer_info(CONSUMER).await.expect("consumer");
    assert_eq!(info.num_ack_pending, 1, "the ack was held back: {info:?}");
    rig.gateway.kill9();
    uplink.cut();
    let info = stream.consumer_info(CONSUMER).await.expect("consumer");
    assert_eq!(
        info.num_ack_pending, 1,
        "the ack died with the gateway: {info:?}"
    );
    // Restarted straight to NATS: the unacked command comes again.
    let direct = rig
        .config
        .replace(&uplink.url(), &rig.platform.servers()[0]);
    rig.gateway.rewrite_config(&direct);
    rig.gateway.resume();
    let results = rig.wait_final(std::slice::from_ref(&on)).await;
    let results = rig.settled(results).await;
    assert_eq!(statuses(&results, id_of(&on)), ["accepted", "applied"]);
    // The command was resumed from the inbox; JetStream delivers it again once its ack_wait
    // (30 s) is over, and the gateway acks that without a second write.
    let info = rig
        .wait_consumer_info("every delivery acked", |i| i.num_ack_pending == 0)
        .await;
    assert!(
        info.delivered.consumer_sequence >= 2,
        "delivered again: {info:?}"
    );
    settle().await;
    rig.assert_valve_written_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_for_5s_whose_gateway_died_is_switched_off_at_start() {
    let mut rig = Rig::start().await;
    let (on, _) = rig.on_for_5s().await;
    rig.gateway.kill9();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        rig.bus.coil_state(UNIT, VALVE),
        Some(true),
        "nobody else switches it off"
    );
    let restarted = OffsetDateTime::now_utc();
    rig.gateway.resume();
    let results = rig.wait_switched_off(&on).await;
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(false));
    let at = final_at(&results, id_of(&on), "switched_off");
    assert!(
        at >= restarted && at - restarted < time::Duration::seconds(10),
        "switched off at {at}, restarted at {restarted}"
    );
    settle().await;
    assert_eq!(rig.coil_writes(VALVE), 2, "the on and the off");
    assert_eq!(
        statuses(&rig.results().await, id_of(&on)),
        ["accepted", "applied", "switched_off"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_for_5s_is_switched_off_on_time_while_nats_is_down() {
    let mut rig = Rig::start().await;
    let (on, results) = rig.on_for_5s().await;
    let deadline = final_at(&results, id_of(&on), "accepted") + time::Duration::seconds(5);
    rig.platform.nats().stop();
    let give_up = Instant::now() + WITHIN;
    while rig.bus.coil_state(UNIT, VALVE) == Some(true) {
        assert!(
            Instant::now() < give_up,
            "never switched off:\n{}",
            rig.gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let off_at = OffsetDateTime::now_utc();
    assert!(
        off_at >= deadline - time::Duration::milliseconds(500)
            && off_at <= deadline + time::Duration::seconds(2),
        "switched off at {off_at}, deadline {deadline}"
    );
    assert_eq!(rig.coil_writes(VALVE), 2);
    // NATS back: the result reaches the platform.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.platform.nats().resume();
    let results = rig.wait_switched_off(&on).await;
    assert_eq!(
        statuses(&results, id_of(&on)),
        ["accepted", "applied", "switched_off"]
    );
    let off = final_at(&results, id_of(&on), "switched_off");
    assert!(
        off >= deadline - time::Duration::milliseconds(500)
            && off <= deadline + time::Duration::seconds(2),
        "reported off at {off}, deadline {deadline}"
    );
}

/// When the command's result with `status` happened on the gateway.
fn final_at(results: &[StreamMessage], command_id: &str, status: &str) -> OffsetDateTime {
    let p = results
        .iter()
        .map(|m| &m.body["payload"])
        .find(|p| p["command_id"] == command_id && p["status"] == status)
        .unwrap_or_else(|| panic!("no {status} for {command_id}"));
    parse_time(&p["at"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interlocks_and_ranges_refuse_without_writing() {
    let rig = Rig::start().await;
    // tank-6 has been read (5.0, under pump-2's limit), so the refusal is the reading's.
    rig.gateway.wait_until("tank-6 read", WITHIN, |g| {
        g.metric(
            "sahool_gateway_modbus_requests_total",
            "unit=\"8\",outcome=\"ok\"",
        ) >= 1.0
    });
    let pump_without_valve = command("pump-1", "on");
    let pump_on_low_tank = command("pump-2", "on");
    let too_much = with(command("dosing-1", "set"), "value", json!(150.0));
    let below = with(command("dosing-1", "set"), "value", json!(-0.5));
    let refused = [pump_without_valve, pump_on_low_tank, too_much, below];
    for c in &refused {
        rig.publish(c).await;
    }
    let results = rig.wait_final(&refused).await;
    for (c, reason) in
        refused
            .iter()
            .zip(["interlock", "interlock", "out_of_range", "out_of_range"])
    {
        let p = final_of(&results, id_of(c)).expect("final");
        assert_eq!(p["status"], "rejected", "{p}");
        assert_eq!(p["reason"], reason, "{p}");
        assert_eq!(statuses(&results, id_of(c)).len(), 1, "no accepted: {p}");
    }
    // The same declarations let through what they allow: the refusals were the rules'.
    let valve = command("valve-3", "on");
    rig.publish(&valve).await;
    rig.wait_final(std::slice::from_ref(&valve)).await;
    let pump = command("pump-1", "on");
    let dose = with(command("dosing-1", "set"), "value", json!(42.5));
    rig.publish(&pump).await;
    rig.publish(&dose).await;
    let results = rig.wait_final(&[pump.clone(), dose.clone()]).await;
    assert_eq!(final_status(&results, id_of(&pump)), "applied");
    let dosed = final_of(&results, id_of(&dose)).expect("final");
    assert_eq!(dosed["status"], "applied", "{dosed}");
    assert!(
        (dosed["readback"].as_f64().expect("readback") - 42.5).abs() < 0.05,
        "{dosed}"
    );
    settle().await;
    assert_eq!(rig.coil_writes(PUMP), 1, "pump-1: only the allowed on");
    assert_eq!(rig.coil_writes(PUMP2), 0, "pump-2: never");
    assert_eq!(
        rig.bus.register_writes(UNIT, DOSING),
        1,
        "dosing-1: only 42.5"
    );
}

/// A pump running with the valve it requires: the platform closes the valve, and the gateway
/// stops the pump as soon as the valve's off is read back (`switched_off`, `interlock`, for
/// the pump's `on`), rather than leave it pumping against a closed valve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_valve_a_running_pump_requires_stops_the_pump() {
    let rig = Rig::start().await;
    let valve = command("valve-3", "on");
    rig.publish(&valve).await;
    rig.wait_final(std::slice::from_ref(&valve)).await;
    let pump = command("pump-1", "on");
    rig.apply(&pump).await;
    assert_eq!(rig.bus.coil_state(UNIT, PUMP), Some(true));

    let close = command("valve-3", "off");
    rig.publish(&close).await;
    let results = rig
        .wait_results("the pump switched off", |r| {
            statuses(r, id_of(&pump))
                .iter()
                .any(|s| s == "switched_off")
        })
        .await;
    assert_eq!(final_status(&results, id_of(&close)), "applied");
    let stopped = results
        .iter()
        .map(|m| &m.body["payload"])
        .find(|p| p["command_id"] == id_of(&pump) && p["status"] == "switched_off")
        .expect("switched_off");
    assert_eq!(stopped["reason"], "interlock", "{stopped}");
    assert_eq!(stopped["readback"], false, "{stopped}");
    assert_eq!(rig.bus.coil_state(UNIT, PUMP), Some(false));
    settle().await;
    assert_eq!(rig.coil_writes(PUMP), 2, "pump-1: on, then off once");
}

/// SIGHUP removes actuators: the command queued for one of them ends `rejected:
/// unknown_actuator` at once, a switch that was on is switched off first (no command behind
/// the `switched_off`), and a later command for it is refused; what stays keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_actuators_refuses_their_queue_and_switches_them_off() {
    const FIELD_2: &str = "field-2";
    let absent = format!(
        "[[fields]]\nid = \"{FIELD_2}\"\n  [[fields.actuators]]\n  id = \"valve-11\"\n  kind = \"switch\"\n  \
         modbus = {{ port = \"{PORT}\", unit = 11, coil = 0 }}\n"
    );
    let mut rig = Rig::start_on(single().await, COMMANDS, &absent).await;
    let valve = command("valve-3", "on");
    rig.publish(&valve).await;
    rig.wait_final(std::slice::from_ref(&valve)).await;
    // valve-11's unit never answers: its `on` retries, and the `off` behind it waits.
    let now = OffsetDateTime::now_utc();
    let minute = time::Duration::minutes(1);
    let holding = support::commands::command_at(FIELD_2, "valve-11", "on", now, now + minute);
    let queued = support::commands::command_at(
        FIELD_2,
        "valve-11",
        "off",
        now + time::Duration::milliseconds(1),
        now + minute,
    );
    rig.publish(&holding).await;
    rig.publish(&queued).await;
    rig.wait_results("valve-11's on under way", |r| {
        statuses(r, id_of(&holding)).iter().any(|s| s == "accepted")
    })
    .await;

    // Without valve-3, pump-1 (which requires it) and valve-11's field.
    let kept: Vec<&str> = farm_without(&rig.config, &["valve-3", "pump-1"]);
    let config = kept.concat().replace(&absent, "");
    rig.gateway.rewrite_config(&config);
    rig.gateway.signal("HUP");
    let results = rig
        .wait_results("the queued off refused, valve-3 switched off", |r| {
            final_of(r, id_of(&queued)).is_some()
                && r.iter().any(|m| {
                    m.body["payload"]["actuator_id"] == "valve-3"
                        && m.body["payload"]["status"] == "switched_off"
                })
        })
        .await;
    let refused = final_of(&results, id_of(&queued)).expect("final");
    assert_eq!(
        (refused["status"].as_str(), refused["reason"].as_str()),
        (Some("rejected"), Some("unknown_actuator")),
        "{refused}"
    );
    let off = results
        .iter()
        .map(|m| &m.body["payload"])
        .find(|p| p["actuator_id"] == "valve-3" && p["status"] == "switched_off")
        .expect("switched_off");
    assert_eq!(
        (off["command_id"].as_str(), &off["readback"]),
        (Some(""), &json!(false)),
        "{off}"
    );
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(false));

    let late = command("valve-3", "on");
    let dose = with(command("dosing-1", "set"), "value", json!(12.5));
    rig.publish(&late).await;
    rig.publish(&dose).await;
    let results = rig.wait_final(&[late.clone(), dose.clone()]).await;
    let p = final_of(&results, id_of(&late)).expect("final");
    assert_eq!(p["reason"], "unknown_actuator", "{p}");
    assert_eq!(final_status(&results, id_of(&dose)), "applied");
    assert_eq!(
        rig.coil_writes(VALVE),
        2,
        "valve-3: on, then off at the reload"
    );
}

/// The config's text without the `[[fields.actuators]]` entries of `ids`, in pieces.
fn farm_without<'a>(config: &'a str, ids: &[&str]) -> Vec<&'a str> {
    let mut pieces: Vec<&str> = Vec::new();
    let mut rest = config;
    while let Some(at) = rest[1..].find("  [[fields.actuators]]").map(|i| i + 1) {
        pieces.push(&rest[..at]);
        rest = &rest[at..];
    }
    pieces.push(rest);
    pieces
        .into_iter()
        .filter(|p| !ids.iter().any(|id| p.contains(&format!("id = \"{id}\""))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welded_relay_fails_with_the_value_read_back() {
    let rig = Rig::start().await;
    let on = command("valve-9", "on");
    rig.publish(&on).await;
    let results = rig.wait_final(std::slice::from_ref(&on)).await;
    let p = final_of(&results, id_of(&on)).expect("final");
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(p["reason"], "readback_mismatch", "{p}");
    assert_eq!(p["readback"], false, "{p}");
    assert_eq!(p["requested"], true, "{p}");
    settle().await;
    assert_eq!(rig.bus.coil_writes(STUCK_UNIT, 0), 1);
}

/// Whether the kernel says a time service has the clock in hand (`adjtimex`, as the gateway
/// asks it).
fn kernel_clock_synced() -> bool {
    // SAFETY: all zeroes is a valid `timex`; with `modes` 0 the call only fills it in.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    state != -1 && t.status & libc::STA_UNSYNC == 0
}

/// With the product's defaults (`[commands]` as shipped, only enabled; the shipped `[buffer]`
/// and `[quality]`): `require_clock_sync` is on, so what an `on` gets depends on this machine's
/// clock; an `off` is always applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_defaults_refuse_on_with_an_unsynchronised_clock_but_always_allow_off() {
    let sections = format!(
        "{}\n{}",
        shipped_section("buffer").replace("min_free_disk = \"64MiB\"", "min_free_disk = \"1MiB\""),
        shipped_section("quality")
    );
    let rig = Rig::start_on(single().await, "[commands]\nenabled = true\n", &sections).await;
    let on = command("valve-3", "on");
    rig.publish(&on).await;
    let results = rig.wait_final(std::slice::from_ref(&on)).await;
    let p = final_of(&results, id_of(&on)).expect("final");
    let synced = kernel_clock_synced();
    if synced {
        assert_eq!(p["status"], "applied", "{p}");
    } else {
        assert_eq!(p["status"], "rejected", "{p}");
        assert_eq!(p["reason"], "clock_unsynced", "{p}");
    }
    let off = command("valve-3", "off");
    rig.apply(&off).await;
    settle().await;
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(false));
    let writes = rig.coil_writes(VALVE);
    assert!(
        (1..=2).contains(&writes) && (synced || writes == 1),
        "{writes} writes (clock synced: {synced})"
    );
}

/// A 3-node cluster, both streams with 3 replicas; the commands stream's leader is killed while
/// commands are being delivered. Every command ends in one final result, none written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_its_leader_during_delivery_loses_and_doubles_nothing() {
    let cluster = Cluster::start(3);
    cluster
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"], 3)
        .await;
    cluster
        .create_stream(COMMANDS_STREAM, &["sahool.commands.>"], 3)
        .await;
    let mut rig = Rig::start_on(Platform::Cluster(cluster), COMMANDS, "").await;
    let commands = alternating(30, "on");
    let mut killed = None;
    for (i, c) in commands.iter().enumerate() {
        if i == 10 {
            let Platform::Cluster(cluster) = &mut rig.platform else {
                unreachable!()
            };
            let leader = cluster.stream_leader(COMMANDS_STREAM).await;
            cluster.kill(leader);
            killed = Some(leader);
        }
        rig.publish(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The node comes back (as after a reboot) and catches up.
    let Platform::Cluster(cluster) = &mut rig.platform else {
        unreachable!()
    };
    cluster.restart(killed.expect("a leader was killed"));
    let results = rig.wait_final(&commands).await;
    let results = rig.settled(results).await;
    let accepted = accepted(&results);
    assert_eq!(
        rig.coil_writes(VALVE) as usize,
        accepted,
        "{}",
        show(&results)
    );
    for c in &commands {
        let status = final_status(&results, id_of(c));
        assert!(status == "applied" || status == "superseded", "{status}");
    }
    // The last issued (an off) is what the valve holds.
    assert_eq!(final_status(&results, id_of(&commands[29])), "applied");
    assert_eq!(rig.bus.coil_state(UNIT, VALVE), Some(false));
}

/// A gateway user with exactly `config/nats-server.gateway-user.template`'s permissions, filled
/// in for this gateway, creates and reads its consumer and applies a command, while the same
/// user can look up neither another gateway's consumer nor the stream's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_user_with_the_shipped_commands_permissions_applies_commands_and_nothing_more() {
    let filter = format!(
        "sahool.commands.iot.actuator.{}.{}",
        support::commands::TENANT,
        support::commands::GATEWAY_ID
    );
    let nats = Nats::with_shipped_gateway_user(&[
        ("{consumer}", CONSUMER),
        ("{filter}", &filter),
        ("{bucket}", "sahool_gateway_config_unused"),
        ("{gateway_id}", support::commands::GATEWAY_ID),
    ]);
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    nats.create_stream(COMMANDS_STREAM, &["sahool.commands.>"])
        .await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let auth = support::gateway_user_auth(secrets.path());
    let gateway_user = nats.gateway_user_client().await;
    let rig = Rig::start_with(Platform::Single(nats), None, &auth, COMMANDS, "").await;

    let on = command("valve-3", "on");
    rig.apply(&on).await;
    rig.assert_valve_written_once();

    // Another gateway's consumer, which exists: only the permissions stand in the way.
    let platform_js = jetstream::new(rig.platform.client().await);
    platform_js
        .get_stream(COMMANDS_STREAM)
        .await
        .expect("the commands stream")
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("gw-other".into()),
            filter_subject: format!(
                "sahool.commands.iot.actuator.{}.other",
                support::commands::TENANT
            ),
            ..Default::default()
        })
        .await
        .expect("the platform creates gw-other");
    // The same user, as another gateway or a curious process would use it.
    let js = jetstream::new(gateway_user);
    let other = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            "gw-other",
            COMMANDS_STREAM,
        )
        .await;
    assert!(other.is_err(), "another gateway's consumer was visible");
    let stream = tokio::time::timeout(Duration::from_secs(5), js.get_stream(COMMANDS_STREAM)).await;
    assert!(
        !matches!(stream, Ok(Ok(_))),
        "the gateway's user read the commands stream's info"
    );
}
