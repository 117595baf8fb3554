//! Mutual TLS end to end: a real `wire::http::serve` on a loopback port, real clients with
//! certificates from `wire::certs`, checking who may call what.

use axum::routing::post;
use axum::{Extension, Router};
use std::path::Path;
use wire::client::{ClientSecurity, RpcClient};
use wire::http::{serve, Caller, Security};
use wire::tls::{server_config, TlsFiles};

async fn whoami(Extension(c): Extension<Caller>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "name": c.name }))
}

fn router() -> Router {
    Router::new()
        .route("/rpc/Subd.Update", post(whoami))
        .route("/rpc/ImageServer.AddImage", post(whoami))
        .route("/rpc/ImageServer.DeleteImage", post(whoami))
}

fn daemon(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("CA.pem"),
        cert: dir.join(name).join("cert.pem"),
        key: dir.join(name).join("key.pem"),
    }
}

fn user(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("CA.pem"),
        cert: dir.join(format!("{name}.cert")),
        key: dir.join(format!("{name}.key")),
    }
}

async fn start(files: &TlsFiles) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sec = Security::Tls(server_config(files).unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, router(), sec, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn call(
    addr: &str,
    files: TlsFiles,
    method: &str,
) -> Result<String, wire::client::ClientError> {
    let c = RpcClient::new(
        addr,
        0,
        &ClientSecurity::Tls(files),
        wire::client::SUBD_NAME,
        None,
    )
    .unwrap();
    let v: serde_json::Value = c.call(method, &serde_json::json!({})).await?;
    Ok(v["name"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn grants_from_the_certificate_decide_who_may_call_what() {
    let d = tempfile::tempdir().unwrap();
    wire::certs::make_all(d.path(), &[]).unwrap();
    let (addr, _stop) = start(&daemon(d.path(), "subd")).await;

    // The dominator's certificate is accepted for Subd.* and identified by its CN.
    assert_eq!(
        call(&addr, daemon(d.path(), "dominator"), "Subd.Update")
            .await
            .unwrap(),
        "dominator"
    );

    // An image builder may add images but not update machines or delete images.
    assert_eq!(
        call(&addr, user(d.path(), "builder"), "ImageServer.AddImage")
            .await
            .unwrap(),
        "builder"
    );
    for m in ["Subd.Update", "ImageServer.DeleteImage"] {
        let e = call(&addr, user(d.path(), "builder"), m).await.unwrap_err();
        assert_eq!(e.status(), Some(403), "{m}: {e}");
        assert!(e.to_string().contains("access to method denied"), "{e}");
    }
    // The admin's *.* grant covers everything.
    assert_eq!(
        call(&addr, user(d.path(), "admin"), "ImageServer.DeleteImage")
            .await
            .unwrap(),
        "admin"
    );
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() {
    let good = tempfile::tempdir().unwrap();
    let evil = tempfile::tempdir().unwrap();
    wire::certs::make_all(good.path(), &[]).unwrap();
    wire::certs::make_all(evil.path(), &[]).unwrap();
    let (addr, _stop) = start(&daemon(good.path(), "subd")).await;
    // The evil client trusts the good CA (so it would accept the server) but presents a
    // certificate signed by another CA with a "*.*" grant.
    let mut files = user(evil.path(), "admin");
    files.ca = good.path().join("CA.pem");
    let e = call(&addr, files, "Subd.Update").await.unwrap_err();
    assert!(e.status().is_none(), "must fail in the handshake, got {e}");
}

/// Issue 9 #8: a server holding another role's CA-signed pair is refused in the handshake,
/// with an error naming the expected and the actual role, before any request is sent.
#[tokio::test]
async fn a_server_with_another_roles_certificate_is_refused() {
    let d = tempfile::tempdir().unwrap();
    wire::certs::make_all(d.path(), &[]).unwrap();
    let (addr, _stop) = start(&daemon(d.path(), "subd")).await;
    let c =
        wire::client::ImageServerClient::new(&addr, &ClientSecurity::Tls(user(d.path(), "admin")))
            .unwrap();
    let e = c.list_images(None).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        e.status().is_none(),
        "must fail in the handshake, got {msg}"
    );
    assert!(
        msg.contains(r#"for "subd", expected "imageserver""#),
        "names both roles: {msg}"
    );
    // The same server is trusted by a client expecting the subd role.
    assert_eq!(
        call(&addr, user(d.path(), "admin"), "Subd.Update")
            .await
            .unwrap(),
        "admin"
    );
}

#[tokio::test]
async fn a_plain_http_client_gets_nothing_from_a_tls_server() {
    let d = tempfile::tempdir().unwrap();
    wire::certs::make_all(d.path(), &[]).unwrap();
    let (addr, _stop) = start(&daemon(d.path(), "subd")).await;
    let c = RpcClient::new(&addr, 0, &ClientSecurity::Insecure, "subd", None).unwrap();
    let r: Result<serde_json::Value, _> = c.call("Subd.Update", &serde_json::json!({})).await;
    assert!(r.is_err());
}

#[tokio::test]
async fn certificates_with_dominators_extension_are_honoured() {
    // A certificate built independently of make_all, the way Dominator's tools encode the
    // extension (SEQUENCE of UTF8String under OID 1.3.6.1.4.1.9586.100.7.1).
    let d = tempfile::tempdir().unwrap();
    wire::certs::make_all(d.path(), &[]).unwrap();
    let ca_pem = std::fs::read_to_string(d.path().join("CA.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(d.path().join("CA.key")).unwrap())
            .unwrap();
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem).unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "alice");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let ext = [0x30, 0x08, 0x0c, 0x06, b'S', b'u', b'b', b'd', b'.', b'*'];
    p.custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 9586, 100, 7, 1],
            ext.to_vec(),
        ));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(d.path().join("alice.cert"), cert.pem()).unwrap();
    std::fs::write(d.path().join("alice.key"), key.serialize_pem()).unwrap();

    let (addr, _stop) = start(&daemon(d.path(), "subd")).await;
    assert_eq!(
        call(&addr, user(d.path(), "alice"), "Subd.Update")
            .await
            .unwrap(),
        "alice"
    );
    let e = call(&addr, user(d.path(), "alice"), "ImageServer.AddImage")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
}

#[test]
fn a_daemon_without_certificates_refuses_to_start_unless_permitted() {
    let d = tempfile::tempdir().unwrap();
    let mut args = wire::security::DaemonTlsArgs {
        ca: Some(d.path().join("CA.pem")),
        cert: Some(d.path().join("c.pem")),
        key: Some(d.path().join("k.pem")),
        permit_insecure_mode: false,
    };
    let e = args.server_security("subd").err().expect("must refuse");
    assert!(e.to_string().contains("CA.pem is missing"), "{e}");
    args.permit_insecure_mode = true;
    assert!(args.server_security("subd").unwrap().is_insecure());
}
