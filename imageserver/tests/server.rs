//! The imageserver over real HTTP: in-process on an ephemeral port for the RPC behaviour,
//! and as a real process for restart and kill -9 tests. (The server's memory while
//! receiving a 2 GiB object is measured by `bench/images.sh`.)

use model::frame;
use model::image::{FileTree, Inode, Mtime};
use model::{Image, ObjectId};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;
use wire::client::{ClientSecurity, ImageServerClient};

struct InProcess {
    client: ImageServerClient,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    async fn start(dir: &Path) -> InProcess {
        InProcess::start_with_grace(dir, imageserver::catalogue::DEFAULT_PIN_GRACE).await
    }

    async fn start_with_grace(dir: &Path, grace: Duration) -> InProcess {
        let state = imageserver::State::open_with_grace(dir, wire::http::Security::Insecure, grace)
            .unwrap();
        InProcess::start_with_state(state).await
    }

    async fn start_with_state(state: imageserver::State) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            imageserver::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        InProcess {
            client: ImageServerClient::new(&addr, &ClientSecurity::Insecure).unwrap(),
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

fn frames(objs: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for o in objs {
        v.extend_from_slice(&frame::header(&ObjectId::of(o), o.len() as u64));
        v.extend_from_slice(o);
    }
    v
}

fn image_with(files: &[&[u8]]) -> Image {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    for (i, f) in files.iter().enumerate() {
        let ino = i as u64 + 1;
        t.inodes.insert(
            ino,
            Inode::file(
                0o644,
                0,
                0,
                Mtime::default(),
                f.len() as u64,
                Some(ObjectId::of(f)),
            ),
        );
        t.entries.insert(format!("/f{i}").parse().unwrap(), ino);
    }
    Image::new(t, None, Default::default())
}

fn count_files(p: &Path) -> usize {
    testkit::files_under(p).len()
}

#[tokio::test]
async fn uploads_are_verified_and_bad_ones_store_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let c = &s.client;
    // wrong content for the hash
    let mut bad = frame::header(&ObjectId::of(b"good"), 4).to_vec();
    bad.extend_from_slice(b"evil");
    let e = c.add_objects(bad.into()).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("hash mismatch"), "{e}");
    // truncated inside an object
    let mut trunc = frames(&[b"whole one"]);
    trunc.extend_from_slice(&frame::header(&ObjectId::of(b"0123456789"), 10));
    trunc.extend_from_slice(b"01234");
    let e = c.add_objects(trunc.into()).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("truncated"), "{e}");
    // truncated inside a header
    let e = c.add_objects(vec![1u8; 30].into()).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    let e = c.add_objects(frames(&[b""]).into()).await.unwrap_err();
    assert!(e.to_string().contains("zero-length"), "{e}");
    assert_eq!(
        count_files(&d.path().join("objects")),
        0,
        "nothing stored, no temp left"
    );
    // a good batch, then the same again (dedup)
    let r = c
        .add_objects(frames(&[b"one", b"two"]).into())
        .await
        .unwrap();
    assert_eq!((r.added, r.existing, r.bytes_added), (2, 0, 6));
    let r = c
        .add_objects(frames(&[b"one", b"three"]).into())
        .await
        .unwrap();
    assert_eq!((r.added, r.existing), (1, 1));
    let sizes = c
        .check_objects(&[
            ObjectId::of(b"one"),
            ObjectId::of(b"nope"),
            ObjectId::of(b"three"),
        ])
        .await
        .unwrap();
    assert_eq!(sizes, [3, 0, 5]);
    // GetObjects streams frames in order; unknown objects fail the whole call
    let resp = c
        .get_objects(&[ObjectId::of(b"two"), ObjectId::of(b"one")])
        .await
        .unwrap();
    assert_eq!(
        resp.bytes().await.unwrap().to_vec(),
        frames(&[b"two", b"one"])
    );
    let e = c
        .get_objects(&[ObjectId::of(b"one"), ObjectId::of(b"x")])
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(
        e.to_string()
            .contains(&format!("unknown object: {}", ObjectId::of(b"x"))),
        "{e}"
    );
    s.stop().await;
}

#[tokio::test]
async fn add_image_validation_and_created_metadata() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let c = &s.client;
    c.add_objects(frames(&[b"aaa"]).into()).await.unwrap();
    let img = image_with(&[b"aaa", b"missing-1", b"missing-2"]);
    let e = c.add_image("x/1", &img).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    let first_missing = [ObjectId::of(b"missing-1"), ObjectId::of(b"missing-2")]
        .into_iter()
        .min()
        .unwrap();
    assert!(
        e.to_string().contains(&format!(
            "object {first_missing} is not available (2 objects are missing)"
        )),
        "{e}"
    );
    // an invalid tree
    let mut orphan = image_with(&[b"aaa"]);
    orphan.tree.entries.insert("/no/parent".parse().unwrap(), 1);
    let e = c.add_image("x/1", &orphan).await.unwrap_err();
    assert!(e.to_string().contains("invalid tree"), "{e}");
    // invalid names
    for bad in ["", "a//b", ".hidden", "a/../b"] {
        let e = c.add_image(bad, &image_with(&[b"aaa"])).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad}");
    }
    let mut img = image_with(&[b"aaa"]);
    img.created_by = "forged".into();
    img.created_on = 1;
    c.add_image("/x/1", &img).await.unwrap();
    let got = c.get_image("x/1").await.unwrap();
    assert_eq!(got.created_by, "", "insecure callers have no name");
    assert!(got.created_on > 1_600_000_000);
    assert_eq!(got.tree, img.tree);
    assert!(c.check_image("x/1").await.unwrap());
    let e = c.add_image("x/1", &img).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    s.stop().await;
}

/// `delunrefobj` racing an add between its uploads and its `AddImage` deletes nothing the
/// add needs: uploaded objects are pinned for the grace period.
#[tokio::test]
async fn uploaded_objects_are_pinned_against_unreferenced_deletion() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start_with_grace(d.path(), Duration::from_millis(800)).await;
    let c = &s.client;
    c.add_objects(frames(&[b"needed", b"spare"]).into())
        .await
        .unwrap();
    assert_eq!(c.list_unreferenced_objects().await.unwrap().len(), 2);
    let r = c.delete_unreferenced_objects(100, 0).await.unwrap();
    assert_eq!((r.deleted, r.bytes), (0, 0), "pinned objects are kept");
    let metrics = reqwest::get(format!("http://{}/metrics", s.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("imageserver_pinned_objects 2"),
        "{metrics}"
    );
    c.add_image("pin/1", &image_with(&[b"needed"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = c.delete_unreferenced_objects(100, 0).await.unwrap();
    assert_eq!((r.deleted, r.bytes), (1, 5), "the pin ran out");
    assert_eq!(
        c.check_objects(&[ObjectId::of(b"needed"), ObjectId::of(b"spare")])
            .await
            .unwrap(),
        [6, 0]
    );
    s.stop().await;
}

/// `CheckImage` tells a live name, a deleted (tombstoned) name and a free one apart.
#[tokio::test]
async fn check_image_reports_tombstones() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let c = &s.client;
    c.add_objects(frames(&[b"x"]).into()).await.unwrap();
    c.add_image("t/1", &image_with(&[b"x"])).await.unwrap();
    c.add_image("t/2", &image_with(&[b"x"])).await.unwrap();
    c.delete_image("t/2").await.unwrap();
    let state = |n: &'static str| async move {
        let r = c.check_image_name(n).await.unwrap();
        (r.exists, r.deleted)
    };
    assert_eq!(state("t/1").await, (true, false));
    assert_eq!(state("t/2").await, (false, true));
    assert_eq!(state("t/3").await, (false, false));
    assert!(!c.check_image("t/2").await.unwrap());
    s.stop().await;
}

#[tokio::test]
async fn a_method_of_another_daemon_gets_a_404_that_says_so() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let subd = wire::client::SubdClient::new(
        &s.addr,
        &wire::client::ClientSecurity::Insecure,
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let e = subd
        .poll(&model::api::PollRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(
        e.to_string()
            .contains("this server has no method Subd.Poll (is it the right kind of server"),
        "{e}"
    );
    s.stop().await;
}

#[tokio::test]
async fn restart_keeps_images_objects_and_tombstones() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    s.client
        .add_objects(frames(&[b"aaa", b"bbb"]).into())
        .await
        .unwrap();
    s.client
        .add_image("p/1", &image_with(&[b"aaa"]))
        .await
        .unwrap();
    s.client
        .add_image("p/2", &image_with(&[b"aaa", b"bbb"]))
        .await
        .unwrap();
    s.client.delete_image("p/2").await.unwrap();
    s.stop().await;
    let s = InProcess::start(d.path()).await;
    let c = &s.client;
    assert_eq!(c.list_images(None).await.unwrap(), ["p/1"]);
    assert!(c
        .add_image("p/2", &image_with(&[b"aaa"]))
        .await
        .unwrap_err()
        .to_string()
        .contains("never reused"));
    let unref = c.list_unreferenced_objects().await.unwrap();
    assert_eq!(unref.len(), 1);
    assert_eq!(unref[0].hash, ObjectId::of(b"bbb"));
    assert_eq!(
        c.get_image("p/1").await.unwrap().tree,
        image_with(&[b"aaa"]).tree
    );
    s.stop().await;
}

/// Issue 10 §4: an image name carrying HTML (quotes and apostrophes too) is shown as text.
#[tokio::test]
async fn hostile_image_names_are_escaped_on_the_status_page() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    s.client.add_objects(frames(&[b"x"]).into()).await.unwrap();
    s.client
        .add_image("h/<script>\"'&", &image_with(&[b"x"]))
        .await
        .unwrap();
    let page = s.client.rpc.get_text("/").await.unwrap();
    assert!(
        page.contains("<tr><td>h/&lt;script&gt;&quot;&#x27;&amp;</td>"),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
    s.stop().await;
}

#[tokio::test]
async fn status_page_and_metrics() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    s.client
        .add_objects(frames(&[b"aaa", b"bbbb"]).into())
        .await
        .unwrap();
    s.client
        .add_image("s/<1>", &image_with(&[b"aaa"]))
        .await
        .unwrap();
    let page = s.client.rpc.get_text("/").await.unwrap();
    assert!(page.contains("INSECURE MODE"), "{page}");
    assert!(page.contains("images: 1<br>"), "{page}");
    assert!(page.contains("objects: 2<br>bytes: 7<br>"), "{page}");
    // Each image with its size, objects and unique bytes.
    assert!(
        page.contains("<tr><td>s/&lt;1&gt;</td><td>3</td><td>1</td><td>3</td></tr>"),
        "{page}"
    );
    let m = s.client.rpc.get_text("/metrics").await.unwrap();
    for want in [
        "# TYPE imageserver_images gauge\nimageserver_images 1\n",
        "imageserver_objects 2\n",
        "imageserver_object_bytes 7\n",
        "imageserver_unreferenced_objects 1\n",
        "imageserver_objects_received_total 2\n",
        "imageserver_images_added_total 1\n",
    ] {
        assert!(m.contains(want), "{want:?} not in\n{m}");
    }
    let _ = s.addr;
    s.stop().await;
}

#[test]
fn golden_v1_image_json_still_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/v1-kinds-full.json");
    let img: Image = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    assert_eq!(img.format, 1);
    assert!(!img.is_sparse());
    assert_eq!(img.filter.as_ref().unwrap().lines().len(), 7);
    assert_eq!(img.triggers.list()[0].service, "sshd");
    img.tree.validate().unwrap();
    let su = img.tree.get(&"/bin/su".parse().unwrap()).unwrap();
    assert_eq!(su.mode, 0o4755);
    assert_eq!(
        img.tree.entries[&"/bin/su".parse().unwrap()],
        img.tree.entries[&"/bin/su-again".parse().unwrap()]
    );
    assert_eq!(
        img.tree.get(&"/dev/null".parse().unwrap()).unwrap().rdev,
        libc::makedev(1, 3)
    );
}

// ---- the real process ----

struct Proc {
    child: Child,
    addr: String,
}

/// A failed test leaves no server behind (holding the test's output open).
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path) -> Proc {
    let (child, addr) =
        testkit::spawn_listening(Command::new(env!("CARGO_BIN_EXE_imageserver")).args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--permit-insecure-mode",
        ]));
    Proc {
        child,
        addr: addr.to_string(),
    }
}

/// Deterministic pseudo-random bytes (xorshift), generated in chunks.
struct Noise {
    state: u64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn noise_body(id: ObjectId, len: u64, seed: u64) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || {
        let _ = tx.blocking_send(Ok(frame::header(&id, len).to_vec()));
        let mut n = Noise {
            state: seed,
            left: len,
        };
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let k = n.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            buf.truncate(k);
            if tx.blocking_send(Ok(buf)).is_err() {
                break;
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test]
async fn kill_9_during_a_large_upload_leaves_nothing_partial() {
    let d = tempfile::tempdir().unwrap();
    let mut p = spawn_server(d.path());
    let c = ImageServerClient::new(&p.addr, &ClientSecurity::Insecure).unwrap();
    c.add_objects(frames(&[b"small"]).into()).await.unwrap();
    c.add_image("k/1", &image_with(&[b"small"])).await.unwrap();
    let len = 512u64 << 20;
    let id = model::hash::hash_reader(Noise {
        state: 7,
        left: len,
    })
    .unwrap()
    .0;
    let upload = tokio::spawn({
        let c = c.clone();
        async move { c.add_objects(noise_body(id, len, 7)).await }
    });
    // wait until the server is writing the object, then kill it
    let objects = d.path().join("objects");
    for _ in 0..400 {
        if count_files(&objects) > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert!(upload.await.unwrap().is_err());
    let mut p = spawn_server(d.path());
    let c = ImageServerClient::new(&p.addr, &ClientSecurity::Insecure).unwrap();
    assert_eq!(c.check_objects(&[id]).await.unwrap(), [0]);
    assert_eq!(c.list_images(None).await.unwrap(), ["k/1"]);
    assert_eq!(
        count_files(&objects),
        1,
        "only the small object; temp files removed"
    );
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

// ---- GetObjects: damaged objects and readers that never read ----

/// An object whose file is gone or shorter than recorded is an error, never a short 200.
#[tokio::test]
async fn get_objects_of_a_missing_or_short_file_is_an_error_never_a_short_200() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let c = &s.client;
    let (a, b) = (b"first object".as_slice(), b"second object".as_slice());
    c.add_objects(frames(&[a, b]).into()).await.unwrap();
    let store = disk::objectstore::ObjectStore::open(&d.path().join("objects")).unwrap();
    let fetch = |ids: Vec<ObjectId>| async move {
        match c.get_objects(&ids).await {
            Err(e) => Err(e.to_string()),
            Ok(resp) => resp
                .bytes()
                .await
                .map(|b| b.len())
                .map_err(|e| e.to_string()),
        }
    };
    assert_eq!(
        fetch(vec![ObjectId::of(a), ObjectId::of(b)]).await,
        Ok(frames(&[a, b]).len())
    );
    // shorter than recorded
    std::fs::write(store.path_of(&ObjectId::of(b)), b"second").unwrap();
    let e = fetch(vec![ObjectId::of(a), ObjectId::of(b)])
        .await
        .expect_err("a short object is an error");
    assert!(e.contains(&ObjectId::of(b).to_string()), "{e}");
    // gone
    std::fs::remove_file(store.path_of(&ObjectId::of(a))).unwrap();
    let e = fetch(vec![ObjectId::of(a)])
        .await
        .expect_err("a missing object is an error");
    assert!(e.contains(&ObjectId::of(a).to_string()), "{e}");
    s.stop().await;
}

/// Opens a `GetObjects` of `id` on a raw connection and never reads the reply.
async fn unread_get_objects(addr: &str, id: ObjectId) -> tokio::net::TcpStream {
    unread_get_objects_from("127.0.0.1", addr, id).await
}

/// `unread_get_objects` from the loopback address `from` (another machine, to the server).
async fn unread_get_objects_from(from: &str, addr: &str, id: ObjectId) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::to_vec(&model::api::GetObjectsRequest { hashes: vec![id] }).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut conn = sock.connect(addr.parse().unwrap()).await.unwrap();
    let head = format!(
        "POST /rpc/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        model::api::methods::GET_OBJECTS,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    conn
}

fn big_object() -> Vec<u8> {
    let mut v = Vec::new();
    Noise {
        state: 11,
        left: 8 << 20,
    }
    .read_to_end(&mut v)
    .unwrap();
    v
}

/// Hundreds of `GetObjects` streams whose clients never read hold no thread the other
/// RPCs need: `GetImage` still answers within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_object_streams_do_not_stall_get_image() {
    let d = tempfile::tempdir().unwrap();
    let s = InProcess::start(d.path()).await;
    let obj = big_object();
    s.client.add_objects(frames(&[&obj]).into()).await.unwrap();
    s.client
        .add_image("slow/1", &image_with(&[&obj]))
        .await
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..600 {
        conns.push(unread_get_objects(&s.addr, ObjectId::of(&obj)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(1), s.client.get_image("slow/1")).await;
    assert!(
        matches!(got, Ok(Ok(_))),
        "GetImage with 600 unread streams open: {:?} after {:?}",
        got.map(|r| r.map(|_| ())),
        t.elapsed()
    );
    drop(conns);
    s.stop().await;
}

/// Streams beyond the bounds (per caller, then overall) are refused with a 503 saying
/// which; a slot frees when its stream's client goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_streams_beyond_the_bounds_get_a_503() {
    let obj = big_object();
    let id = ObjectId::of(&obj);
    for (max, per_caller, want) in [
        (
            10,
            2,
            "too many object streams open for caller \"127.0.0.1\" (at most 2)",
        ),
        (2, 10, "too many object streams open on this imageserver"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let state = imageserver::State::open(d.path(), wire::http::Security::Insecure)
            .unwrap()
            .with_stream_limits(max, per_caller);
        let s = InProcess::start_with_state(state).await;
        s.client.add_objects(frames(&[&obj]).into()).await.unwrap();
        let mut conns = vec![
            unread_get_objects(&s.addr, id).await,
            unread_get_objects(&s.addr, id).await,
        ];
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = s.client.get_objects(&[id]).await.unwrap_err();
        assert_eq!(e.status(), Some(503), "{e}");
        assert!(e.to_string().contains(want), "{e}");
        conns.pop();
        let mut freed = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(r) = s.client.get_objects(&[id]).await {
                assert_eq!(
                    r.bytes().await.unwrap().len(),
                    obj.len() + frame::HEADER_LEN
                );
                freed = true;
                break;
            }
        }
        assert!(freed, "the slot of a closed stream was never freed");
        drop(conns);
        s.stop().await;
    }
}

/// Machines sharing one certificate are told apart by address: one machine at its
/// per-caller bound leaves another its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_caller_stream_bound_is_per_address() {
    let obj = big_object();
    let id = ObjectId::of(&obj);
    let d = tempfile::tempdir().unwrap();
    let state = imageserver::State::open(d.path(), wire::http::Security::Insecure)
        .unwrap()
        .with_stream_limits(10, 2);
    let s = InProcess::start_with_state(state).await;
    s.client.add_objects(frames(&[&obj]).into()).await.unwrap();
    let busy = vec![
        unread_get_objects(&s.addr, id).await,
        unread_get_objects(&s.addr, id).await,
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = s.client.get_objects(&[id]).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    // Another machine (127.0.0.2) still gets its streams, up to its own bound.
    use tokio::io::AsyncReadExt;
    let mut other = unread_get_objects_from("127.0.0.2", &s.addr, id).await;
    let mut head = [0u8; 12];
    other.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    drop((busy, other));
    s.stop().await;
}

/// An image file flipped on disk so that it stays valid JSON is refused after a restart:
/// `GetImage` names the problem, the status page and metrics show it; an image stored
/// without a checksum (by an earlier version) is still served; a corrupt image can be
/// deleted.
#[tokio::test]
async fn an_image_flipped_on_disk_is_refused_after_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let mut p = spawn_server(d.path());
    let c = ImageServerClient::new(&p.addr, &ClientSecurity::Insecure).unwrap();
    c.add_objects(frames(&[b"motd"]).into()).await.unwrap();
    c.add_image("etc/1", &image_with(&[b"motd"])).await.unwrap();
    c.add_image("old/1", &image_with(&[b"motd"])).await.unwrap();
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let file = d.path().join("images/etc/1/.image");
    let json = std::fs::read_to_string(&file).unwrap();
    assert!(json.contains("\"/f0\""), "{json}");
    std::fs::write(&file, json.replace("\"/f0\"", "\"/g0\"")).unwrap();
    // as an earlier version left it: no checksum
    let _ = std::fs::remove_file(d.path().join("images/old/1/.image.sha512"));
    let mut p = spawn_server(d.path());
    let c = ImageServerClient::new(&p.addr, &ClientSecurity::Insecure).unwrap();
    let e = c.get_image("etc/1").await.unwrap_err();
    assert_eq!(e.status(), Some(500), "{e}");
    assert!(
        e.to_string()
            .contains("image etc/1 is corrupt: its file does not match its SHA-512 checksum"),
        "{e}"
    );
    assert_eq!(
        c.get_image("old/1").await.unwrap().tree,
        image_with(&[b"motd"]).tree
    );
    let page = c.rpc.get_text("/").await.unwrap();
    assert!(page.contains("Corrupt images: 1"), "{page}");
    assert!(
        page.contains("<li>etc/1: its file does not match"),
        "{page}"
    );
    let m = c.rpc.get_text("/metrics").await.unwrap();
    assert!(m.contains("imageserver_images_corrupt 1\n"), "{m}");
    c.delete_image("etc/1").await.unwrap();
    let m = c.rpc.get_text("/metrics").await.unwrap();
    assert!(m.contains("imageserver_images_corrupt 0\n"), "{m}");
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// Starts an `AddImage` announcing a `len`-byte body and sends only its first bytes.
async fn partial_add_image(addr: &str, len: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /rpc/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{{\"name\": \"big/1\", ",
        model::api::methods::ADD_IMAGE,
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

/// Large `AddImage` bodies are admitted a few at a time: beyond the slots, one waits its
/// bounded time and gets a 503 saying why; small ones are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_add_image_bodies_beyond_the_slots_get_a_503() {
    use tokio::io::AsyncReadExt;
    let d = tempfile::tempdir().unwrap();
    let state = imageserver::State::open(d.path(), wire::http::Security::Insecure)
        .unwrap()
        .with_large_image_bodies(1, Duration::from_millis(300));
    let s = InProcess::start_with_state(state).await;
    let _first = partial_add_image(&s.addr, 20 << 20).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = partial_add_image(&s.addr, 20 << 20).await;
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut reply))
        .await
        .expect("the second large AddImage is answered, not left waiting")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.contains("too many large AddImage requests"),
        "{reply}"
    );
    s.client
        .add_objects(frames(&[b"small"]).into())
        .await
        .unwrap();
    s.client
        .add_image("small/1", &image_with(&[b"small"]))
        .await
        .unwrap();
    s.stop().await;
}
