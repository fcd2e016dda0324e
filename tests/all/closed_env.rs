//! The closed store, the policy engine and the audit log, through the
//! library (`Cloister`), as the CLI and the console use it.

use std::path::{Path, PathBuf};

use cloister_host::audit::{AuditFilter, AuditLog, Decision, Verdict};
use cloister_host::datasets::{self, Provenance};
use cloister_host::policy::Role;
use cloister_host::records::Schema;
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_host::store::{Space, WriteBatch};
use cloister_host::users::User;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub c: Cloister,
    pub admin: User,
    pub sci: User,
    pub lab: User,
    pub lab2: User,
    pub rev: User,
    pub appr: User,
    pub aud: User,
}

impl Env {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("env")
    }
}

pub fn env() -> Env {
    env_with("sled")
}

/// An environment on `store` (`sled` or a postgres:// URL) with one user
/// per role.
pub fn env_with(store: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (c, token) = Cloister::init_with(&dir.path().join("env"), "root", store).unwrap();
    let admin = c.authenticate(&token).unwrap();
    let add = |name: &str, role: Role| c.add_user(&admin, name, &[role]).unwrap().0;
    let sci = add("sci", Role::Scientist);
    let lab = add("lab", Role::Labeler);
    let lab2 = add("lab2", Role::Labeler);
    let rev = add("rev", Role::Reviewer);
    let appr = add("appr", Role::Approver);
    let aud = add("aud", Role::Auditor);
    Env {
        dir,
        c,
        admin,
        sci,
        lab,
        lab2,
        rev,
        appr,
        aud,
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            let label = if i % 3 == 0 { "null".to_string() } else { format!("\"c{}\"", i % 2) };
            format!("{{\"id\": \"r{i}\", \"text\": \"record number {i}\", \"label\": {label}, \"len\": {i}}}\n")
        })
        .collect()
}

fn opts() -> ImportOptions {
    ImportOptions::default()
}

fn space_len(c: &Cloister, space: Space) -> usize {
    c.env().store().scan(space, b"").count()
}

fn denied<T: std::fmt::Debug>(r: Result<T, ServiceError>) {
    match r {
        Err(ServiceError::Denied { .. }) => {}
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn an_import_with_a_bad_line_names_it_and_leaves_nothing_behind() {
    let e = env();
    let mut text = jsonl(20_000);
    text.push_str("{\"id\": \"bad\", \"text\": \"x\", \"label\": 7}\n");
    let f = write(e.dir.path(), "bad.jsonl", &text);
    let err =
        e.c.import_dataset(&e.sci, "ds", &f, &opts())
            .unwrap_err()
            .to_string();
    assert!(err.contains("bad.jsonl:20001: field `label`"), "{err}");

    let dup = format!("{}{}", jsonl(10), "{\"id\": \"r3\", \"text\": \"again\"}\n");
    let f = write(e.dir.path(), "dup.jsonl", &dup);
    let err =
        e.c.import_dataset(&e.sci, "ds", &f, &opts())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("dup.jsonl:11: field `id`: duplicate id \"r3\" (first at line 4;"),
        "{err}"
    );

    let f = write(
        e.dir.path(),
        "broken.jsonl",
        "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"text\"\n",
    );
    let err =
        e.c.import_dataset(&e.sci, "ds", &f, &opts())
            .unwrap_err()
            .to_string();
    assert!(err.contains("broken.jsonl:2: invalid JSON"), "{err}");

    let f = write(
        e.dir.path(),
        "noid.jsonl",
        "{\"id\": \"a\", \"text\": \"x\"}\n{\"text\": \"y\"}\n",
    );
    let err =
        e.c.import_dataset(&e.sci, "ds", &f, &opts())
            .unwrap_err()
            .to_string();
    assert!(err.contains("noid.jsonl:2: field `id`: missing"), "{err}");

    let f = write(e.dir.path(), "bad.csv", "id,text,len\n1,a,2\n2,b,two\n");
    let o = ImportOptions {
        schema: Schema {
            numeric_fields: Some(vec!["len".into()]),
            ..Schema::default()
        },
        ..opts()
    };
    let err =
        e.c.import_dataset(&e.sci, "ds", &f, &o)
            .unwrap_err()
            .to_string();
    assert_eq!(
        err,
        format!("{}:3: field `len`: not a finite number", f.display())
    );

    assert!(e.c.list_datasets(&e.sci).unwrap().is_empty());
    for space in [Space::Labels, Space::Imports, Space::Datasets] {
        assert_eq!(space_len(&e.c, space), 0, "{space:?} holds leftovers");
    }
    for dir in ["datasets", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(e.path().join(dir)).unwrap().collect();
        assert!(left.is_empty(), "{dir}/ holds leftovers: {left:?}");
    }
}

#[test]
fn versions_are_content_addressed_and_stats_are_aggregates_only() {
    let e = env();
    let f = write(e.dir.path(), "a.jsonl", &jsonl(300));
    let v1 = e.c.import_dataset(&e.sci, "ds", &f, &opts()).unwrap();
    let v2 = e.c.import_dataset(&e.sci, "ds", &f, &opts()).unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(v1.digest, v2.digest, "same content, same address");
    let g = write(e.dir.path(), "b.jsonl", &jsonl(301));
    let v3 = e.c.import_dataset(&e.sci, "ds", &g, &opts()).unwrap();
    assert_ne!(v3.digest, v1.digest);
    assert_eq!(v1.stats.records, 300);
    assert_eq!(v1.stats.unlabeled, 100);
    assert_eq!(v1.stats.labels.get("c0"), Some(&100));
    assert_eq!(v1.stats.fields["len"].present, 300);

    let (latest, splits) = e.c.dataset_stats(&e.sci, "ds", Some(7)).unwrap();
    assert_eq!(latest.version, 3);
    let splits = splits.unwrap();
    let total: u64 = splits.counts.values().map(|(l, u)| l + u).sum();
    assert_eq!(total, 301);
    let (again, _) = e.c.dataset_stats(&e.sci, "ds@1", None).unwrap();
    assert_eq!(again, v1);
    let shown = serde_json::to_string(&again).unwrap();
    assert!(
        !shown.contains("record number"),
        "statistics must not carry texts"
    );

    // CSV with the same fields.
    let csv: String = std::iter::once("id,text,label\n".to_string())
        .chain(
            (0..50).map(|i| format!("{i},\"text, {i}\",{}\n", if i % 2 == 0 { "a" } else { "" })),
        )
        .collect();
    let f = write(e.dir.path(), "c.csv", &csv);
    let v = e.c.import_dataset(&e.sci, "csvset", &f, &opts()).unwrap();
    assert_eq!((v.stats.records, v.stats.labeled), (50, 25));
}

#[test]
fn splits_are_deterministic_by_seed_and_keep_duplicates_together() {
    let e = env();
    let mut text = jsonl(2000);
    text.push_str("{\"id\": \"twin\", \"text\": \"record number 5\"}\n");
    let f = write(e.dir.path(), "a.jsonl", &text);
    let v = e.c.import_dataset(&e.sci, "ds", &f, &opts()).unwrap();
    let env = e.c.env();
    let split = |seed| -> Vec<_> {
        datasets::records(env, &v)
            .map(|r| r.map(|r| datasets::split_of(&r.record, seed)))
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(split(1), split(1));
    assert_ne!(split(1), split(2));
    let by_id = |id: &str, seed| {
        datasets::split_of(&datasets::get_record(env, &v, id).unwrap().record, seed)
    };
    for seed in 0..20 {
        assert_eq!(by_id("twin", seed), by_id("r5", seed));
    }
    let counts = datasets::split_counts(env, &v, 1).unwrap();
    let train = counts.counts[&datasets::Split::Train];
    let share = (train.0 + train.1) as f64 / 2001.0;
    assert!((0.76..0.84).contains(&share), "train share {share}");
}

#[test]
fn records_are_shown_only_to_their_assigned_labeler_and_labels_keep_provenance() {
    let e = env();
    let f = write(e.dir.path(), "a.jsonl", &jsonl(30));
    let v = e.c.import_dataset(&e.sci, "ds", &f, &opts()).unwrap();
    let store = e.c.env().store();
    store
        .commit(datasets::assign(e.c.env(), &v, "r0", "lab").unwrap())
        .unwrap();

    let seen = e.c.view_record(&e.lab, "ds", "r0").unwrap();
    assert_eq!(seen.record.text("text"), Some("record number 0"));
    for who in [&e.lab2, &e.admin, &e.sci, &e.aud, &e.rev] {
        denied(e.c.view_record(who, "ds", "r0"));
    }
    denied(e.c.view_record(&e.lab, "ds", "r1"));

    e.c.label_record(&e.lab, "ds", "r0", "c1").unwrap();
    denied(e.c.label_record(&e.lab2, "ds", "r0", "c0"));
    let r = datasets::get_record(e.c.env(), &v, "r0").unwrap();
    assert_eq!(r.labels.len(), 1);
    assert_eq!(
        r.labels[0].provenance,
        Provenance::Human { user: "lab".into() }
    );
    let gold = datasets::get_record(e.c.env(), &v, "r1").unwrap();
    assert_eq!(gold.labels[0].provenance, Provenance::Gold);

    // Every view is audited.
    let views =
        e.c.audit_log(
            &e.aud,
            &AuditFilter {
                action: Some("view_record".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        views
            .iter()
            .filter(|v| v.record.decision == Decision::Allow)
            .count(),
        1
    );
    assert_eq!(
        views
            .iter()
            .filter(|v| v.record.decision == Decision::Deny)
            .count(),
        6
    );
}

#[test]
fn export_is_denied_for_everyone_and_every_attempt_is_audited() {
    let e = env();
    let f = write(e.dir.path(), "a.jsonl", &jsonl(10));
    e.c.import_dataset(&e.sci, "ds", &f, &opts()).unwrap();
    for who in [&e.admin, &e.sci, &e.lab, &e.rev, &e.appr, &e.aud] {
        denied(e.c.export_dataset(who, "ds"));
    }
    let attempts =
        e.c.audit_log(
            &e.aud,
            &AuditFilter {
                action: Some("export_dataset".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(attempts.len(), 6);
    assert!(
        attempts
            .iter()
            .all(|a| a.record.decision == Decision::Deny
                && a.record.policies == ["no-dataset-export"])
    );
}

#[test]
fn a_plugin_runs_by_the_name_of_its_one_approved_version() {
    use cloister_host::types::PluginKind::{Featurizer, Selector};
    let e = env();
    let err = |r: Result<(cloister_host::registry::PluginEntry, Vec<u8>), ServiceError>| {
        r.unwrap_err().to_string()
    };
    let bytes = cloister_bundled_plugins::get("entropy").unwrap();
    let entry = e.c.add_plugin(&e.sci, bytes).unwrap();
    assert_eq!(
        err(e.c.plugin_for_run(&e.sci, "entropy", Some(Selector))),
        format!(
            "plugin `entropy` is not approved (a reviewer must approve its digest {})",
            &entry.digest[..12]
        )
    );
    e.c.approve_plugin(&e.rev, &entry.digest).unwrap();
    let (found, got) =
        e.c.plugin_for_run(&e.sci, "entropy", Some(Selector))
            .unwrap();
    assert_eq!(
        (found.digest.as_str(), got.as_slice()),
        (entry.digest.as_str(), bytes)
    );
    assert_eq!(
        err(e.c.plugin_for_run(&e.sci, "entropy", Some(Featurizer))),
        "plugin `entropy` is a selector, not a featurizer"
    );
    assert_eq!(
        err(e.c.plugin_for_run(&e.sci, "entropi", Some(Selector))),
        "no registered plugin is named `entropi` (see `cloister plugin list`)"
    );
    // A second approved version: the name no longer says which.
    let other = e.c.add_plugin(&e.sci, &one_byte_different(bytes)).unwrap();
    e.c.approve_plugin(&e.rev, &other.digest).unwrap();
    let msg = err(e.c.plugin_for_run(&e.sci, "entropy", Some(Selector)));
    assert!(
        msg.starts_with("`entropy` names several approved plugins (")
            && msg.contains(&entry.digest[..12])
            && msg.contains(&other.digest[..12]),
        "{msg}"
    );
    e.c.plugin_for_run(&e.sci, &other.digest[..12], Some(Selector))
        .unwrap();
    // Whoever may not list the plugins learns nothing from a name: a
    // denial, audited, as for an unknown digest.
    denied(e.c.plugin_for_run(&e.lab, "entropy", Some(Selector)));
    denied(e.c.plugin_for_run(&e.lab, "entropi", Some(Selector)));
    denied(e.c.show_plugin(&e.lab, "entropy"));
}

/// Appends a custom section: a valid component with a different digest.
fn one_byte_different(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.extend_from_slice(&[0, 3, 2, b'x', b'y']);
    b
}

#[test]
fn a_plugin_runs_only_under_an_approval_of_its_exact_digest() {
    let e = env();
    let bytes = cloister_bundled_plugins::get("entropy").unwrap();
    let entry = e.c.add_plugin(&e.sci, bytes).unwrap();
    denied(e.c.plugin_for_run(&e.sci, &entry.digest, None));
    denied(e.c.approve_plugin(&e.sci, &entry.digest));
    e.c.approve_plugin(&e.rev, &entry.digest).unwrap();
    let (_, got) = e.c.plugin_for_run(&e.sci, &entry.digest, None).unwrap();
    assert_eq!(got, bytes);

    let changed = one_byte_different(bytes);
    let other = e.c.add_plugin(&e.rev, &changed).unwrap();
    assert_ne!(other.digest, entry.digest);
    denied(e.c.plugin_for_run(&e.sci, &other.digest, None));
    denied(e.c.approve_plugin(&e.rev, &other.digest)); // no self-approval
    assert!(
        e.c.add_plugin(&e.sci, cloister_test_plugins::HOSTILE_NET)
            .unwrap_err()
            .to_string()
            .contains("refused")
    );
    assert_eq!(e.c.list_plugins(&e.rev).unwrap().len(), 2);
}

#[test]
fn disabled_users_lose_their_token_and_failed_logins_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let (_, token) = c.add_user(&admin, "x", &[Role::Scientist]).unwrap();
    assert_eq!(c.authenticate(&token).unwrap().name, "x");
    c.disable_user(&admin, "x").unwrap();
    assert!(matches!(c.authenticate(&token), Err(ServiceError::Auth(_))));
    assert!(matches!(
        c.authenticate("clt_nonsense"),
        Err(ServiceError::Auth(_))
    ));
    let fails = c
        .audit_log(
            &admin,
            &AuditFilter {
                action: Some("authenticate".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(fails.len(), 2);
    assert!(c.add_user(&admin, "Bad Name", &[Role::Admin]).is_err());
    assert!(
        c.add_user(&admin, "x", &[Role::Admin])
            .unwrap_err()
            .to_string()
            .contains("already exists")
    );
}

#[test]
fn accounts_change_roles_and_tokens_and_the_environment_keeps_an_active_admin() {
    accounts_change_roles_and_tokens_and_keep_an_active_admin(&env());
}

/// Account administration after `user add`: token rotation, enabling a
/// disabled account, granting and revoking roles — each refused, writing
/// nothing, when it does not apply, and never leaving the environment
/// without an active admin, not even when two admins disable each other at
/// the same moment. Shared with the PostgreSQL store's tests.
pub fn accounts_change_roles_and_tokens_and_keep_an_active_admin(e: &Env) {
    use cloister_host::users::UserError;
    let c = &e.c;
    let stored = |name: &str| cloister_host::users::get(c.env().store().as_ref(), name).unwrap();
    let user_err = |r: Result<User, ServiceError>| match r {
        Err(ServiceError::User(u)) => u.to_string(),
        other => panic!("{other:?}"),
    };
    let (_, ana_old) = c.add_user(&e.admin, "ana", &[Role::Scientist]).unwrap();

    // Only admins, and every attempt is audited before it takes effect.
    denied(c.rotate_token(&e.sci, "ana"));
    denied(c.enable_user(&e.sci, "ana"));
    denied(c.change_roles(&e.sci, "sci", true, &[Role::Admin]));
    denied(c.change_roles(&e.aud, "ana", false, &[Role::Scientist]));

    // A new token: the old one stops working at once. Admins give one to
    // anybody; a user replaces their own.
    let ana_mine = c
        .rotate_token(&c.authenticate(&ana_old).unwrap(), "ana")
        .unwrap();
    assert!(matches!(
        c.authenticate(&ana_old),
        Err(ServiceError::Auth(_))
    ));
    let ana_new = c.rotate_token(&e.admin, "ana").unwrap();
    assert!(matches!(
        c.authenticate(&ana_mine),
        Err(ServiceError::Auth(_))
    ));
    let ana_old = ana_mine;
    assert!(matches!(
        c.authenticate(&ana_old),
        Err(ServiceError::Auth(_))
    ));
    let ana = c.authenticate(&ana_new).unwrap();
    assert_eq!(ana.name, "ana");

    // Roles: effective at the next request. Auditors see who holds which.
    denied(c.list_users(&ana));
    assert_eq!(c.list_users(&e.aud).unwrap().len(), 8);
    let changed = c
        .change_roles(&e.admin, "ana", true, &[Role::Admin, Role::Reviewer])
        .unwrap();
    assert_eq!(
        changed.roles,
        vec![Role::Admin, Role::Scientist, Role::Reviewer]
    );
    let ana = c.authenticate(&ana_new).unwrap();
    assert_eq!(c.list_users(&ana).unwrap().len(), 8);
    let changed = c
        .change_roles(&e.admin, "ana", false, &[Role::Reviewer])
        .unwrap();
    assert_eq!(changed.roles, vec![Role::Admin, Role::Scientist]);

    // Changes that do not apply are refused and write nothing.
    let before = stored("sci");
    for (r, says) in [
        (
            c.change_roles(&e.admin, "sci", true, &[Role::Auditor, Role::Scientist]),
            "`sci` already has the `scientist` role",
        ),
        (
            c.change_roles(&e.admin, "sci", false, &[Role::Labeler]),
            "`sci` does not have the `labeler` role",
        ),
        (
            c.change_roles(&e.admin, "sci", false, &[Role::Scientist]),
            "that would leave `sci` without a role; to stop an account, use `user disable` (its history stays)",
        ),
        (
            c.change_roles(&e.admin, "sci", true, &[Role::Client]),
            "the `client` role cannot be combined with other roles: a client account only calls `predict`",
        ),
        (
            c.change_roles(&e.admin, "nobody", true, &[Role::Auditor]),
            "no user `nobody`",
        ),
    ] {
        assert_eq!(user_err(r), says);
    }
    assert_eq!(stored("sci"), before);

    // Disabling and enabling: a new token, the old one never again.
    let lab_token = c.rotate_token(&e.admin, "lab").unwrap();
    c.disable_user(&e.admin, "lab").unwrap();
    assert!(matches!(
        c.authenticate(&lab_token),
        Err(ServiceError::Auth(_))
    ));
    let err = c.disable_user(&e.admin, "lab").unwrap_err();
    assert!(
        matches!(&err, ServiceError::User(UserError::AlreadyDisabled(n)) if n == "lab"),
        "{err}"
    );
    let err = c.rotate_token(&e.admin, "lab").unwrap_err();
    assert_eq!(
        err.to_string(),
        "`lab` is disabled: `user enable` gives the account a new token"
    );
    let (lab, lab_new) = c.enable_user(&e.admin, "lab").unwrap();
    assert!(!lab.disabled);
    assert_eq!(c.authenticate(&lab_new).unwrap().name, "lab");
    assert!(matches!(
        c.authenticate(&lab_token),
        Err(ServiceError::Auth(_))
    ));
    let err = c.enable_user(&e.admin, "lab").unwrap_err();
    assert_eq!(err.to_string(), "`lab` is not disabled");

    // The last active admin can neither be disabled nor lose the role.
    c.change_roles(&e.admin, "ana", false, &[Role::Admin])
        .unwrap();
    let last = "`root` is the environment's only active admin: add or enable another admin first, so that somebody can still administer it";
    let before = stored("root");
    assert_eq!(
        c.disable_user(&e.admin, "root").unwrap_err().to_string(),
        last
    );
    c.change_roles(&e.admin, "root", true, &[Role::Auditor])
        .unwrap();
    let before_roles = stored("root");
    assert_eq!(
        user_err(c.change_roles(&e.admin, "root", false, &[Role::Admin])),
        last
    );
    assert_eq!(stored("root"), before_roles);
    assert_eq!(stored("root").token_sha256, before.token_sha256);

    // Two admins disabling each other at the same moment: one of the two
    // is refused, every time.
    let (_, bea) = c.add_user(&e.admin, "bea", &[Role::Admin]).unwrap();
    let bea = c.authenticate(&bea).unwrap();
    c.disable_user(&bea, "root").unwrap();
    c.change_roles(&bea, "ana", true, &[Role::Admin]).unwrap();
    let ana = c.authenticate(&ana_new).unwrap();
    for _ in 0..6 {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| c.disable_user(&ana, "bea"));
            let b = s.spawn(|| c.disable_user(&bea, "ana"));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_ne!(a.is_ok(), b.is_ok(), "{a:?} {b:?}");
        let refused = if a.is_ok() { b } else { a };
        assert!(
            matches!(refused, Err(ServiceError::User(UserError::LastAdmin(_)))),
            "{refused:?}"
        );
        let active: Vec<_> = c
            .list_users(if stored("ana").disabled { &bea } else { &ana })
            .unwrap()
            .into_iter()
            .filter(|u| u.roles.contains(&Role::Admin) && !u.disabled)
            .map(|u| u.name)
            .collect();
        assert_eq!(active.len(), 1, "{active:?}");
        let survivor = if active[0] == "ana" { &ana } else { &bea };
        let other = if active[0] == "ana" { "bea" } else { "ana" };
        c.enable_user(survivor, other).unwrap();
    }

    let audited = |action: &str| {
        c.audit_log(
            &e.admin,
            &AuditFilter {
                action: Some(action.into()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let rotations = audited("rotate_token");
    assert_eq!(rotations.len(), 5);
    assert_eq!(rotations[1].record.actor, "ana");
    assert_eq!(rotations[1].record.resource, "Account::\"ana\"");
    assert_eq!(
        rotations[1].record.policies,
        ["users-rotate-their-own-token"]
    );
    // The log says who was made what.
    let grants: Vec<_> = audited("change_roles")
        .into_iter()
        .filter(|r| r.record.decision == Decision::Allow && r.record.resource == "Account::\"ana\"")
        .map(|r| (r.record.actor, r.record.account.unwrap()))
        .collect();
    let facts = |granted: &[&str], revoked: &[&str]| cloister_host::audit::AccountFacts {
        granted: granted.iter().map(|r| r.to_string()).collect(),
        revoked: revoked.iter().map(|r| r.to_string()).collect(),
    };
    assert_eq!(
        grants,
        [
            ("root".to_string(), facts(&["admin", "reviewer"], &[])),
            ("root".to_string(), facts(&[], &["reviewer"])),
            ("root".to_string(), facts(&[], &["admin"])),
            ("bea".to_string(), facts(&["admin"], &[])),
        ]
    );
    let added = audited("add_user");
    let bea_added = added
        .iter()
        .find(|r| r.record.resource == "Account::\"bea\"")
        .unwrap();
    assert_eq!(bea_added.record.account, Some(facts(&["admin"], &[])));
    assert_eq!(
        rotations
            .iter()
            .filter(|r| r.record.decision == Decision::Deny)
            .count(),
        1
    );
    assert_eq!(audited("enable_user").len(), 1 + 2 + 6);
    assert_eq!(audited("change_roles").len(), 2 + 2 + 5 + 4);
}

/// Every admin locked out (here: the only admin's token lost): the
/// environment's owner makes an account an admin again without a token,
/// recorded before it takes effect; a client account or a malformed name
/// is refused with nothing recorded.
#[test]
fn a_locked_out_environment_gets_an_admin_back_from_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env");
    let (c, root) = Cloister::init(&path, "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    c.add_user(&admin, "svc", &[Role::Client]).unwrap();
    let (_, lea) = c.add_user(&admin, "lea", &[Role::Labeler]).unwrap();
    c.disable_user(&admin, "lea").unwrap();
    let _lost = c.rotate_token(&admin, "root").unwrap();
    assert!(matches!(c.authenticate(&root), Err(ServiceError::Auth(_))));
    let size = c.env().audit().size();
    drop(c);

    for (name, says) in [
        (
            "svc",
            "`svc` is a client account, which can be nothing else: name another account",
        ),
        (
            "Root",
            "invalid user name `Root`: use 1–64 of a-z 0-9 . _ - starting with a letter or digit",
        ),
    ] {
        let err = Cloister::recover_admin(&path, name).unwrap_err();
        assert_eq!(err.to_string(), says);
    }
    let token = Cloister::recover_admin(&path, "root").unwrap();
    let lea_admin = Cloister::recover_admin(&path, "lea").unwrap();
    let new_admin = Cloister::recover_admin(&path, "ops").unwrap();

    let c = Cloister::open(&path, "cli").unwrap();
    let root = c.authenticate(&token).unwrap();
    assert_eq!(root.roles, [Role::Admin]);
    let lea_now = c.authenticate(&lea_admin).unwrap();
    assert_eq!(lea_now.roles, [Role::Admin, Role::Labeler]);
    assert!(!lea_now.disabled);
    assert!(matches!(c.authenticate(&lea), Err(ServiceError::Auth(_))));
    assert_eq!(c.authenticate(&new_admin).unwrap().roles, [Role::Admin]);
    assert_eq!(c.list_users(&root).unwrap().len(), 4);

    let recovered = c
        .audit_log(
            &root,
            &AuditFilter {
                action: Some("recover_admin".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let seen: Vec<_> = recovered
        .iter()
        .map(|e| (e.seq, e.record.actor.as_str(), e.record.resource.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (size, "cloister", "Account::\"root\""),
            (size + 1, "cloister", "Account::\"lea\""),
            (size + 2, "cloister", "Account::\"ops\""),
        ],
        "the refusals recorded nothing"
    );
    assert_eq!(
        recovered[0].record.account.as_ref().unwrap().text(),
        "+admin"
    );
    assert!(matches!(
        c.env().audit().verify(None).unwrap(),
        Verdict::Intact { .. }
    ));
}

// ---------------------------------------------------------------- audit --

fn raw_entry(c: &Cloister, seq: u64) -> Vec<u8> {
    c.env()
        .store()
        .get(Space::Audit, &seq.to_be_bytes())
        .unwrap()
        .unwrap()
}

fn put_raw(c: &Cloister, seq: u64, value: Option<Vec<u8>>) {
    let mut b = WriteBatch::new();
    match value {
        Some(v) => b.put(Space::Audit, seq.to_be_bytes().to_vec(), v),
        None => b.delete(Space::Audit, seq.to_be_bytes().to_vec()),
    }
    c.env().store().commit(b).unwrap();
}

fn tampered_at(c: &Cloister) -> (u64, String) {
    match c.env().audit().verify(None).unwrap() {
        Verdict::Tampered { first_bad, reason } => (first_bad, reason),
        v => panic!("tampering not detected: {v:?}"),
    }
}

fn busy_env() -> Env {
    let e = env();
    for _ in 0..10 {
        e.c.list_datasets(&e.sci).unwrap();
    }
    e
}

#[test]
fn an_untouched_log_verifies_and_proves_inclusion() {
    let e = busy_env();
    match e.c.audit_verify(&e.aud, None).unwrap() {
        Verdict::Intact { size, .. } => assert!(size >= 18, "{size}"),
        v => panic!("{v:?}"),
    }
    let proof = e.c.audit_prove(&e.aud, 5).unwrap();
    let key = e.c.env().audit().public_key();
    AuditLog::check_proof(&proof, &key).unwrap();
    let mut forged = proof.clone();
    forged.entry = forged.entry.replacen("\"time_ms\":", "\"time_ms\":1", 1);
    assert_ne!(forged.entry, proof.entry);
    assert!(AuditLog::check_proof(&forged, &key).is_err());
    denied(e.c.audit_log(&e.sci, &AuditFilter::default()));
    denied(e.c.audit_verify(&e.lab, None));
}

#[test]
fn editing_an_entry_is_detected_and_named() {
    let e = busy_env();
    let mut v = raw_entry(&e.c, 9);
    let text = String::from_utf8_lossy(&v[32..]).replace("\"sci\"", "\"aud\"");
    v.truncate(32);
    v.extend_from_slice(text.as_bytes());
    put_raw(&e.c, 9, Some(v));
    let (at, why) = tampered_at(&e.c);
    assert_eq!(at, 9, "{why}");
    assert!(why.contains("modified"), "{why}");
}

#[test]
fn editing_the_last_entry_is_detected() {
    let e = busy_env();
    let last = e.c.env().audit().size() - 1;
    let mut v = raw_entry(&e.c, last);
    v[40] ^= 1;
    put_raw(&e.c, last, Some(v));
    assert_eq!(tampered_at(&e.c).0, last);
}

#[test]
fn deleting_an_entry_is_detected_and_named() {
    let e = busy_env();
    put_raw(&e.c, 7, None);
    let (at, why) = tampered_at(&e.c);
    assert_eq!(at, 7, "{why}");
    assert!(why.contains("missing"), "{why}");
}

#[test]
fn swapping_two_entries_is_detected_and_named() {
    let e = busy_env();
    let (a, b) = (raw_entry(&e.c, 4), raw_entry(&e.c, 5));
    put_raw(&e.c, 4, Some(b));
    put_raw(&e.c, 5, Some(a));
    let (at, why) = tampered_at(&e.c);
    assert_eq!(at, 4, "{why}");
}

#[test]
fn truncating_the_log_is_detected_and_the_environment_fails_closed() {
    let e = busy_env();
    let size = e.c.env().audit().size();
    for seq in size - 3..size {
        put_raw(&e.c, seq, None);
    }
    let (at, why) = tampered_at(&e.c);
    assert_eq!(at, size - 3, "{why}");
    let path = e.path();
    let sci = e.sci.clone();
    drop(e.c);
    let reopened = Cloister::open(&path, "cli").unwrap();
    // Nothing can be done: every operation needs an audit append.
    let err = reopened.list_datasets(&sci).unwrap_err();
    assert!(matches!(err, ServiceError::Audit(_)), "{err}");
    assert!(matches!(
        reopened.env().audit().verify(None).unwrap(),
        Verdict::Tampered { .. }
    ));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn restoring_an_older_copy_of_the_store_is_caught_by_a_saved_checkpoint() {
    let e = busy_env();
    let path = e.path();
    let (sci, aud) = (e.sci.clone(), e.aud.clone());
    drop(e.c);
    let backup = e.dir.path().join("old-store");
    copy_dir(&path.join("store"), &backup);

    let c = Cloister::open(&path, "cli").unwrap();
    for _ in 0..5 {
        c.list_datasets(&sci).unwrap();
    }
    let saved = c.audit_checkpoint(&aud).unwrap().to_text();
    drop(c);

    std::fs::remove_dir_all(path.join("store")).unwrap();
    copy_dir(&backup, &path.join("store"));
    let c = Cloister::open(&path, "cli").unwrap();
    // The old copy is internally consistent…
    assert!(matches!(
        c.env().audit().verify(None).unwrap(),
        Verdict::Intact { .. }
    ));
    // …but it does not extend the checkpoint kept outside.
    let cp = cloister_host::audit::Checkpoint::parse(&saved).unwrap();
    match c.env().audit().verify(Some(&cp)).unwrap() {
        Verdict::Tampered { reason, .. } => assert!(reason.contains("rollback"), "{reason}"),
        v => panic!("rollback not detected: {v:?}"),
    }
}

#[test]
fn concurrent_appends_get_distinct_contiguous_numbers_and_verify() {
    let e = env();
    let start = e.c.env().audit().size();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    e.c.list_datasets(&e.sci).unwrap();
                }
            });
        }
    });
    assert_eq!(e.c.env().audit().size(), start + 800);
    match e.c.env().audit().verify(None).unwrap() {
        Verdict::Intact {
            size, checkpoints, ..
        } => {
            assert_eq!(size, start + 800);
            assert_eq!(
                checkpoints, 0,
                "first stored checkpoint comes at 1024 entries"
            );
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn concurrent_imports_of_one_dataset_get_distinct_versions_and_lose_none() {
    let e = env();
    let files: Vec<PathBuf> = (0..8)
        .map(|i| write(e.dir.path(), &format!("d{i}.jsonl"), &jsonl(20 + i)))
        .collect();
    // Straight to the import (as two processes would run it: no lock in
    // between), then through the service, all at once.
    let imported = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let e = &e;
                s.spawn(move || {
                    if i % 2 == 0 {
                        let mut source = datasets::open_source(f, None, Schema::default()).unwrap();
                        datasets::import(e.c.env(), "d", source.as_mut(), "id", "sci").unwrap()
                    } else {
                        e.c.import_dataset(&e.sci, "d", f, &opts()).unwrap()
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut versions: Vec<u32> = imported.iter().map(|v| v.version).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>(), "one number each");
    let mut ids: Vec<u64> = imported.iter().map(|v| v.import_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8, "one import id each");
    // Every import's manifest is the one stored under its number, and its
    // records read back.
    for v in &imported {
        let stored = datasets::resolve(e.c.env(), &format!("d@{}", v.version)).unwrap();
        assert_eq!(
            (&stored.digest, &stored.segment_sha256, stored.import_id),
            (&v.digest, &v.segment_sha256, v.import_id)
        );
        assert_eq!(stored.stats.records, v.stats.records);
    }
    let listed = e.c.list_datasets(&e.sci).unwrap();
    assert_eq!(listed.iter().filter(|v| v.name == "d").count(), 8);
}

#[test]
fn whoever_the_policies_refuse_learns_nothing_about_what_exists_and_is_on_the_record() {
    let e = env();
    // Things that exist: a dataset with a record, a plugin.
    let data = write(e.dir.path(), "d.jsonl", &jsonl(20));
    e.c.import_dataset(&e.sci, "d", &data, &opts()).unwrap();
    let plugin =
        e.c.add_plugin(
            &e.sci,
            cloister_bundled_plugins::get("text-normalize").unwrap(),
        )
        .unwrap();
    let ghost = "0".repeat(64);
    let denials = |actor: &str| {
        e.c.env()
            .audit()
            .query(&AuditFilter {
                actor: Some(actor.into()),
                decision: Some(cloister_host::audit::Decision::Deny),
                ..AuditFilter::default()
            })
            .unwrap()
            .len()
    };
    // A labeler asking about models, jobs, plugins and records that do or
    // do not exist: the same audited denial every time.
    let before = denials("lab");
    denied(e.c.show_model(&e.lab, "m-000000000000"));
    denied(e.c.predict(&e.lab, "m-000000000000", &[]));
    denied(e.c.request_release(&e.lab, "m-000000000000", "why"));
    denied(e.c.show_job(&e.lab, "j-nope"));
    denied(e.c.cancel_job(&e.lab, "j-nope"));
    denied(e.c.run_job(&e.lab, "j-nope", &mut |_| {}));
    denied(e.c.approve_plugin(&e.lab, &ghost));
    denied(e.c.approve_plugin(&e.lab, &plugin.digest));
    denied(e.c.plugin_for_run(&e.lab, &ghost, None));
    denied(e.c.view_record(&e.lab, "no-such-dataset", "r0"));
    denied(e.c.view_record(&e.lab, "d", "r0"));
    denied(e.c.label_record(&e.lab, "no-such-dataset", "r0", "a"));
    assert_eq!(denials("lab"), before + 12, "every refusal is audited");
    // Whoever the policies allow hears what is missing.
    for r in [
        e.c.show_model(&e.sci, "m-000000000000").map(|_| ()),
        e.c.show_job(&e.sci, "j-nope").map(|_| ()),
        e.c.approve_plugin(&e.rev, &ghost).map(|_| ()),
    ] {
        let err = r.unwrap_err();
        assert!(
            !matches!(err, ServiceError::Denied { .. }),
            "an allowed caller is told what is missing: {err}"
        );
    }
}
