//! `cloister audit …`: read, verify, checkpoint, prove.

use crate::output::{say, say_part};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

use cloister_host::audit::{AuditFilter, AuditLog, Checkpoint, Decision, InclusionProof, Verdict};

use crate::session::{EXIT_TAMPERED, EnvArgs};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show entries, oldest first.
    Log {
        /// Only this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only this action.
        #[arg(long)]
        action: Option<String>,
        /// Only entries at or after this UTC time (YYYY-MM-DD or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only allow or deny.
        #[arg(long, value_parser = parse_decision)]
        decision: Option<Decision>,
        /// Only entries on this resource: env, audit, account:NAME,
        /// dataset:NAME, record:DATASET/ID, plugin:DIGEST, model:ID, job:ID,
        /// deployment:NAME, traffic:DEPLOYMENT/MODEL (or a uid as the log
        /// prints it, e.g. 'Model::"m-1"').
        #[arg(long)]
        resource: Option<String>,
        /// At most this many entries (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Verify the whole log. Exits 4 naming the first bad entry on any edit,
    /// deletion or reordering; with a saved checkpoint, also detects
    /// truncation and rollback. With --proof, checks an inclusion proof.
    Verify {
        /// A checkpoint saved earlier with `cloister audit checkpoint`.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// An inclusion proof saved from `cloister audit prove`.
        #[arg(long, conflicts_with = "checkpoint")]
        proof: Option<PathBuf>,
    },
    /// Sign and print a checkpoint, to keep outside the environment.
    Checkpoint {
        /// Also write it to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print an inclusion proof (JSON) for entry SEQ.
    Prove {
        /// The entry's sequence number.
        seq: u64,
    },
}

fn parse_decision(s: &str) -> Result<Decision, String> {
    match s {
        "allow" => Ok(Decision::Allow),
        "deny" => Ok(Decision::Deny),
        _ => Err("use allow or deny".into()),
    }
}

pub fn run(env: &EnvArgs, cmd: AuditCommand) -> Result<ExitCode> {
    // Auditors read the log while the environment works: beside a `serve`
    // on PostgreSQL, these commands append only their own audit entries.
    let s = env.reading_session()?;
    match cmd {
        AuditCommand::Log {
            actor,
            action,
            since,
            decision,
            resource,
            limit,
            json,
        } => {
            let since_ms = since
                .map(|t| cloister_host::time::parse_rfc3339(&t).map_err(anyhow::Error::msg))
                .transpose()?;
            let filter = AuditFilter {
                actor,
                action,
                since_ms,
                decision,
                resource: resource
                    .map(|r| cloister_host::policy::uid_of(&r).map_err(anyhow::Error::msg))
                    .transpose()?,
                from_seq: 0,
                limit,
            };
            for e in s.cloister.audit_log(&s.user, &filter)? {
                if json {
                    crate::output::json(&serde_json::to_string(&e)?);
                } else {
                    let roles = e.record.account.as_ref().map(|a| format!(" {}", a.text()));
                    say!(
                        "{:>6} {} {:<12} {:<5} {:<16} {}{} params={} [{}]",
                        e.seq,
                        cloister_host::time::rfc3339(e.time_ms),
                        e.record.actor,
                        e.record.decision.to_string(),
                        e.record.action,
                        e.record.resource,
                        roles.unwrap_or_default(),
                        &e.record.params[..12.min(e.record.params.len())],
                        e.record.policies.join(",")
                    );
                }
            }
        }
        AuditCommand::Verify { checkpoint, proof } => {
            if let Some(path) = proof {
                s.cloister.audit_verify(&s.user, None)?;
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let p: InclusionProof = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an inclusion proof", path.display()))?;
                let key = s.cloister.public_key();
                return match AuditLog::check_proof(&p, &key) {
                    Ok(cp) => {
                        say!(
                            "proof OK: entry {} is included in the log of {} entries signed at {}",
                            p.seq,
                            cp.size,
                            cloister_host::time::rfc3339(cp.time_ms)
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        say!("proof FAILED: {e}");
                        Ok(ExitCode::from(EXIT_TAMPERED))
                    }
                };
            }
            let cp = match &checkpoint {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Some(Checkpoint::parse(&text).with_context(|| format!("{}", path.display()))?)
                }
                None => None,
            };
            let code = match s.cloister.audit_verify(&s.user, cp.as_ref())? {
                Verdict::Intact {
                    size,
                    root,
                    checkpoints,
                } => {
                    say!(
                        "audit log OK: {size} entries, root {}, {checkpoints} signed checkpoints match",
                        hex::encode(root)
                    );
                    ExitCode::SUCCESS
                }
                Verdict::Tampered { first_bad, reason } => {
                    say!("audit log TAMPERED: first bad entry {first_bad}: {reason}");
                    ExitCode::from(EXIT_TAMPERED)
                }
            };
            return Ok(code);
        }
        AuditCommand::Checkpoint { out } => {
            let cp = s.cloister.audit_checkpoint(&s.user)?;
            if let Some(path) = out {
                std::fs::write(&path, cp.to_text())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            say_part!("{}", cp.to_text());
        }
        AuditCommand::Prove { seq } => {
            let p = s.cloister.audit_prove(&s.user, seq)?;
            crate::output::json(&serde_json::to_string_pretty(&p)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
