//! Bulk bytes in an object store (issue 21): dataset segments and model
//! weights are copied there by content digest before their manifests are
//! committed; a process without the local files fetches them, verified.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use cloister_host::env_config::InitOptions;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, TrainRequest};
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

fn train(c: &Cloister, sci: &User, features: &str, seed: u64) -> String {
    c.train_model(
        sci,
        &TrainRequest {
            dataset: "spam".into(),
            preprocess: vec![],
            features: features.into(),
            template: "logreg".into(),
            sets: vec![("epochs".into(), "2".into())],
            split_seed: Some(seed),
        },
        &mut |_| {},
    )
    .unwrap()
    .id
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
    let err = c
        .train_model(
            &sci,
            &TrainRequest {
                dataset: "spam".into(),
                preprocess: vec![],
                features: e.digest.clone(),
                template: "logreg".into(),
                sets: vec![],
                split_seed: Some(3),
            },
            &mut |_| {},
        )
        .unwrap_err();
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
    let err = c
        .train_model(
            &sci,
            &TrainRequest {
                dataset: "spam".into(),
                preprocess: vec![],
                features: e.digest.clone(),
                template: "logreg".into(),
                sets: vec![],
                split_seed: Some(4),
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
