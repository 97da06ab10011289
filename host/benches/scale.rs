//! `cargo xtask bench scale`: the load generator (issue 19), N simulated agents in this
//! process against one release `trellis controller` process, measured in one run and
//! printed against the targets (docs/SCALE.md, "The load generator" and "Measured").
//!
//!     cargo xtask bench scale
//!     TRELLIS_SCALE_AGENTS=50 TRELLIS_SCALE_SECONDS=10 cargo xtask bench scale
//!
//! Knobs (defaults: the targets): TRELLIS_SCALE_AGENTS (500), _RATE (50
//! submits/s), _SECONDS (60), _IDLE_SECONDS (30), _CONNECT_WITHIN (120 s), _WAIT_MS
//! (250: a simulated agent's receive wait), _KAFKA_AGENTS (100; 0 skips Kafka),
//! _KAFKA_COMMANDS (300), _ONLY (`tcp` or `kafka`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "load/mod.rs"]
mod load;

fn main() -> anyhow::Result<()> {
    let p = load::Params::from_env();
    let setup = load::setup_from_env(env!("CARGO_BIN_EXE_trellis"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "load generator: {} agents, {}/s for {} s, idle window {} s, receive wait {} ms (machine: {} cores)",
        p.agents,
        p.rate,
        p.seconds,
        p.idle_seconds,
        p.wait_ms,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // The machine is shared: what else ran meanwhile shows in the CPU lines, and here.
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if p.runs("tcp") {
        let r = rt.block_on(load::run_tcp(&p, &setup))?;
        load::print_tcp(&p, &r);
    }
    if p.runs("kafka") {
        if p.kafka_agents == 0 {
            println!("\n== scale over kafka-transport: not run (TRELLIS_SCALE_KAFKA_AGENTS=0) ==");
        } else if !common::kafka_available() {
            println!(
                "\n== scale over kafka-transport: not run (no Apache Kafka jars in {}; ./scripts/setup.sh fetches them) ==",
                common::kafka_libs_dir().display()
            );
        } else {
            let broker = common::Kafka::start();
            let r = rt.block_on(load::run_kafka(&p, &setup, &broker.brokers()))?;
            load::print_kafka(&r);
        }
    }
    Ok(())
}
