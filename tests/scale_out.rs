//! Two instances of one service share a `$share/<group>/...` subscription on
//! mosquitto: the broker splits the messages between them, and no message is
//! handled twice while both are up.

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;
use support::{unique_id, Mosquitto};
use tower_mqtt::{config::Config, Envelope, Request, Router, Running};

const WAIT: Duration = Duration::from_secs(30);

type Seen = Arc<Mutex<HashMap<u64, Vec<&'static str>>>>;

fn instance(url: &str, name: &'static str, seen: &Seen) -> Running {
    let seen = seen.clone();
    let router = Router::new().route("$share/workers/jobs/+", move |req: Request<Envelope>| {
        let n = req.body().data()["n"].as_u64().unwrap();
        seen.lock().unwrap().entry(n).or_default().push(name);
        std::future::ready(())
    });
    let config = Config::new(url)
        .unwrap()
        .with_client_id(unique_id(name))
        .with_source_name("worker");
    tower_mqtt::serve(config, router).spawn().unwrap()
}

#[tokio::test]
async fn a_shared_subscription_splits_the_load_and_nothing_is_handled_twice() {
    let broker = Mosquitto::start().await;
    let url = broker.url();
    let seen = Seen::default();
    let a = instance(&url, "a", &seen);
    let b = instance(&url, "b", &seen);
    tokio::time::timeout(WAIT, a.ready())
        .await
        .unwrap()
        .expect("subscribed");
    tokio::time::timeout(WAIT, b.ready())
        .await
        .unwrap()
        .expect("subscribed");

    let total = 200u64;
    let publisher = a.publisher();
    for n in 0..total {
        let env = Envelope::new("job", json!({ "n": n })).unwrap();
        publisher
            .send(
                Request::builder(format!("jobs/{}", n % 3))
                    .body(env)
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while seen.lock().unwrap().len() < usize::try_from(total).unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every job handled");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = seen.lock().unwrap().clone();
    let twice: Vec<_> = seen.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    let by_a = seen.values().filter(|by| by[0] == "a").count();
    let by_b = seen.len() - by_a;
    eprintln!("FIGURES scale-out: jobs={total} by_a={by_a} by_b={by_b}");
    assert!(
        by_a > 0 && by_b > 0,
        "both instances took a share: a={by_a} b={by_b}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
