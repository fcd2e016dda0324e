//! A featurizer that attacks the host. The `attack` config key picks what it
//! does when asked to featurize; `none` behaves. Where an attack could leak
//! something, the plugin reports what it obtained as feature values, so the
//! tests can assert that nothing was obtained.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::print_stderr,
    clippy::print_stdout,
    unconditional_recursion
)]

use cloister_plugin_sdk::{Config, ConfigKey, Features, Featurizer, Plugin, PluginError, Record};
use std::hash::BuildHasher;

#[derive(Debug)]
pub struct Hostile {
    attack: String,
}

impl Plugin for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Attacks the host (test only)";

    fn config_keys() -> Vec<ConfigKey> {
        vec![ConfigKey::new("attack", "none", "which attack to run")]
    }

    fn configure(config: &Config) -> Result<Self, PluginError> {
        Ok(Hostile {
            attack: config.get_str("attack")?.to_string(),
        })
    }
}

#[inline(never)]
fn recurse(depth: u64, pad: &mut [u8; 1024]) -> u64 {
    pad[(depth % 1024) as usize] = depth as u8;
    let mut local = [0u8; 1024];
    local[0] = pad[0];
    std::hint::black_box(&mut local);
    recurse(depth + 1, &mut local) + u64::from(local[1])
}

impl Featurizer for Hostile {
    fn dimension(&self) -> u32 {
        1 << 20
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        match self.attack.as_str() {
            "none" => out.push(0, record.text("text").map_or(0, str::len) as f32),
            "loop" => loop {
                std::hint::black_box(0u64);
            },
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 * 1024 * 1024]);
                    std::hint::black_box(&hoard);
                }
            }
            "recursion" => {
                let mut pad = [0u8; 1024];
                out.push(0, recurse(0, &mut pad) as f32);
            }
            "panic" => panic!("hostile plugin panics on purpose"),
            "trap-on-marker" => {
                if record.text("text") == Some("trap") {
                    panic!("trap in the middle of a batch");
                }
                out.push(0, 1.0);
            }
            "env" => {
                let vars = std::env::vars().count();
                let args = std::env::args().count();
                let home =
                    std::env::var("HOME").is_ok() as u32 + std::env::var("PATH").is_ok() as u32;
                let cwd = std::env::current_dir()
                    .map(|p| p.as_os_str().len())
                    .unwrap_or(0);
                out.push(0, vars as f32);
                out.push(1, args as f32);
                out.push(2, home as f32);
                out.push(3, cwd as f32);
            }
            "clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(-1.0);
                out.push(0, now as f32 + 1.0);
            }
            "random" => {
                let h = std::collections::hash_map::RandomState::new().hash_one(42u64);
                out.push(0, (h & 0xffff) as f32 + 1.0);
                out.push(1, ((h >> 16) & 0xffff) as f32 + 1.0);
            }
            "stderr-flood" => {
                let line = "flood ".repeat(1000);
                for _ in 0..2000 {
                    eprintln!("{line}");
                    println!("{line}");
                }
                out.push(0, 1.0);
            }
            "huge-output" => {
                for i in 0..1_000_000u32 {
                    out.push(i, 1.0);
                }
            }
            "nan" => out.push(3, f32::NAN),
            "infinite" => out.push(3, f32::INFINITY),
            "out-of-range" => out.push(1 << 20, 1.0),
            "exit" => std::process::exit(3),
            "bad-config-key" => {
                return Err(PluginError::invalid_config(
                    "secret-key-name",
                    "not declared",
                ));
            }
            "error-with-secret" => {
                return Err(PluginError::invalid_input(format!(
                    "leaking record text: {}",
                    record.text("text").unwrap_or_default()
                )));
            }
            other => {
                return Err(PluginError::invalid_config(
                    "attack",
                    format!("unknown attack {other}"),
                ));
            }
        }
        Ok(())
    }

    fn featurize_batch(&mut self, batch: &[Record], out: &mut Features) -> Result<(), PluginError> {
        if self.attack == "wrong-count" {
            for _ in 1..batch.len() {
                out.end_row();
            }
            return Ok(());
        }
        for record in batch {
            self.featurize(record, out)?;
            out.end_row();
        }
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(Hostile);
