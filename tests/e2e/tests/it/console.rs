//! The help-desk console in a real browser (Debian's chromium, driven through
//! chromedriver over WebDriver on 127.0.0.1), against a real server that backed up a
//! virtual iPhone: sign in, find the phone, give a reason, read its messages, contacts and
//! calls; hostile text stays text; exports and downloads equal the phone's own data; every
//! look is in a hash-chained audit log that names an altered row. Screenshots of each page
//! go to `target/test-artifacts/console/`.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use lifeboat_e2e::{ServerProcess, embedded_db, http_get, server_cli, skip_or_fail, tempdir};
use lifeboat_test_support::{HttpAnswer, http_raw};
use virtual_iphone::content::{FileKey, HOSTILE_CONTACT, HOSTILE_MESSAGE, Profile};
use virtual_iphone::{Config, Registry, usbmuxd};

use crate::agent_run::{AgentProcess, agent, same};

const PASSWORD: &str = "correct horse battery staple";
const REASON: &str = "INC-4711 stolen phone";

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn browser_binary() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

impl Driver {
    fn start() -> Option<Self> {
        if browser_binary().is_none() || Command::new("chromedriver").arg("--version").output().is_err() {
            skip_or_fail("chromium and chromium-driver are not installed (scripts/test installs them)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Self { child, port, _profile: tempfile::tempdir().unwrap() })
    }

    async fn browser(&self) -> Client {
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser_binary().unwrap(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100",
                         format!("--user-data-dir={}", self._profile.path().display())],
            }
        });
        let serde_json::Value::Object(caps) = caps else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a WebDriver session of chromium")
    }
}

struct Page<'a> {
    c: &'a Client,
    base: String,
    shots: PathBuf,
}

impl Page<'_> {
    async fn goto(&self, path: &str) {
        self.c.goto(&format!("{}{path}", self.base)).await.unwrap();
    }
    async fn path(&self) -> String {
        let u = self.c.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }
    async fn text(&self, css: &str) -> String {
        self.c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
    }
    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.c.find_all(Locator::Css(css)).await.unwrap() {
            out.push(e.text().await.unwrap());
        }
        out
    }
    async fn fill(&self, css: &str, value: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }
    /// Clicks what leads to another page, and waits until that page has loaded.
    async fn click(&self, css: &str) {
        self.c.execute("window.__before_click = true", vec![]).await.unwrap();
        self.c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = self
                .c
                .execute("return window.__before_click === undefined && document.readyState === 'complete'", vec![])
                .await;
            if matches!(done, Ok(serde_json::Value::Bool(true))) {
                return;
            }
            assert!(Instant::now() < deadline, "clicking {css} led to no new page");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
    /// No script of the page's content ran: nothing set `document.body.dataset.pwned`.
    async fn nothing_ran(&self) {
        let v = self.c.execute("return document.body.dataset.pwned === undefined", vec![]).await.unwrap();
        assert_eq!(v, serde_json::Value::Bool(true), "a script from the phone's content ran");
    }
    async fn session_cookie(&self) -> String {
        let c = self.c.get_named_cookie("lifeboat_session").await.unwrap();
        format!("lifeboat_session={}", c.value())
    }
}

/// A session of `name` signed in over plain HTTP: its cookie and its CSRF token.
async fn sign_in(addr: SocketAddr, name: &str, password: &str) -> HttpAnswer {
    let body = format!("name={name}&password={}&next=/", password.replace(' ', "+"));
    http_raw(addr, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], body.as_bytes())
        .await
        .unwrap()
}

async fn session_of(addr: SocketAddr, name: &str) -> (String, String) {
    let a = sign_in(addr, name, PASSWORD).await;
    assert_eq!(a.status, 303, "{name} signs in: {}", a.text());
    let cookie = a.header("set-cookie").unwrap().split(';').next().unwrap().to_owned();
    let page = http_raw(addr, "GET", "/", &[("Cookie", &cookie)], b"").await.unwrap().text();
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    (cookie, csrf)
}

async fn get(addr: SocketAddr, path: &str, cookie: &str) -> HttpAnswer {
    http_raw(addr, "GET", path, &[("Cookie", cookie)], b"").await.unwrap()
}

/// The phone's own database, as the phone holds it.
fn device_db(
    registry: &Registry,
    udid: &str,
    domain: &str,
    path: &str,
) -> (tempfile::NamedTempFile, rusqlite::Connection) {
    let bytes = device_file(registry, udid, domain, path);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let db = rusqlite::Connection::open(file.path()).unwrap();
    (file, db)
}

fn device_file(registry: &Registry, udid: &str, domain: &str, path: &str) -> Vec<u8> {
    let state = registry.state_by_udid(udid).unwrap();
    let content = state.content().unwrap();
    let mut bytes = Vec::new();
    content.open(&state.blobs_dir(), &FileKey::new(domain, path)).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

/// Unfolds a vCard stream and gives each card's FN and its TEL values.
fn vcards(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let unfolded = text.replace("\r\n ", "");
    let mut cards = Vec::new();
    let mut current: Option<(String, BTreeSet<String>)> = None;
    for line in unfolded.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("not a content line: {line:?}"));
        let prop = name.split(';').next().unwrap();
        let unescape = |v: &str| v.replace("\\,", ",").replace("\\;", ";").replace("\\n", "\n").replace("\\\\", "\\");
        match (prop, &mut current) {
            ("BEGIN", None) => current = Some((String::new(), BTreeSet::new())),
            ("VERSION", Some(_)) => assert_eq!(value, "4.0"),
            ("FN", Some(c)) => c.0 = unescape(value),
            ("TEL", Some(c)) => {
                c.1.insert(unescape(value));
            }
            ("END", Some(_)) => cards.push(current.take().unwrap()),
            (_, Some(_)) => {}
            (p, None) => panic!("{p} outside a card"),
        }
    }
    assert!(current.is_none(), "an unterminated card");
    cards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_help_desk_reads_a_phone_in_a_real_browser_and_every_look_is_audited() {
    let Some(driver) = Driver::start() else { return };
    let dir = tempdir();
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[]).unwrap();
    let addr = server.http_addr;
    // Company phones back up encrypted (the tenant's default): call history is only there.
    let (ok, _, err) = server_cli(&data, &["tenant", "create", "acme"]);
    assert!(ok, "{err}");
    let (ok, token, err) =
        server_cli(&data, &["--quic-advertise", &server.quic_addr.to_string(), "token", "create", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let token = token.trim().to_owned();
    let (ok, _, err) = server_cli(&data, &["tenant", "create", "globex", "--encryption", "off"]);
    assert!(ok, "{err}");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let pw = password_file.to_str().unwrap();
    for (tenant, role, name) in [
        ("acme", "helpdesk", "anna"),
        ("acme", "viewer", "victor"),
        ("acme", "admin", "ada"),
        ("globex", "helpdesk", "gus"),
    ] {
        let (ok, _, err) = server_cli(
            &data,
            &["user", "create", "--tenant", tenant, "--role", role, "--name", name, "--password-file", pw],
        );
        assert!(ok, "{name}: {err}");
    }
    let (ok, out, _) = server_cli(&data, &["user", "create", "--tenant", "acme", "--role", "admin", "--name", "api"]);
    assert!(ok);
    let admin_api = out.split_whitespace().find(|w| w.starts_with("lbu1_")).unwrap().to_string();
    let (ok, out, _) =
        server_cli(&data, &["user", "create", "--tenant", "acme", "--role", "helpdesk", "--name", "script"]);
    assert!(ok);
    let desk_api = out.split_whitespace().find(|w| w.starts_with("lbu1_")).unwrap().to_string();
    // Console names are unique across tenants: they sign in by name alone.
    let (ok, _, err) = server_cli(
        &data,
        &["user", "create", "--tenant", "globex", "--role", "viewer", "--name", "Anna", "--password-file", pw],
    );
    assert!(!ok && err.contains("already exists"), "{err}");

    // One virtual iPhone, backed up by an enrolled agent.
    let phones = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mux = listener.local_addr().unwrap().to_string();
    let config = Config {
        seed: 77,
        devices: 2,
        profile: Profile::Tiny,
        state_dir: phones.path().to_path_buf(),
        kdf_rounds: 1000,
    };
    let registry = Arc::new(Registry::new(config).unwrap());
    tokio::spawn(usbmuxd::serve(listener, registry.clone()));
    let mut all = registry.all();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let (phone, new_phone) = (all[0].clone(), all[1].clone());
    let udid = phone.udid.clone();
    let state = dir.path().join("agent");
    let (ok, _, err) = agent(&state, &mux, &["enroll", &token]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = agent(&state, &mux, &["backup", "--device", &udid, "--json"]).await;
    assert!(ok, "{err}");
    let snapshot = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();

    // What the phone holds.
    let (_c, contacts_db) = device_db(&registry, &udid, "HomeDomain", "Library/AddressBook/AddressBook.sqlitedb");
    let people: i64 = contacts_db.query_row("SELECT count(*) FROM ABPerson", [], |r| r.get(0)).unwrap();
    let mut device_cards: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (id, name) in contacts_db
        .prepare("SELECT ROWID, concat_ws(' ', First, nullif(Middle, ''), Last) FROM ABPerson")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
    {
        let phones: BTreeSet<String> = contacts_db
            .prepare("SELECT value FROM ABMultiValue WHERE record_id = ?1 AND property = 3")
            .unwrap()
            .query_map([id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        device_cards.push((name, phones));
    }
    device_cards.sort();
    let (_s, sms) = device_db(&registry, &udid, "HomeDomain", "Library/SMS/sms.db");
    let chats: i64 = sms.query_row("SELECT count(*) FROM chat", [], |r| r.get(0)).unwrap();
    let in_chat_1: i64 =
        sms.query_row("SELECT count(*) FROM chat_message_join WHERE chat_id = 1", [], |r| r.get(0)).unwrap();
    let first_text: Option<String> =
        sms.query_row("SELECT text FROM message WHERE ROWID = 1", [], |r| r.get(0)).unwrap();
    let (coded_id, coded): (i64, Vec<u8>) = sms
        .query_row(
            "SELECT m.ROWID, m.attributedBody FROM message m JOIN chat_message_join j ON j.message_id = m.ROWID \
             WHERE j.chat_id = 1 AND m.text IS NULL ORDER BY m.ROWID LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let coded_text = lifeboat_server::ios::preview::attributed_body_text(&coded).unwrap();
    let (attachment_chat, attachment_path): (i64, String) = sms
        .query_row(
            "SELECT j.chat_id, a.filename FROM attachment a JOIN message_attachment_join ma ON ma.attachment_id = a.ROWID \
             JOIN chat_message_join j ON j.message_id = ma.message_id ORDER BY a.ROWID LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let attachment_path = attachment_path.trim_start_matches("~/").to_owned();
    let (_h, calls_db) = device_db(&registry, &udid, "HomeDomain", "Library/CallHistoryDB/CallHistory.storedata");
    let calls: i64 = calls_db.query_row("SELECT count(*) FROM ZCALLRECORD", [], |r| r.get(0)).unwrap();
    assert_eq!(first_text.as_deref(), Some(HOSTILE_MESSAGE), "message 1 is the hostile one");
    let (_p, photos_db) = device_db(&registry, &udid, "CameraRollDomain", "Media/PhotoData/Photos.sqlite");
    let page_photos: Vec<(String, String)> = photos_db
        .prepare(
            "SELECT 'Media/' || ZDIRECTORY || '/' || ZFILENAME, ZUNIFORMTYPEIDENTIFIER FROM ZASSET \
             WHERE ZTRASHEDSTATE = 0 ORDER BY ZDATECREATED DESC, Z_PK LIMIT 60",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let photo_names: Vec<(String, String)> = photos_db
        .prepare(
            "SELECT coalesce(x.ZORIGINALFILENAME, a.ZFILENAME), 'Media/' || a.ZDIRECTORY || '/' || a.ZFILENAME \
             FROM ZASSET a LEFT JOIN ZADDITIONALASSETATTRIBUTES x ON x.Z_PK = a.ZADDITIONALATTRIBUTES \
             WHERE a.ZTRASHEDSTATE = 0",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts/console");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = driver.browser().await;
    let p = Page { c: &browser, base: format!("http://{addr}"), shots };

    // Not signed in: every page leads to the sign-in page, which leads back.
    p.goto(&format!("/devices/{udid}")).await;
    assert_eq!(p.path().await, format!("/login?next=/devices/{udid}"));
    p.fill("input[name=name]", "anna").await;
    p.fill("input[type=password]", "not the password").await;
    p.click("#sign-in").await;
    assert_eq!(p.text("#login-error").await, "Wrong name or password.");
    p.fill("input[type=password]", PASSWORD).await;
    p.shot("01-login").await;
    p.click("#sign-in").await;
    assert_eq!(p.path().await, format!("/devices/{udid}"));

    // The fleet: one phone, protected; found by name.
    p.goto("/").await;
    assert_eq!(p.text("#count-all").await, "1");
    assert_eq!(p.text("#count-protected").await, "1");
    assert_eq!(p.text("#who").await, "anna · helpdesk");
    p.fill("#search", &phone.name).await;
    p.click("#search-go").await;
    assert_eq!(p.texts("#devices a.device").await, vec![phone.name.clone()]);
    p.shot("02-fleet").await;
    p.fill("#search", "no such phone").await;
    p.click("#search-go").await;
    assert!(p.texts("#devices a.device").await.is_empty());
    p.fill("#search", &udid[udid.len() - 6..]).await;
    p.click("#search-go").await;
    p.click("#devices a.device").await;

    // The device: where it was seen, its snapshot.
    assert_eq!(p.path().await, format!("/devices/{udid}"));
    assert_eq!(p.text("#device-name").await, phone.name);
    assert_eq!(p.text("#workstation").await, hostname);
    assert_eq!(p.text("#standing").await, "protected");
    assert_eq!(p.texts("#snapshots a.snapshot").await.len(), 1);
    p.shot("03-device").await;
    p.click("#snapshots a.snapshot").await;
    assert_eq!(p.path().await, format!("/snapshots/{snapshot}"));
    p.shot("04-snapshot").await;

    // Content opens only with a reason.
    p.click("#open-messages").await;
    assert_eq!(p.path().await, format!("/snapshots/{snapshot}/messages"));
    p.shot("05-reason").await;
    p.fill("#reason", REASON).await;
    p.click("#give-reason").await;
    assert_eq!(p.path().await, format!("/snapshots/{snapshot}/messages"));
    assert_eq!(p.texts("#conversations a.conversation").await.len() as i64, chats);
    p.shot("06-conversations").await;
    p.goto(&format!("/snapshots/{snapshot}/messages/1")).await;
    assert_eq!(p.texts("#thread li.message").await.len() as i64, in_chat_1);
    // Hostile markup is text on the page, and nothing of it ran.
    assert_eq!(p.text("#thread li[data-id='1'] .body").await, HOSTILE_MESSAGE);
    p.nothing_ran().await;
    // A body only in attributedBody is decoded.
    assert_eq!(p.text(&format!("#thread li[data-id='{coded_id}'] .body")).await, coded_text);
    p.shot("07-thread").await;
    p.goto(&format!("/snapshots/{snapshot}/messages/{attachment_chat}")).await;
    let name = attachment_path.rsplit('/').next().unwrap().to_owned();
    assert!(p.texts("#thread a.attachment-link").await.contains(&name), "{name} is listed");

    p.goto(&format!("/snapshots/{snapshot}/contacts")).await;
    assert_eq!(p.texts("#contacts tr.contact").await.len() as i64, people);
    let names = p.texts("#contacts td.name").await;
    assert!(names.iter().any(|n| n.starts_with(HOSTILE_CONTACT)), "the hostile name is shown as text: {names:?}");
    p.nothing_ran().await;
    p.shot("08-contacts").await;
    p.goto(&format!("/snapshots/{snapshot}/calls")).await;
    assert_eq!(p.texts("#calls tr.call").await.len() as i64, calls);
    p.shot("09-calls").await;

    // The camera roll: every JPEG of the page decodes in the browser; HEIC is listed.
    p.goto(&format!("/snapshots/{snapshot}/photos")).await;
    assert_eq!(p.texts("#photos li.photo").await.len(), page_photos.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    let widths = loop {
        let v =
            p.c.execute(
                "const imgs = Array.from(document.querySelectorAll('#photos img.thumb')); \
                 imgs.forEach(i => { i.loading = 'eager'; }); \
                 return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;",
                vec![],
            )
            .await
            .unwrap();
        if let Some(list) = v.as_array() {
            break list.iter().map(|w| w.as_u64().unwrap()).collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "the photo grid's images did not load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let jpegs = page_photos.iter().filter(|(_, uti)| uti == "public.jpeg").count();
    assert!(jpegs > 0);
    assert_eq!(widths, vec![160; jpegs], "each JPEG thumbnail decodes");
    p.shot("10-photos").await;

    // Search one snapshot: hostile text is found and still only text; a phone number finds
    // every contact that has it.
    p.goto(&format!("/snapshots/{snapshot}")).await;
    p.fill("#snapshot-search", "onerror").await;
    p.click("#snapshot-search-go").await;
    assert_eq!(p.texts("#found-messages .body").await, [HOSTILE_MESSAGE]);
    p.nothing_ran().await;
    let number = device_cards[0].1.iter().next().unwrap().clone();
    p.fill("#snapshot-search", &number).await;
    p.click("#snapshot-search-go").await;
    let with_number = device_cards.iter().filter(|(_, phones)| phones.contains(&number)).count();
    let found = p.texts("#found-contacts li").await;
    assert_eq!(found.len(), with_number, "{found:?}");
    assert!(found.iter().any(|f| f.starts_with(&device_cards[0].0)), "{found:?}");
    p.shot("10b-search").await;

    // A restore onto the new phone: picked among attached ones, pre-flight shown, watched
    // until it ends. The agent's service reports the new phone, backs it up and carries
    // the restore out.
    let service = AgentProcess::start(&state, &mux, &["run"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, text) = http_get(addr, "/api/v1/devices", Some(&admin_api)).await.unwrap();
        if text.contains(&new_phone.udid) {
            break;
        }
        assert!(Instant::now() < deadline, "the service never reported {}:\n{}", new_phone.udid, service.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    p.goto(&format!("/snapshots/{snapshot}")).await;
    p.click("#open-restore").await;
    assert_eq!(p.texts("#targets tbody tr").await.len(), 2, "both phones are attached");
    p.shot("11-restore").await;
    p.c.find(Locator::Css(&format!("#target-{}", new_phone.udid))).await.unwrap().click().await.unwrap();
    p.click("#start-restore").await;
    assert!(p.path().await.starts_with("/restores/"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        let status = match p.c.find(Locator::Id("job-status")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if status == "succeeded" || status == "failed" {
            break status;
        }
        assert!(Instant::now() < deadline, "the restore did not end (status {status:?}):\n{}", service.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    p.shot("12-restored").await;
    assert_eq!(status, "succeeded", "{}", service.log());
    let (a, b) = (registry.state_by_udid(&udid).unwrap(), registry.state_by_udid(&new_phone.udid).unwrap());
    same(&b.expect().unwrap(), &a.expect().unwrap(), "the new phone after the restore");

    // The vCard export parses and is the phone's contacts; a photo downloads byte for byte.
    let cookie = p.session_cookie().await;
    let vcf = get(addr, &format!("/snapshots/{snapshot}/contacts.vcf"), &cookie).await;
    assert_eq!(vcf.status, 200);
    assert_eq!(vcf.header("content-type"), Some("text/vcard; charset=utf-8"));
    let mut exported = vcards(&vcf.text());
    exported.sort();
    assert_eq!(exported, device_cards);
    let photo = get(
        addr,
        &format!("/snapshots/{snapshot}/file?domain=MediaDomain&path={}", attachment_path.replace('/', "%2F")),
        &cookie,
    )
    .await;
    assert_eq!(photo.status, 200);
    assert_eq!(photo.body, device_file(&registry, &udid, "MediaDomain", &attachment_path));
    assert!(photo.header("content-disposition").unwrap().starts_with("attachment;"));
    let (photo_path, _) = page_photos.iter().find(|(_, uti)| uti == "public.jpeg").unwrap().clone();
    let original = get(
        addr,
        &format!("/snapshots/{snapshot}/file?domain=CameraRollDomain&path={}", photo_path.replace('/', "%2F")),
        &cookie,
    )
    .await;
    assert_eq!(original.status, 200);
    assert_eq!(
        original.body,
        device_file(&registry, &udid, "CameraRollDomain", &photo_path),
        "the original, byte for byte"
    );

    // Exports stream as ZIPs: the originals under the names they were taken with; the whole
    // snapshot as a Finder backup folder, decrypted, that says so.
    let zipped = get(addr, &format!("/snapshots/{snapshot}/photos.zip"), &cookie).await;
    assert_eq!((zipped.status, zipped.header("content-type")), (200, Some("application/zip")));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zipped.body)).unwrap();
    let mut got = std::collections::BTreeMap::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        got.insert(f.name().unwrap().into_owned(), bytes);
    }
    let mut want = std::collections::BTreeMap::new();
    for (name, path) in &photo_names {
        want.insert(name.clone(), device_file(&registry, &udid, "CameraRollDomain", path));
    }
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    assert!(got == want, "every original, byte for byte");
    let zipped = get(addr, &format!("/snapshots/{snapshot}/backup.zip"), &cookie).await;
    assert_eq!(zipped.status, 200);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zipped.body)).unwrap();
    let (_, listing) = http_get(addr, &format!("/api/v1/snapshots/{snapshot}"), Some(&desk_api)).await.unwrap();
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(archive.len() as u64, listing["file_count"].as_u64().unwrap());
    let mut plist = Vec::new();
    archive.by_name(&format!("{udid}/Manifest.plist")).unwrap().read_to_end(&mut plist).unwrap();
    let plist = plist::Value::from_reader(std::io::Cursor::new(plist)).unwrap();
    assert_eq!(plist.as_dictionary().unwrap().get("IsEncrypted").and_then(|v| v.as_boolean()), Some(false));
    let mut sms_bytes = Vec::new();
    archive
        .by_name(&format!("{udid}/3d/3d0d7e5fb2ce288813306e4d4636395e047a3d28"))
        .unwrap()
        .read_to_end(&mut sms_bytes)
        .unwrap();
    assert_eq!(sms_bytes, device_file(&registry, &udid, "HomeDomain", "Library/SMS/sms.db"), "sms.db in the clear");

    // Sign out: the session is gone.
    p.click("#sign-out").await;
    assert_eq!(p.path().await, "/login");
    p.goto("/").await;
    assert_eq!(p.path().await, "/login?next=/");
    assert_eq!(get(addr, "/", &cookie).await.status, 303, "the old cookie is dead");
    p.shot("13-signed-out").await;
    browser.close().await.unwrap();

    // A state-changing request without the CSRF token, or from another site, is refused.
    let (cookie, csrf) = session_of(addr, "anna").await;
    let form = [("Cookie", cookie.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    let post = |path: String, body: String, extra: Option<(&'static str, &'static str)>| {
        let mut headers = form.to_vec();
        headers.extend(extra);
        async move { http_raw(addr, "POST", &path, &headers, body.as_bytes()).await.unwrap().status }
    };
    assert_eq!(post(format!("/devices/{udid}/access"), "reason=INC-1".into(), None).await, 403);
    assert_eq!(post("/logout".into(), String::new(), None).await, 403);
    let with = format!("csrf={csrf}&reason=INC-2");
    assert_eq!(
        post(format!("/devices/{udid}/access"), with.clone(), Some(("Origin", "http://evil.example"))).await,
        403
    );
    assert_eq!(post(format!("/devices/{udid}/access"), with, None).await, 303);

    // A viewer sees status, never content; another tenant's help desk sees nothing of it.
    let (viewer, _) = session_of(addr, "victor").await;
    assert_eq!(get(addr, "/", &viewer).await.status, 200);
    assert_eq!(get(addr, &format!("/snapshots/{snapshot}"), &viewer).await.status, 200);
    for path in ["contacts", "contacts.vcf", "messages", "messages/1", "calls", "file?domain=HomeDomain&path=x"] {
        assert_eq!(get(addr, &format!("/snapshots/{snapshot}/{path}"), &viewer).await.status, 403, "{path}");
    }
    assert_eq!(get(addr, "/admin/audit", &viewer).await.status, 403);
    let (gus, gus_csrf) = session_of(addr, "gus").await;
    assert!(!get(addr, "/", &gus).await.text().contains(&udid));
    for path in
        [format!("/devices/{udid}"), format!("/snapshots/{snapshot}"), format!("/snapshots/{snapshot}/contacts")]
    {
        assert_eq!(get(addr, &path, &gus).await.status, 404, "{path}");
    }
    let body = format!("csrf={gus_csrf}&reason=INC-3");
    let headers = [("Cookie", gus.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    assert_eq!(
        http_raw(addr, "POST", &format!("/devices/{udid}/access"), &headers, body.as_bytes()).await.unwrap().status,
        404
    );

    // The API reads what the console shows, behind the same reason.
    let api = |path: String| {
        let desk = desk_api.clone();
        async move { http_get(addr, &path, Some(&desk)).await.unwrap() }
    };
    let (code, text) = api(format!("/api/v1/snapshots/{snapshot}/contacts")).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains(&format!("POST /api/v1/devices/{udid}/access")), "{text}");
    let (code, text) = lifeboat_e2e::http_post_json(
        addr,
        &format!("/api/v1/devices/{udid}/access"),
        Some(&desk_api),
        r#"{"reason": "INC-9 script"}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{text}");
    let (code, text) = api(format!("/api/v1/snapshots/{snapshot}/contacts")).await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["contacts"].as_array().unwrap().len() as i64, people);
    let v: serde_json::Value =
        serde_json::from_str(&api(format!("/api/v1/snapshots/{snapshot}/messages/1")).await.1).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len() as i64, in_chat_1);
    assert_eq!(v["messages"][0]["text"], HOSTILE_MESSAGE);
    let v: serde_json::Value =
        serde_json::from_str(&api(format!("/api/v1/snapshots/{snapshot}/calls")).await.1).unwrap();
    assert_eq!(v["calls"].as_array().unwrap().len() as i64, calls);
    assert_eq!(v["encrypted"], true);
    let (code, _) = http_get(addr, &format!("/api/v1/snapshots/{snapshot}/calls"), Some(&admin_api)).await.unwrap();
    assert_eq!(code, 403, "a reason is per user: the admin gave none");

    // Every look is in the audit log: who, role, reason, snapshot, dataset, object.
    let (code, text) = http_get(addr, "/api/v1/audit?limit=200", Some(&admin_api)).await.unwrap();
    assert_eq!(code, 200, "{text}");
    let events: serde_json::Value = serde_json::from_str(&text).unwrap();
    let all: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"].as_str().unwrap().starts_with("anna ("))
        .collect();
    // Each thumbnail the browser loaded is a view of its own, of one of the thread's files.
    let (views, anna): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e["action"] == "file.view");
    for v in &views {
        let object = v["object"].as_str().unwrap();
        assert!(
            object.starts_with("MediaDomain/Library/SMS/Attachments/")
                || object.starts_with("CameraRollDomain/Media/DCIM/"),
            "{v}"
        );
        assert_eq!(v["reason"], REASON);
    }
    let actions: Vec<&str> = anna.iter().rev().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "sign-in",
            "access.grant",
            "messages.list",
            "messages.view",
            "messages.view",
            "contacts.view",
            "calls.view",
            "photos.view",
            "snapshot.search",
            "snapshot.search",
            "restore.create",
            "contacts.export",
            "file.download",
            "file.download",
            "photos.export",
            "snapshot.export",
            "sign-out",
            "sign-in",
            "access.grant",
        ]
    );
    let file_object = format!("MediaDomain/{attachment_path}");
    for e in anna.iter().filter(|e| e["dataset"].is_string()) {
        assert_eq!(e["role"], "helpdesk");
        assert_eq!(e["reason"], REASON, "{e}");
        assert_eq!(e["device"], udid.as_str());
        assert_eq!(e["snapshot"], snapshot.as_str());
        assert_eq!(e["ip"], "127.0.0.1");
    }
    let objects: Vec<&str> = anna.iter().rev().filter_map(|e| e["object"].as_str()).collect();
    assert_eq!(
        objects,
        [
            "chat 1",
            &format!("chat {attachment_chat}"),
            "page 1",
            "query \"onerror\"",
            &format!("query {number:?}"),
            new_phone.udid.as_str(),
            "vcard",
            file_object.as_str(),
            &format!("CameraRollDomain/{photo_path}"),
            &format!("zip of {} photos", photo_names.len()),
            "finder backup zip",
        ]
    );
    // No content in the log: only the words the user searched for.
    let not_searches = anna.iter().filter(|e| e["action"] != "snapshot.search");
    assert!(not_searches.into_iter().all(|e| !e.to_string().contains("onerror")), "no content in the log");
    let script: Vec<(&str, &str)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|e| e["reason"] == "INC-9 script")
        .map(|e| (e["action"].as_str().unwrap(), e["object"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(script, [("access.grant", ""), ("contacts.view", ""), ("messages.view", "chat 1"), ("calls.view", "")]);

    // The chain verifies; one altered row is named.
    let (ok, out, err) = server_cli(&data, &["audit", "verify", "--tenant", "acme"]);
    assert!(ok && out.contains("chain intact"), "{out}{err}");
    let db = embedded_db(&data).await;
    let seq: i64 = db
        .query_one("SELECT seq FROM audit_events WHERE action = 'messages.view' ORDER BY seq LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "SET session_replication_role = replica; UPDATE audit_events SET reason = 'routine' WHERE seq = {seq} \
         AND action = 'messages.view'; SET session_replication_role = DEFAULT;"
    ))
    .await
    .unwrap();
    let (ok, _, err) = server_cli(&data, &["audit", "verify", "--tenant", "acme"]);
    assert!(!ok, "an altered audit log verified");
    assert!(err.contains(&format!("audit event {seq} (id ")) && err.contains("altered"), "{err}");

    // Sign-in failures are limited: after five for a name, even the right password waits.
    for _ in 0..5 {
        assert_eq!(sign_in(addr, "victor", "wrong password!").await.status, 401);
    }
    let refused = sign_in(addr, "victor", PASSWORD).await;
    assert_eq!(refused.status, 429);
    assert!(refused.text().contains("Too many failed sign-ins"));
    drop(server);
}
