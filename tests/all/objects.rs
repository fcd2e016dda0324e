//! Bulk bytes in an object store (issue 21): dataset segments and model
//! weights are copied there by content digest before their manifests are
//! committed; a process without the local files fetches them, verified.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use cloister_host::env_config::InitOptions;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError, TrainRequest};

use crate::postgres::{printed_token, succeeded};
use cloister_host::users::User;

/// The object file of content `sha`.
fn object(root: &Path, sha: &str) -> PathBuf {
    root.join("sha256").join(&sha[..2]).join(sha)
}

fn clear(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
}

fn try_train(c: &Cloister, sci: &User, features: &str, seed: u64) -> Result<String, ServiceError> {
    c.train_model(
        sci,
        &TrainRequest {
            dataset: "spam".into(),
            preprocess: vec![],
            preprocess_config: Vec::new(),
            features: features.into(),
            features_config: Vec::new(),
            template: "logreg".into(),
            sets: vec![("epochs".into(), "2".into())],
            split_seed: Some(seed),
        },
        &mut |_| {},
    )
    .map(|m| m.id)
}

fn train(c: &Cloister, sci: &User, features: &str, seed: u64) -> String {
    try_train(c, sci, features, seed).unwrap()
}

#[test]
fn segments_and_weights_live_in_the_object_store_and_come_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    let env = dir.path().join("env");
    let options = InitOptions {
        objects: Some(format!("file://{}", objects.display())),
        ..InitOptions::default()
    };
    // A bad URL is refused before anything is created.
    let bad = InitOptions {
        objects: Some("s4://bucket".into()),
        ..InitOptions::default()
    };
    let err = Cloister::init_with_options(&dir.path().join("x"), "root", &bad).unwrap_err();
    assert!(err.to_string().contains("file:///"), "{err}");
    assert!(!dir.path().join("x").exists());

    // Records would sit there in the clear: a directory others can read
    // is refused.
    chmod(&objects, 0o755);
    let err = Cloister::init_with_options(&env, "root", &options).unwrap_err();
    assert!(err.to_string().contains("chmod 700"), "{err}");
    chmod(&objects, 0o700);
    let (c, root) = Cloister::init_with_options(&env, "root", &options).unwrap();
    let admin = c.authenticate(&root).unwrap();
    let sci = c.add_user(&admin, "sci", &[Role::Scientist]).unwrap().0;
    let rev = c.add_user(&admin, "rev", &[Role::Reviewer]).unwrap().0;
    let data = dir.path().join("d.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for r in crate::support::spamassassin().iter().step_by(8) {
        let v = serde_json::json!({"id": r.id, "text": r.text("text").unwrap(), "label": r.label.clone().unwrap()});
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    let version = c
        .import_dataset(&sci, "spam", &data, &ImportOptions::default())
        .unwrap();
    let e = c
        .add_plugin(
            &sci,
            cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
        )
        .unwrap();
    c.approve_plugin(&rev, &e.digest).unwrap();
    let model = train(&c, &sci, &e.digest, 1);
    let m = c.show_model(&sci, &model).unwrap();

    // Everything bulk is in the store under its digest.
    let seg_object = object(&objects, &version.segment_sha256);
    assert!(seg_object.is_file());
    assert!(object(&objects, &m.weights_sha256).is_file());
    let plugin_object = object(&objects, &e.digest);
    assert!(plugin_object.is_file(), "the plugin component too");
    assert!(
        c.env()
            .store()
            .get(
                cloister_host::store::Space::PluginBlobs,
                e.digest.as_bytes()
            )
            .unwrap()
            .is_none(),
        "and not in the store"
    );
    assert!(object(&objects, m.release_weights_sha256.as_ref().unwrap()).is_file());
    assert_eq!(mode(&seg_object), 0o600);
    assert_eq!(mode(seg_object.parent().unwrap()), 0o700);

    // Another machine: the same directory without its local bulk files.
    drop(c);
    clear(&env.join("datasets"));
    clear(&env.join("models"));
    let c = Cloister::open(&env, "cli").unwrap();
    let probe = [crate::support::text("p", "free money, click now")];
    let p = c.predict(&sci, &model, &probe).unwrap();
    assert_eq!(p.ids, vec!["p".to_string()]);
    let again = train(&c, &sci, &e.digest, 2); // a new split: reads the segment
    assert_ne!(again, model);
    assert!(env.join("datasets").read_dir().unwrap().count() > 0);

    // An object changed in the store is detected and not used.
    drop(c);
    clear(&env.join("datasets"));
    let mut bytes = std::fs::read(&seg_object).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&seg_object, &bytes).unwrap();
    let c = Cloister::open(&env, "cli").unwrap();
    let err = try_train(&c, &sci, &e.digest, 3).unwrap_err();
    assert!(
        err.to_string().contains("does not have its digest"),
        "{err}"
    );
    assert_eq!(
        env.join("datasets").read_dir().unwrap().count(),
        0,
        "nothing of the bad object is kept"
    );

    // A missing object is named as missing.
    std::fs::remove_file(&seg_object).unwrap();
    let err = try_train(&c, &sci, &e.digest, 4).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // A plugin component changed in the store is refused before it runs.
    let mut bytes = std::fs::read(&plugin_object).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&plugin_object, &bytes).unwrap();
    let err = c.plugin_for_run(&sci, &e.digest, None).unwrap_err();
    assert!(
        err.to_string().contains("does not have its digest"),
        "{err}"
    );
}

/// A running `moto_server` (an S3-compatible server, from PyPI's `moto`).
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Option<Moto> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("moto_server"))
            .find(|f| f.is_file())
    });
    let Some(bin) = found else {
        assert!(
            std::env::var_os("CLOISTER_REQUIRE_S3").is_none(),
            "moto_server is required (python3 -m pip install 'moto[server]')"
        );
        eprintln!("SKIPPED: no moto_server (python3 -m pip install 'moto[server]')");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let m = Moto { child, port };
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(m);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("moto_server did not start");
}

#[test]
fn an_s3_compatible_store_holds_the_bulk_bytes_and_gives_them_back() {
    let Some(s3) = moto() else { return };
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sf"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    curl(&["-X", "PUT", &format!("{endpoint}/cloister")]);
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    // Credentials and endpoint come from the environment, as in a pod.
    let cloister = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cloister"))
            .args(args)
            .env("CLOISTER_ENV", &env)
            .env_remove("CLOISTER_STORE")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", &endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .unwrap()
    };
    // A bucket that does not exist is refused before anything is made.
    let out = cloister(&["init", env.to_str().unwrap(), "--objects", "s3://nope/x"]);
    assert!(!out.status.success());
    assert!(!env.exists());

    let token = printed_token(
        &succeeded(&cloister(&[
            "init",
            env.to_str().unwrap(),
            "--objects",
            "s3://cloister/envs/a",
        ])),
        "admin token",
    );
    let data = dir.path().join("d.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for r in crate::support::spamassassin().iter().step_by(20) {
        let v = serde_json::json!({"id": r.id, "text": r.text("text").unwrap(), "label": r.label.clone().unwrap()});
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    let as_user = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        cloister(&all)
    };
    let sci = printed_token(
        &succeeded(&as_user(
            &token,
            &["user", "add", "sci", "--role", "scientist"],
        )),
        "token",
    );
    let with_token = |args: &[&str]| as_user(&sci, args);
    succeeded(&with_token(&[
        "dataset",
        "import",
        "spam",
        data.to_str().unwrap(),
    ]));
    let listing = curl(&[&format!(
        "{endpoint}/cloister?list-type=2&prefix=envs/a/sha256/"
    )]);
    assert_eq!(listing.matches("<Key>").count(), 1, "{listing}");

    // Without its local segment, the environment fetches it from S3.
    clear(&env.join("datasets"));
    succeeded(&with_token(&["dataset", "stats", "spam", "--seed", "7"]));
    assert_eq!(env.join("datasets").read_dir().unwrap().count(), 1);
}
