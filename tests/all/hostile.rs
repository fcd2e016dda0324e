//! Plugins written as an attacker would write them. Each attack ends in the
//! documented typed error or refusal, the host stays alive, and a fresh
//! instance still works.

use std::time::{Duration, Instant};

use crate::support::*;
use cloister_host::runtime::{Limit, Limits, OutputViolation, Runtime, RuntimeError, TrapKind};
use cloister_host::types::ErrorCode;
use cloister_test_plugins::{HOSTILE, HOSTILE_FS, HOSTILE_NET, HOSTILE_PRE, HOSTILE_SELECT};

fn attack(name: &str, limits: &Limits) -> Result<cloister_host::types::SparseBatch, RuntimeError> {
    attack_on(runtime(), name, limits)
}

fn attack_on(
    rt: &Runtime,
    name: &str,
    limits: &Limits,
) -> Result<cloister_host::types::SparseBatch, RuntimeError> {
    let p = rt.load(HOSTILE).unwrap();
    let mut inst = p.instantiate(rt, &cfg(&[("attack", name)]), limits)?;
    let result = inst.featurize(&[text("r1", "hello"), text("r2", "world")]);
    if result.is_err() && !matches!(result, Err(RuntimeError::Plugin { .. })) {
        assert!(
            inst.is_discarded(),
            "{name}: a failed instance is discarded"
        );
        assert_eq!(code(inst.featurize(&[text("r3", "again")])), "discarded");
    }
    // The host is alive and a fresh instance works.
    let mut fresh = p
        .instantiate(rt, &cfg(&[("attack", "none")]), limits)
        .unwrap();
    let ok = fresh.featurize(&[text("r", "fine")]).unwrap();
    assert_eq!(ok.values, vec![4.0]);
    result
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let err = attack("loop", &tight()).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::LimitExceeded(Limit::Fuel {
                budget: 300_000_000
            })
        ),
        "{err:?}"
    );
}

#[test]
fn infinite_loop_hits_the_wall_clock_timeout_without_fuel() {
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..tight()
    };
    let started = Instant::now();
    let err = attack_on(runtime_without_fuel(), "loop", &limits).unwrap_err();
    assert!(
        matches!(err, RuntimeError::LimitExceeded(Limit::Timeout { .. })),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn memory_bomb_hits_the_memory_cap() {
    let err = attack("memory", &tight()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::LimitExceeded(Limit::Memory { bytes }) if bytes == 64 * 1024 * 1024),
        "{err:?}"
    );
}

#[test]
fn deep_recursion_traps() {
    let err = attack("recursion", &tight()).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Trap(ref k)
                if matches!(k.for_admin_log(), TrapKind::MemoryOutOfBounds | TrapKind::StackOverflow)
        ),
        "{err:?}"
    );
}

#[test]
fn panic_traps_and_its_message_stays_in_the_admin_log() {
    let p = load(HOSTILE);
    let mut inst = p
        .instantiate(runtime(), &cfg(&[("attack", "panic")]), &tight())
        .unwrap();
    let err = inst.featurize(&[text("a", "b")]).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Trap(k) if *k.for_admin_log() == TrapKind::Panic),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains("on purpose"),
        "plugin text never reaches the error"
    );
    let (log, _) = inst.take_log();
    assert!(String::from_utf8_lossy(&log).contains("hostile plugin panics on purpose"));
}

#[test]
fn environment_args_and_cwd_are_empty() {
    let out = attack("env", &tight()).unwrap();
    assert_eq!(out.indices, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    // vars, args, HOME/PATH found; cwd is "/" (length 1) at most.
    for row in 0..2 {
        let (_, v) = out.row(row);
        assert_eq!(&v[..3], &[0.0, 0.0, 0.0]);
        assert!(v[3] <= 1.0);
    }
}

#[test]
fn clock_is_frozen_and_randomness_is_deterministic() {
    let out = attack("clock", &tight()).unwrap();
    assert_eq!(
        out.values,
        vec![1.0, 1.0],
        "wall clock reads the Unix epoch"
    );
    let a = attack("random", &tight()).unwrap();
    let b = attack("random", &tight()).unwrap();
    assert_eq!(a, b, "same plugin, same randomness");
}

#[test]
fn stderr_flood_is_bounded() {
    let p = load(HOSTILE);
    let mut inst = p
        .instantiate(runtime(), &cfg(&[("attack", "stderr-flood")]), &tight())
        .unwrap();
    inst.featurize(&[text("a", "b")]).unwrap();
    let (log, dropped) = inst.take_log();
    assert_eq!(log.len(), 16 * 1024, "the log keeps exactly its cap");
    assert!(dropped > 20_000_000, "{dropped}");
}

#[test]
fn huge_output_hits_the_output_cap() {
    let limits = Limits {
        memory_bytes: 256 * 1024 * 1024,
        fuel: 5_000_000_000,
        ..tight()
    };
    let err = attack("huge-output", &limits).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::LimitExceeded(Limit::Output { limit: 1048576 })
        ),
        "{err:?}"
    );
}

#[test]
fn trap_halfway_through_a_batch_yields_no_partial_output() {
    let p = load(HOSTILE);
    let mut records: Vec<_> = (0..1000).map(|i| text(&format!("r{i}"), "fine")).collect();
    records[500] = text("r500", "trap");
    let runner = p
        .runner(runtime(), &cfg(&[("attack", "trap-on-marker")]), tight())
        .unwrap()
        .batch_size(100)
        .workers(2);
    let err = runner.featurize(&records).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Trap(k) if *k.for_admin_log() == TrapKind::Panic),
        "{err:?}"
    );
    // Without the marker the same run succeeds on fresh instances.
    records[500] = text("r500", "fine");
    let ok = runner.featurize(&records).unwrap();
    assert_eq!(ok.rows(), 1000);
}

#[test]
fn garbage_output_is_rejected() {
    for (name, expect) in [
        (
            "wrong-count",
            OutputViolation::WrongCount {
                expected: 2,
                got: 1,
            },
        ),
        ("nan", OutputViolation::NonFinite { row: 0 }),
        ("infinite", OutputViolation::NonFinite { row: 0 }),
        (
            "out-of-range",
            OutputViolation::IndexOutOfRange {
                row: 0,
                index: 1 << 20,
                dimension: 1 << 20,
            },
        ),
    ] {
        match attack(name, &tight()) {
            Err(e @ RuntimeError::InvalidOutput(_)) => {
                let RuntimeError::InvalidOutput(v) = &e else {
                    unreachable!()
                };
                assert_eq!(*v.for_admin_log(), expect, "{name}");
                // The user-facing text is the fixed sentence: no row, index,
                // count or dimension the plugin chose.
                let text = e.to_string();
                assert!(!text.chars().any(|c| c.is_ascii_digit()), "{name}: {text}");
                assert!(!format!("{e:?}").contains("1048576"), "{name}: {e:?}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn exit_is_reported_as_exit() {
    assert_eq!(code(attack("exit", &tight())), "exited");
}

#[test]
fn plugin_text_and_undeclared_keys_never_reach_users() {
    match attack("bad-config-key", &tight()) {
        Err(e @ RuntimeError::Plugin { .. }) => {
            let RuntimeError::Plugin { code, key, .. } = &e else {
                unreachable!()
            };
            assert_eq!(*code.for_admin_log(), ErrorCode::InvalidConfig);
            assert_eq!(*key.for_admin_log(), None, "undeclared keys are dropped");
            assert!(!e.to_string().contains("secret-key-name"));
            assert!(!format!("{e:?}").contains("secret-key-name"));
        }
        other => panic!("{other:?}"),
    }
    let p = load(HOSTILE);
    let mut inst = p
        .instantiate(
            runtime(),
            &cfg(&[("attack", "error-with-secret")]),
            &tight(),
        )
        .unwrap();
    let err = inst
        .featurize(&[text("a", "TOP-SECRET-RECORD")])
        .unwrap_err();
    assert!(!err.to_string().contains("TOP-SECRET"));
    assert!(
        String::from_utf8_lossy(&inst.take_log().0).contains("TOP-SECRET"),
        "the detail is in the admin log"
    );
}

#[test]
fn network_and_filesystem_plugins_are_refused_at_load() {
    match runtime().load(HOSTILE_NET) {
        Err(RuntimeError::ForbiddenImports(imports)) => {
            for wanted in [
                "wasi:sockets/tcp@",
                "wasi:sockets/ip-name-lookup@",
                "wasi:sockets/udp@",
            ] {
                assert!(
                    imports.iter().any(|i| i.starts_with(wanted)),
                    "{wanted} in {imports:?}"
                );
            }
            assert!(
                imports.iter().all(|i| i.starts_with("wasi:sockets/")),
                "{imports:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    match runtime().load(HOSTILE_FS) {
        Err(e @ RuntimeError::ForbiddenImports(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("wasi:filesystem/types@0.2"), "{msg}");
            assert!(msg.contains("wasi:filesystem/preopens@0.2"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn preprocessor_rule_breaking_is_rejected() {
    let p = load(HOSTILE_PRE);
    let batch = [text("a", "x"), text("b", "y")];
    for (name, expect) in [
        ("invent-id", "invalid-output"),
        ("duplicate", "invalid-output"),
        ("reorder", "invalid-output"),
        ("set-label", "invalid-output"),
    ] {
        let mut inst = p
            .instantiate(runtime(), &cfg(&[("attack", name)]), &tight())
            .unwrap();
        assert_eq!(code(inst.preprocess(&batch)), expect, "{name}");
    }
    // Labels are withheld from preprocessors.
    let mut labelled = text("a", "x");
    labelled.label = Some("spam".into());
    let mut inst = p
        .instantiate(runtime(), &cfg(&[("attack", "peek-label")]), &tight())
        .unwrap();
    let out = inst.preprocess(&[labelled]).unwrap();
    assert_eq!(out[0].text("labels_seen"), Some("0"));
}

#[test]
fn selector_rule_breaking_is_rejected() {
    let p = load(HOSTILE_SELECT);
    let classes = vec!["a".to_string(), "b".to_string()];
    let items = [
        cloister_host::types::PredictionSet {
            id: "x".into(),
            models: vec![vec![0.5, 0.5]],
        },
        cloister_host::types::PredictionSet {
            id: "y".into(),
            models: vec![vec![0.5, 0.5]],
        },
    ];
    for name in ["wrong-count", "swap-ids", "bad-class", "nan-priority"] {
        let mut inst = p
            .instantiate(runtime(), &cfg(&[("attack", name)]), &tight())
            .unwrap();
        assert_eq!(
            code(inst.select(&classes, &items)),
            "invalid-output",
            "{name}"
        );
    }
}
