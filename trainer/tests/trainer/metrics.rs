//! `/metrics` serves the trainer's gauges with the job label, in Prometheus text format.

use kubetune_trainer::metrics::{serve, Metrics};
use std::io::{Read, Write};
use std::sync::Arc;

#[test]
fn metrics_endpoint_serves_labelled_gauges() {
    let metrics = Arc::new(Metrics::new("ns/job-a").expect("metrics"));
    metrics.train_loss.set(1.5);
    metrics.step.set(30.0);
    metrics.total_steps.set(120.0);
    let addr = serve(metrics.clone(), "127.0.0.1:0".parse().expect("addr")).expect("serve");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for line in [
        "kubetune_train_loss{job=\"ns/job-a\"} 1.5",
        "kubetune_train_step{job=\"ns/job-a\"} 30",
        "kubetune_train_total_steps{job=\"ns/job-a\"} 120",
        "# TYPE kubetune_learning_rate gauge",
        "# TYPE kubetune_grad_norm gauge",
        "# TYPE kubetune_train_tokens_per_second gauge",
        "# TYPE kubetune_train_epoch gauge",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
}

#[test]
fn loss_series_are_absent_until_the_first_value_and_then_carry_it() {
    let metrics = Metrics::new("ns/job-b").expect("metrics");
    metrics.step.set(0.0);
    let before = metrics.render();
    assert!(
        !before.contains("kubetune_train_loss") && !before.contains("kubetune_eval_loss"),
        "a loss series before the first step (the not-finite alert would fire on it):\n{before}"
    );
    assert!(before.contains("kubetune_train_step{job=\"ns/job-b\"} 0"), "{before}");

    metrics.train_loss.set(2.25);
    let after = metrics.render();
    assert!(after.contains("kubetune_train_loss{job=\"ns/job-b\"} 2.25"), "{after}");
    assert!(!after.contains("kubetune_eval_loss"), "no evaluation yet:\n{after}");

    metrics.eval_loss.set(2.5);
    assert!(metrics.render().contains("kubetune_eval_loss{job=\"ns/job-b\"} 2.5"));
}
