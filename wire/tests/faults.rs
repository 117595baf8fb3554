//! The one HTTP client against a misbehaving peer (via `testkit::FaultProxy`): every fault
//! becomes a clear error in bounded time and memory, never a hang or a crash.

use axum::routing::post;
use axum::Router;
use std::time::{Duration, Instant};
use testkit::{Fault, FaultProxy};
use wire::client::{ClientSecurity, RpcClient};
use wire::http::{serve, Security};

async fn server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/rpc/Test.Echo",
        post(|body: String| async move {
            axum::Json(serde_json::json!({ "len": body.len(), "pad": "x".repeat(4096) }))
        }),
    );
    tokio::spawn(serve(
        listener,
        app,
        Security::Insecure,
        std::future::pending(),
    ));
    addr
}

async fn echo(
    addr: std::net::SocketAddr,
    limit: usize,
) -> Result<serde_json::Value, wire::client::ClientError> {
    let c = RpcClient::new(
        &addr.to_string(),
        0,
        &ClientSecurity::Insecure,
        "test",
        Some(Duration::from_secs(3)),
    )
    .unwrap()
    .with_reply_limit(limit);
    c.call("Test.Echo", &serde_json::json!({"a": 1})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_is_a_clear_error_in_bounded_time() {
    let target = server().await;
    let proxy = FaultProxy::start(target, Fault::Pass).await;
    assert_eq!(echo(proxy.addr, 1 << 20).await.unwrap()["len"], 7);

    let cases = [
        (Fault::Status500, "injected fault"),
        (Fault::Reset, ""),
        (Fault::TruncateReply(60), ""),
        (Fault::EndlessReply, "larger than"),
        (Fault::SlowReply(Duration::from_millis(200)), ""),
    ];
    for (fault, want) in cases {
        proxy.set(fault.clone());
        let t = Instant::now();
        let e = echo(proxy.addr, 1 << 20)
            .await
            .expect_err("a fault must be an error");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{fault:?} took {:?}",
            t.elapsed()
        );
        assert!(e.to_string().contains(want), "{fault:?}: {e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
}
