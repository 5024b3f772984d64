//! `deploy/rabbitmq/definitions.json` is the topology the services declare (default settings,
//! prefix `herald`, vhost `/`) as a RabbitMQ definitions document. When the topology changes,
//! regenerate the file:
//!
//! ```sh
//! HERALD_WRITE_DEFINITIONS=1 cargo test -p herald-amqp --test definitions
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use herald_amqp::{AmqpSettings, Lane, Topology};
use herald_contract::channels;
use serde_json::Value;

fn file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rabbitmq/definitions.json")
}

fn topology() -> Topology {
    Topology::new(&AmqpSettings::default()).expect("the default settings are valid")
}

fn load() -> Value {
    let path = file();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The entries of one section of a definitions document, keyed by what identifies them.
fn keyed(document: &Value, section: &str) -> BTreeMap<String, Value> {
    document[section]
        .as_array()
        .unwrap_or_else(|| panic!("`{section}` is not an array"))
        .iter()
        .map(|entry| {
            let key = match section {
                "bindings" => format!(
                    "{} -[{}]-> {}",
                    entry["source"].as_str().unwrap_or("?"),
                    entry["routing_key"].as_str().unwrap_or("?"),
                    entry["destination"].as_str().unwrap_or("?")
                ),
                _ => entry["name"].as_str().unwrap_or("?").to_string(),
            };
            (key, entry.clone())
        })
        .collect()
}

/// What differs between the file and the declared topology, one line per entry.
fn differences(file: &Value, declared: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    for section in ["vhosts", "exchanges", "queues", "bindings"] {
        let (in_file, in_code) = (keyed(file, section), keyed(declared, section));
        for (key, entry) in &in_code {
            match in_file.get(key) {
                None => lines.push(format!(
                    "{section}: `{key}` is declared but not in the file"
                )),
                Some(found) if found != entry => lines.push(format!(
                    "{section}: `{key}` differs\n    file:     {found}\n    declared: {entry}"
                )),
                Some(_) => {}
            }
        }
        for key in in_file.keys().filter(|k| !in_code.contains_key(*k)) {
            lines.push(format!(
                "{section}: `{key}` is in the file but not declared"
            ));
        }
    }
    lines
}

#[test]
fn definitions_file_matches_the_declared_topology() {
    let declared = topology().definitions("/");
    if std::env::var_os("HERALD_WRITE_DEFINITIONS").is_some() {
        let text = serde_json::to_string_pretty(&declared).expect("serialise") + "\n";
        std::fs::write(file(), text).expect("write deploy/rabbitmq/definitions.json");
    }
    let in_file = load();
    let lines = differences(&in_file, &declared);
    assert!(
        lines.is_empty(),
        "deploy/rabbitmq/definitions.json is out of date (regenerate it with \
         `HERALD_WRITE_DEFINITIONS=1 cargo test -p herald-amqp --test definitions`):\n{}",
        lines.join("\n")
    );
    // Same entries in the same order: the file is exactly what would be generated.
    assert_eq!(in_file, declared);
}

/// The file read on its own terms, not through `definitions()`: what the architecture promises
/// about every queue holds in what operators load into RabbitMQ.
#[test]
fn definitions_file_says_what_the_architecture_promises() {
    let topology = topology();
    let document = load();
    let exchanges = keyed(&document, "exchanges");
    let queues = keyed(&document, "queues");
    let bindings: BTreeSet<(String, String, String)> = keyed(&document, "bindings")
        .values()
        .map(|b| {
            (
                b["source"].as_str().unwrap_or_default().to_string(),
                b["routing_key"].as_str().unwrap_or_default().to_string(),
                b["destination"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();

    for (name, kind) in [
        (topology.requests_exchange(), "topic"),
        (topology.deliveries_exchange(), "topic"),
        (topology.retry_exchange(), "direct"),
        (topology.dead_letter_exchange(), "topic"),
        (topology.events_exchange(), "topic"),
        (topology.status_exchange(), "topic"),
        (topology.control_exchange(), "fanout"),
    ] {
        let exchange = exchanges
            .get(&name)
            .unwrap_or_else(|| panic!("exchange {name} missing"));
        assert_eq!(exchange["type"], kind, "type of {name}");
        assert_eq!(exchange["durable"], true, "{name} is durable");
    }

    // Every queue is a durable quorum queue; every binding joins a known exchange and queue.
    for (name, queue) in &queues {
        assert_eq!(queue["durable"], true, "{name} is durable");
        assert_eq!(
            queue["arguments"]["x-queue-type"], "quorum",
            "{name} is a quorum queue"
        );
        assert!(
            queue["arguments"].get("x-expires").is_none(),
            "{name} must not expire in a deployment"
        );
    }
    for (source, _, destination) in &bindings {
        assert!(
            exchanges.contains_key(source),
            "binding from unknown {source}"
        );
        assert!(
            queues.contains_key(destination),
            "binding to unknown {destination}"
        );
    }

    // Work queues: the broker parks a crash-looping message in the DLX, at least once, and
    // refuses publishes when full rather than dropping the oldest.
    let settings = AmqpSettings::default();
    let mut work = vec![
        (
            topology.render_queue(),
            topology.requests_exchange(),
            "#".to_string(),
        ),
        (
            topology.projector_queue(),
            topology.events_exchange(),
            "#".to_string(),
        ),
    ];
    for channel in channels::ALL {
        for lane in Lane::ALL {
            work.push((
                topology.lane_queue(channel, lane),
                topology.deliveries_exchange(),
                topology.lane_routing_key(channel, lane),
            ));
        }
    }
    for (queue, exchange, key) in &work {
        let arguments = &queues
            .get(queue)
            .unwrap_or_else(|| panic!("work queue {queue} missing"))["arguments"];
        assert_eq!(
            arguments["x-delivery-limit"],
            u64::from(settings.delivery_limit),
            "{queue}"
        );
        assert_eq!(
            arguments["x-dead-letter-exchange"],
            topology.dead_letter_exchange().as_str(),
            "{queue}"
        );
        assert_eq!(
            arguments["x-dead-letter-strategy"], "at-least-once",
            "{queue}"
        );
        assert_eq!(arguments["x-overflow"], "reject-publish", "{queue}");
        assert!(
            bindings.contains(&(exchange.clone(), key.clone(), queue.clone())),
            "{queue} bound to {exchange} with `{key}`"
        );
    }

    // Retry tiers: one queue per tier holding messages for the tier's delay, then back to the
    // deliveries exchange (under their CC routing keys).
    assert!(!topology.retry_tiers().is_empty());
    for tier in topology.retry_tiers() {
        let name = topology.retry_queue(tier);
        let arguments = &queues
            .get(&name)
            .unwrap_or_else(|| panic!("retry queue {name} missing"))["arguments"];
        assert_eq!(
            arguments["x-message-ttl"],
            u64::try_from(tier.delay.as_millis()).expect("delay fits"),
            "{name}"
        );
        assert_eq!(
            arguments["x-dead-letter-exchange"],
            topology.deliveries_exchange().as_str(),
            "{name}"
        );
        assert_eq!(
            arguments["x-dead-letter-strategy"], "at-least-once",
            "{name}"
        );
        assert!(
            bindings.contains(&(topology.retry_exchange(), tier.name.clone(), name.clone())),
            "{name} bound to the retry exchange with `{}`",
            tier.name
        );
    }

    // The dead-letter queue takes everything parked, and the file has nothing describe() lacks.
    assert!(bindings.contains(&(
        topology.dead_letter_exchange(),
        "#".to_string(),
        topology.dead_queue()
    )));
    let described: BTreeSet<String> = topology.describe().into_iter().map(|(q, _)| q).collect();
    let listed: BTreeSet<String> = queues.keys().cloned().collect();
    assert_eq!(listed, described, "the file's queues are the declared ones");
}
