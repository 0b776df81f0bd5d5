//! Produces test records to a Kafka topic: `count` records with keys
//! `key-0 .. key-<keys-1>` in turn and JSON payloads `{"seq": n}`, creating the
//! topic first when `--partitions` is given.

use anyhow::Result;
use clap::Parser;
use ferry_chaos_tests::{produce, Record};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;

#[derive(Parser)]
#[command(about = "Produces keyed JSON test records to a Kafka topic")]
struct Args {
    /// Bootstrap broker, host:port.
    #[arg(long, env = "BROKER", default_value = "127.0.0.1:9092")]
    broker: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Distinct record keys.
    #[arg(long, default_value_t = 3)]
    keys: usize,
    /// Create the topic with this many partitions first.
    #[arg(long)]
    partitions: Option<i32>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.broker);
    if let Some(partitions) = args.partitions {
        let admin: AdminClient<DefaultClientContext> = config.create()?;
        let topic = NewTopic::new(&args.topic, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
            if let Err((topic, e)) = result {
                eprintln!("create topic {topic}: {e}");
            }
        }
    }
    let producer: FutureProducer = config.clone().set("batch.num.messages", "1").create()?;
    let records: Vec<Record> = (0..args.count)
        .map(|n| Record {
            key: Some(format!("key-{}", n % args.keys.max(1)).into_bytes()),
            payload: format!("{{\"seq\":{n}}}").into_bytes(),
            headers: vec![("source".to_owned(), "ferry-produce".to_owned())],
        })
        .collect();
    let delivered = produce(&producer, &args.topic, &records).await?;
    println!("produced {} records to {}", delivered.len(), args.topic);
    Ok(())
}
