//! The Modbus RTU and SDI-12 engines over real pseudo-terminal pairs, with simulated devices on
//! the far end: values decoded per type and word order, faults classified and counted per slave
//! and reason without disturbing the good devices, late answers never taken for the next
//! request's, SDI-12 measurements with service requests, concurrent waits and CRCs, and a lost
//! port reported so the caller can reopen it. Actuator writes go through a running port task,
//! between its polls, each once, and are read back.

mod support;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sahool_gateway::common::metrics::{sample, Metrics};
use sahool_gateway::config;
use sahool_gateway::downlink::modbus::ModbusActuators;
use sahool_gateway::downlink::Value;
use sahool_gateway::ingest::mapping::Mapper;
use sahool_gateway::sources::serial::modbus::{
    self, BusError, BusRequests, CycleReport, Fault, Plan, Point, Poller, PortLost, RegisterKind,
    Timing, ValueType, WordOrder,
};
use sahool_gateway::sources::serial::sdi12::{Address, MeasureCommand, Sdi12Fault, Session};
use sahool_gateway::sources::serial::{PortPlan, SerialInput};
use sahool_gateway::store;
use support::pty::Pty;
use support::sim_modbus::{words32, Behaviour, SimBus, Slave};
use support::sim_sdi12::{self, Sensor, SimSdi12};
use tokio_serial::SerialStream;

/// A generous bound on anything a test waits for, so a stuck engine fails instead of hanging.
const BOUND: Duration = Duration::from_secs(60);

fn pty() -> (SerialStream, SerialStream) {
    SerialStream::pair().expect("a pseudo-terminal pair")
}

fn point(
    id: usize,
    unit: u8,
    kind: RegisterKind,
    register: u16,
    value_type: ValueType,
    word_order: WordOrder,
) -> Point {
    Point {
        id,
        unit,
        kind,
        register,
        value_type,
        word_order,
    }
}

/// A plain u16 holding register.
fn u16_at(id: usize, unit: u8, register: u16) -> Point {
    point(
        id,
        unit,
        RegisterKind::Holding,
        register,
        ValueType::U16,
        WordOrder::Big,
    )
}

fn timing(timeout_ms: u64, settle_ms: u64) -> Timing {
    Timing {
        timeout: Duration::from_millis(timeout_ms),
        settle: Duration::from_millis(settle_ms),
        ..Timing::new(Duration::from_millis(timeout_ms), 9600)
    }
}

/// One poll cycle, bounded so a stuck poller fails the test.
async fn cycle(poller: &mut Poller<SerialStream>, plan: &Plan) -> Result<CycleReport, PortLost> {
    tokio::time::timeout(BOUND, poller.poll(plan))
        .await
        .expect("a poll cycle ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_good_slaves_read_right_faulty_ones_counted_per_reason() {
    use RegisterKind::{Holding, Input};
    use ValueType::*;
    use WordOrder::{Big, Little};

    let (far, near) = pty();
    let probe = Slave::new(1)
        .holding(0, &[250, (-120i16) as u16])
        .holding(2, &words32(70_000, false))
        .holding(4, &words32(21.5f32.to_bits(), true))
        .input(10, &words32((-100_000i32) as u32, false));
    let weather = Slave::new(6)
        .holding(0, &words32(1013.25f32.to_bits(), false))
        .holding(2, &words32(0x7FC0_0000, false)) // NaN
        .holding(4, &words32(3_000_000_000, true));
    let sim = SimBus::spawn(
        far,
        vec![
            probe,
            Slave::new(2).holding(0, &[1]).behaving(Behaviour::Silent),
            Slave::new(3).holding(0, &[1]).behaving(Behaviour::BadCrc),
            Slave::new(4)
                .holding(0, &[1])
                .behaving(Behaviour::Exception(0x02)),
            weather,
        ],
    );

    let points = vec![
        point(0, 1, Holding, 0, U16, Big),
        point(1, 1, Holding, 1, I16, Big),
        point(2, 1, Holding, 2, U32, Big),
        point(3, 1, Holding, 4, F32, Little),
        point(4, 1, Input, 10, I32, Big),
        point(5, 2, Holding, 0, U16, Big),
        point(6, 3, Holding, 0, U16, Big),
        point(7, 4, Holding, 0, U16, Big),
        point(8, 6, Holding, 0, F32, Big),
        point(9, 6, Holding, 2, F32, Big),
        point(10, 6, Holding, 4, U32, Little),
    ];
    let plan = modbus::plan(&points).unwrap();
    let mut poller = Poller::new(near, timing(400, 100));
    let metrics = Metrics::new();

    for round in 0..2 {
        let report = cycle(&mut poller, &plan).await.expect("the port stays up");
        let mut values = report.values.clone();
        values.sort_by_key(|(id, _)| *id);
        assert_eq!(
            values,
            vec![
                (0, Ok(250.0)),
                (1, Ok(-120.0)),
                (2, Ok(70_000.0)),
                (3, Ok(21.5)),
                (4, Ok(-100_000.0)),
                (5, Err(Fault::Timeout)),
                (6, Err(Fault::Crc)),
                (7, Err(Fault::Exception(0x02))),
                (8, Ok(1013.25)),
                (9, Err(Fault::NotFinite)),
                (10, Ok(3_000_000_000.0)),
            ],
            "round {round}"
        );
        let counts = report.outcome_counts();
        let expected: Vec<((u8, &str), u32)> = vec![
            ((1, "ok"), 2),
            ((2, "timeout"), 1),
            ((3, "crc"), 1),
            ((4, "exception"), 1),
            ((6, "ok"), 1),
        ];
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected);
        for r in &report.requests {
            metrics.modbus_request("rs485-1", r.unit, r.outcome()).inc();
        }
    }

    // Nearby registers of one slave were read in one request per kind and cycle.
    let seen = sim.seen();
    let unit1: Vec<_> = seen.iter().filter(|s| s.unit == 1).collect();
    assert_eq!(unit1.len(), 4, "{unit1:?}");
    assert!(unit1
        .iter()
        .any(|s| s.function == 3 && s.start == 0 && s.count == 6));
    assert!(unit1
        .iter()
        .any(|s| s.function == 4 && s.start == 10 && s.count == 2));

    let text = metrics.encode();
    let count = |labels: &str| sample(&text, "sahool_gateway_modbus_requests_total", labels);
    assert_eq!(count(r#"unit="1",outcome="ok""#), 4.0);
    assert_eq!(count(r#"unit="2",outcome="timeout""#), 2.0);
    assert_eq!(count(r#"unit="3",outcome="crc""#), 2.0);
    assert_eq!(count(r#"unit="4",outcome="exception""#), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_late_answer_is_not_taken_for_the_next_request() {
    // Unit 7 answers reads of register 0 only after the timeout. Register 100 of the same
    // unit is a separate request of the same function and size, so a late answer read as
    // its reply would pass every header check and give it register 0's value.
    let (far, near) = pty();
    let late = Slave::new(7)
        .holding(0, &[111])
        .holding(100, &[222])
        .behaving(Behaviour::LateFor {
            register: 0,
            delay: Duration::from_millis(450),
        });
    let sim = SimBus::spawn(far, vec![late]);
    let points = [u16_at(0, 7, 0), u16_at(1, 7, 100)];
    let plan = modbus::plan(&points).unwrap();
    assert_eq!(plan.requests.len(), 2);
    let mut poller = Poller::new(near, timing(300, 1000));
    let report = cycle(&mut poller, &plan).await.unwrap();
    assert_eq!(
        report.values,
        vec![(0, Err(Fault::Timeout)), (1, Ok(222.0))]
    );
    assert_eq!(sim.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_stray_answer_from_another_unit_is_refused() {
    // With no settling time, unit 7's late answer arrives while unit 8 is being asked: it
    // must be refused as unexpected, not read as unit 8's registers.
    let (far, near) = pty();
    let sim = SimBus::spawn(
        far,
        vec![
            Slave::new(7)
                .holding(0, &[111])
                .behaving(Behaviour::LateFor {
                    register: 0,
                    delay: Duration::from_millis(3000),
                }),
            Slave::new(8).holding(0, &[888]),
        ],
    );
    let points = [u16_at(0, 7, 0), u16_at(1, 8, 0)];
    let plan = modbus::plan(&points).unwrap();
    let mut poller = Poller::new(near, timing(1500, 0));
    let report = cycle(&mut poller, &plan).await.unwrap();
    assert_eq!(
        report.values,
        vec![(0, Err(Fault::Timeout)), (1, Err(Fault::Unexpected))]
    );
    // Once the stray answer is gone, unit 8 reads normally.
    let unit8 = modbus::plan(&points[1..]).unwrap();
    let report = cycle(&mut poller, &unit8).await.unwrap();
    assert_eq!(report.values, vec![(1, Ok(888.0))]);
    drop(sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_closed_port_ends_the_cycle_with_port_lost() {
    let (far, near) = pty();
    let sim = SimBus::spawn(far, vec![Slave::new(1).holding(0, &[5])]);
    let points = [u16_at(0, 1, 0)];
    let plan = modbus::plan(&points).unwrap();
    let mut poller = Poller::new(near, timing(500, 100));
    let report = cycle(&mut poller, &plan).await.unwrap();
    assert_eq!(report.values, vec![(0, Ok(5.0))]);

    sim.close().await;
    let lost = cycle(&mut poller, &plan)
        .await
        .expect_err("the port is gone");
    assert!(lost.partial.values.is_empty());
}

fn address(c: char) -> Address {
    Address::new(c).unwrap()
}

async fn measure(
    session: &mut Session<SerialStream>,
    a: char,
    command: MeasureCommand,
) -> Result<Vec<f64>, Sdi12Fault> {
    tokio::time::timeout(BOUND, session.measure(address(a), command))
        .await
        .expect("a measurement ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_measurements_with_and_without_crc() {
    let (far, near) = pty();
    let values = [3.25, -4.5, 6.0, 21.25, 1_234_567.0];
    let sim = SimSdi12::spawn(
        far,
        vec![
            Sensor::new('0', &values).per_data(2),
            Sensor::new('1', &values).per_data(3),
            Sensor::new('c', &[0.5, -12.0]).timing(1, Duration::from_millis(800)),
        ],
        false,
    );
    let mut session = Session::new(near, Duration::from_millis(800));
    assert_eq!(
        measure(&mut session, '0', MeasureCommand::M).await.unwrap(),
        values
    );
    assert_eq!(
        measure(&mut session, '1', MeasureCommand::MC)
            .await
            .unwrap(),
        values
    );
    // Concurrent: no service request, the announced second is waited (a D0 before the
    // data is ready gets no values, which would end in fewer values).
    assert_eq!(
        measure(&mut session, 'c', MeasureCommand::CC)
            .await
            .unwrap(),
        vec![0.5, -12.0]
    );
    let heard: Vec<String> = sim.heard().into_iter().map(|h| h.command).collect();
    assert_eq!(
        heard,
        ["0M!", "0D0!", "0D1!", "0D2!", "1MC!", "1D0!", "1D1!", "cCC!", "cD0!"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_service_request_ends_the_announced_wait() {
    // The sensor announces 60 s but is done after 2 s and says so with a service request;
    // waiting the announced time would overrun the test's bound.
    let (far, near) = pty();
    let sim = SimSdi12::spawn(
        far,
        vec![Sensor::new('3', &[17.5, 0.25]).timing(60, Duration::from_secs(2))],
        false,
    );
    let mut session = Session::new(near, Duration::from_millis(800));
    let got = tokio::time::timeout(
        Duration::from_secs(40),
        session.measure(address('3'), MeasureCommand::M),
    )
    .await
    .expect("the service request ends the wait");
    assert_eq!(got.unwrap(), vec![17.5, 0.25]);
    let heard = sim.heard();
    let started = heard[0].at;
    let data = heard.iter().find(|h| h.command == "3D0!").unwrap();
    assert!(
        data.at >= started + Duration::from_secs(2),
        "D0 only once ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_faults_are_classified_and_good_sensors_unaffected() {
    let (far, near) = pty();
    let _sim = SimSdi12::spawn(
        far,
        vec![
            Sensor::new('0', &[1.5]),
            Sensor::new('s', &[1.0]).behaving(sim_sdi12::Behaviour::Silent),
            Sensor::new('b', &[1.0]).behaving(sim_sdi12::Behaviour::BadCrc),
            Sensor::new('w', &[1.0]).behaving(sim_sdi12::Behaviour::AnswersAs('x')),
            Sensor::new('g', &[1.0]).behaving(sim_sdi12::Behaviour::Garbage),
            Sensor::new('f', &[1.0, 2.0]).announcing(3),
        ],
        false,
    );
    let mut session = Session::new(near, Duration::from_millis(500));
    let metrics = Metrics::new();
    let mut outcomes = Vec::new();
    for (a, command) in [
        ('s', MeasureCommand::M),
        ('0', MeasureCommand::M),
        ('b', MeasureCommand::MC),
        ('w', MeasureCommand::M),
        ('g', MeasureCommand::M),
        ('f', MeasureCommand::M),
        ('0', MeasureCommand::MC),
    ] {
        let result = measure(&mut session, a, command).await;
        let outcome = result.as_ref().map_or_else(Sdi12Fault::reason, |_| "ok");
        metrics.sdi12_measurement("sdi-1", a, outcome).inc();
        outcomes.push((a, outcome));
        match (a, result) {
            ('0', values) => assert_eq!(values.unwrap(), vec![1.5]),
            ('f', Err(Sdi12Fault::FewerValues { expected, values })) => {
                assert_eq!((expected, values), (3, vec![1.0, 2.0]));
            }
            ('w', Err(Sdi12Fault::WrongAddress { expected, got })) => {
                assert_eq!((expected, got), (address('w'), address('x')));
            }
            _ => {}
        }
    }
    assert_eq!(
        outcomes,
        [
            ('s', "timeout"),
            ('0', "ok"),
            ('b', "crc"),
            ('w', "wrong_address"),
            ('g', "malformed"),
            ('f', "fewer_values"),
            ('0', "ok"),
        ]
    );
    let text = metrics.encode();
    assert_eq!(
        sample(
            &text,
            "sahool_gateway_sdi12_measurements_total",
            r#"address="0",outcome="ok""#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_through_an_echoing_adapter_and_address_query() {
    let (far, near) = pty();
    let _sim = SimSdi12::spawn(far, vec![Sensor::new('7', &[-0.75, 42.0])], true);
    let mut session = Session::new(near, Duration::from_millis(800));
    let found = tokio::time::timeout(BOUND, session.query_address())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, address('7'));
    assert_eq!(
        measure(&mut session, '7', MeasureCommand::MC)
            .await
            .unwrap(),
        vec![-0.75, 42.0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_closed_port_is_reported_as_lost() {
    let (far, near) = pty();
    let sim = SimSdi12::spawn(far, vec![Sensor::new('0', &[1.0])], false);
    let mut session = Session::new(near, Duration::from_millis(500));
    assert_eq!(
        measure(&mut session, '0', MeasureCommand::M).await.unwrap(),
        vec![1.0]
    );
    sim.close().await;
    let fault = measure(&mut session, '0', MeasureCommand::M)
        .await
        .expect_err("the port is gone");
    assert!(fault.is_port_lost(), "{fault}");
}

/// The port, its sensor and its actuators.
const WRITES_CONFIG: &str = include_str!("fixtures/modbus/actuators.toml");

/// A `modbus-rtu` port task on a pseudo-terminal, as the gateway runs it, with `WRITES_CONFIG`.
struct PortUnderTest {
    actuators: ModbusActuators,
    bus: BusRequests,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// The port task of `WRITES_CONFIG`, with `extra` tables appended, on a pseudo-terminal
/// whose far end is a bus of `slaves`.
fn start_port(slaves: Vec<Slave>, extra: &str) -> (PortUnderTest, SimBus) {
    let pty = Pty::open();
    let pty_path = pty.slave_path().to_path_buf();
    let sim = SimBus::spawn(pty.into_async(), slaves);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"gw-1\"\ntenant_id = \"t\"\ndata_dir = \"{}\"\n{}\n{extra}",
        dir.path().display(),
        WRITES_CONFIG.replace("/dev/ttyUSB0", &pty_path.display().to_string())
    );
    let config = config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
    let metrics = Arc::new(Metrics::new());
    let (store, _store_thread) = store::start(
        config.store_path(),
        config.buffer.clone(),
        config.quality.low_battery,
        metrics.clone(),
    )
    .unwrap();
    let bus = BusRequests::default();
    let input = SerialInput {
        plan: PortPlan::all(&config).remove(0),
        quality: config.quality.clone(),
        mapper: Arc::new(RwLock::new(Arc::new(Mapper::new(&config)))),
        store,
        metrics,
        bus: bus.clone(),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let port = PortUnderTest {
        actuators: ModbusActuators::new(&config, bus.clone()),
        bus,
        stop,
        task: tokio::spawn(input.run(stop_rx)),
        _dir: dir,
    };
    (port, sim)
}

impl PortUnderTest {
    /// Waits until the port task takes requests.
    async fn running(&self) {
        let started = Instant::now();
        while !self.bus.is_running("rs485-1") {
            assert!(
                started.elapsed() < BOUND,
                "the port task never took requests"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A write, then its read-back, as the downlink does it.
async fn write_and_read(a: &ModbusActuators, id: &str, value: Value) -> Result<Value, BusError> {
    a.write(id, value).await?;
    a.read(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_writes_share_the_bus_with_polling_and_are_read_back() {
    let (port, sim) = start_port(
        vec![
            Slave::new(1).holding(0, &[421]),
            Slave::new(7)
                .coil(0, false)
                .holding(10, &[0])
                .holding(20, &[0, 0]),
            Slave::new(9).coil(0, false).stuck(),
            Slave::new(10).coil(0, false).behaving(Behaviour::BadCrc),
        ],
        "",
    );
    port.running().await;

    // 50 writes, each read back, while the sensor is polled every 250 ms.
    let window = Instant::now();
    let a = &port.actuators;
    for i in 0..25u16 {
        let on = i % 2 == 0;
        let got = write_and_read(a, "pump-1", Value::Switch(on)).await;
        assert_eq!(got, Ok(Value::Switch(on)), "write {i}");
        let setpoint = f64::from(i) * 1.5;
        let Ok(Value::Number(read)) = write_and_read(a, "dosing-1", Value::Number(setpoint)).await
        else {
            panic!("setpoint write {i} read back");
        };
        assert!((read - setpoint).abs() <= 0.05, "{read} for {setpoint}");
        // Spread the writes over a few poll intervals.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let window_end = Instant::now();
    assert_eq!(
        sim.coil_writes(7, 0),
        25,
        "each coil write lands exactly once"
    );
    assert_eq!(sim.register_writes(7, 10), 25, "each register write once");
    assert_eq!(
        sim.coil_state(7, 0),
        Some(true),
        "the last write (on, 24th) holds"
    );

    // Polls kept their interval: as many as the window holds, and no poll held up by a queue
    // of writes (a write waits for the request in progress; a poll for at most one write).
    // A poll that ends after its next tick skips that tick (the schedule's rule), which a slow
    // buffer commit on a loaded machine can cause once; writes must not make it a habit.
    let polls: Vec<Instant> = sim
        .seen()
        .iter()
        .filter(|s| s.unit == 1 && s.function == 3 && (window..=window_end).contains(&s.at))
        .map(|s| s.at)
        .collect();
    let elapsed = window_end - window;
    let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        polls.len() as f64 >= elapsed.as_secs_f64() / 0.25 - 2.0,
        "{} polls in {elapsed:?}, gaps {gaps:?}",
        polls.len()
    );
    let skipped = gaps
        .iter()
        .filter(|g| **g >= Duration::from_millis(400))
        .count();
    assert!(
        skipped <= 1 && gaps.iter().all(|g| *g < Duration::from_millis(600)),
        "polls were held up: gaps {gaps:?}"
    );

    // A 32-bit float setpoint goes out as one multiple-register write.
    let got = write_and_read(a, "flow-1", Value::Number(12.5)).await;
    assert_eq!(got, Ok(Value::Number(12.5)));
    assert_eq!(sim.register_writes(7, 20), 1);

    // A stuck relay acknowledges the write; the read-back tells the truth.
    let got = write_and_read(a, "welded-1", Value::Switch(true)).await;
    assert_eq!(got, Ok(Value::Switch(false)));
    assert_eq!(sim.coil_writes(9, 0), 1);

    // A slave that is not there: a timeout that names the unit and port.
    let err = a.write("ghost-1", Value::Switch(true)).await.unwrap_err();
    assert!(matches!(err, BusError::Timeout { unit: 12, .. }), "{err}");
    assert!(err.to_string().contains("port `rs485-1`"), "{err}");

    // A refusal and a corrupt answer, each with what to check.
    let err = a
        .write("misaddressed-1", Value::Switch(true))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::Exception { code: 0x02, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("illegal data address"), "{err}");
    let err = a.write("noisy-1", Value::Switch(true)).await.unwrap_err();
    assert!(matches!(err, BusError::Crc { unit: 10, .. }), "{err}");

    // Polling still goes on after all of it.
    let before = sim.seen().iter().filter(|s| s.unit == 1).count();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(sim.seen().iter().filter(|s| s.unit == 1).count() >= before + 2);

    // A port that is not running: stopped here, so it left the registry.
    port.stop.send(true).unwrap();
    tokio::time::timeout(BOUND, port.task)
        .await
        .unwrap()
        .unwrap();
    let err = a.write("pump-1", Value::Switch(true)).await.unwrap_err();
    assert_eq!(
        err,
        BusError::NotRunning {
            port: "rs485-1".into()
        }
    );
    assert_eq!(sim.coil_writes(7, 0), 25, "nothing more was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_writes_go_through_while_the_buffer_holds_the_readings() {
    // No room in the buffer, ever: the port holds its first poll's values and retries, and
    // does not read the sensors meanwhile. A pump's `off` must not wait for room.
    let (port, sim) = start_port(
        vec![
            Slave::new(1).holding(0, &[42]), // 42 %: a plausible reading, so it waits for room
            Slave::new(7).coil(0, true),
        ],
        "[buffer]\nmin_free_disk = \"100000000GiB\"\n",
    );
    port.running().await;
    let polled = |sim: &SimBus| sim.seen().iter().filter(|s| s.unit == 1).count();
    let started = Instant::now();
    while polled(&sim) == 0 {
        assert!(started.elapsed() < BOUND, "the sensor was never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        polled(&sim),
        1,
        "the values wait for room; the sensor is not read again"
    );

    let asked = Instant::now();
    let got = write_and_read(&port.actuators, "pump-1", Value::Switch(false)).await;
    assert_eq!(got, Ok(Value::Switch(false)));
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(sim.coil_writes(7, 0), 1);
    port.stop.send(true).unwrap();
    tokio::time::timeout(BOUND, port.task)
        .await
        .unwrap()
        .unwrap();
}
