//! The plugin registry: components stored by digest, with their inspection
//! result and approval. Approval belongs to a digest, so a plugin that
//! changes by one byte is a new, unapproved plugin.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::runtime::Inspection;
use crate::store::objects::Objects;
use crate::store::{Space, Storage, StoreError, WriteBatch};
use crate::types::{ConfigKey, PluginKind};

/// Errors of the registry.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The component was refused at inspection.
    #[error("the plugin was refused: {0}")]
    Refused(String),
    /// Already registered.
    #[error("plugin {0} is already registered")]
    Exists(String),
    /// Not registered.
    #[error("no plugin with digest {0}")]
    Unknown(String),
    /// A digest prefix matches several plugins.
    #[error("digest prefix {0} matches more than one plugin; give more digits")]
    Ambiguous(String),
    /// No registered plugin has this name.
    #[error("no registered plugin is named `{0}` (see `cloister plugin list`)")]
    UnknownName(String),
    /// The plugins of this name are of another kind.
    #[error("plugin `{name}` is a {is}, not a {wanted}")]
    WrongKind {
        /// The name given.
        name: String,
        /// What they are.
        is: &'static str,
        /// What the place needs.
        wanted: &'static str,
    },
    /// No plugin of this name is approved.
    #[error("plugin `{name}` is not approved (a reviewer must approve its digest {digest})")]
    NameNotApproved {
        /// The name given.
        name: String,
        /// The first 12 digits of one unapproved plugin of that name.
        digest: String,
    },
    /// Several approved plugins have this name.
    #[error("`{name}` names several approved plugins ({}): give a digest prefix", .digests.join(", "))]
    AmbiguousName {
        /// The name given.
        name: String,
        /// The first 12 digits of each approved plugin of that name.
        digests: Vec<String>,
    },
    /// Already approved.
    #[error("plugin {0} is already approved")]
    AlreadyApproved(String),
    /// A withdrawal of an approval that is not there.
    #[error("plugin {0} is not approved: there is no approval to withdraw")]
    NotApproved(String),
    /// Stored data is damaged.
    #[error("the registry entry of {0} is damaged")]
    Damaged(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who approved a plugin, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Reviewer.
    pub by: String,
    /// Time, ms since the epoch.
    pub time_ms: u64,
}

/// A registered plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEntry {
    /// Hex SHA-256 of the component bytes.
    pub digest: String,
    /// Name it declares.
    pub name: String,
    /// Version it declares.
    pub version: String,
    /// Kind.
    pub kind: PluginKind,
    /// Description it declares.
    pub description: String,
    /// Configuration keys it declares.
    pub config: Vec<ConfigKey>,
    /// Its imports (all within the sandbox allowlist, or it was refused).
    pub imports: Vec<String>,
    /// Size in bytes.
    pub size: usize,
    /// Who added it.
    pub added_by: String,
    /// When, ms since the epoch.
    pub added_ms: u64,
    /// The approval, once given.
    pub approval: Option<Approval>,
    /// Approvals given and then withdrawn, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withdrawn: Vec<Withdrawal>,
}

/// An approval taken back: the plugin runs nowhere until a reviewer
/// approves it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    /// The approval withdrawn.
    pub approval: Approval,
    /// Who withdrew it.
    pub by: String,
    /// When, ms since the epoch.
    pub time_ms: u64,
}

impl PluginEntry {
    /// The plugin as the policy engine sees it.
    pub fn resource(&self) -> crate::policy::Resource {
        crate::policy::Resource::Plugin {
            digest: self.digest.clone(),
            approved: self.approval.is_some(),
            added_by: self.added_by.clone(),
        }
    }
}

fn encode(e: &PluginEntry) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(e).map_err(|_| RegistryError::Damaged(e.digest.clone()))
}

/// Writes that register an inspected component. With an object store the
/// component's bytes go there (durably, under their digest) before the
/// writes are returned, and the store keeps only the entry; without one
/// they are part of the writes.
pub fn add(
    store: &dyn Storage,
    objects: Option<&Objects>,
    inspection: &Inspection,
    bytes: &[u8],
    by: &str,
) -> Result<(WriteBatch, PluginEntry), RegistryError> {
    if let Err(e) = &inspection.verdict {
        return Err(RegistryError::Refused(e.to_string()));
    }
    let meta = inspection
        .metadata
        .as_ref()
        .ok_or_else(|| RegistryError::Refused("no metadata".into()))?;
    let digest = inspection.digest.to_hex();
    if store.get(Space::Plugins, digest.as_bytes())?.is_some() {
        return Err(RegistryError::Exists(digest));
    }
    let entry = PluginEntry {
        digest: digest.clone(),
        name: meta.name.clone(),
        version: meta.version.clone(),
        kind: meta.kind,
        description: meta.description.clone(),
        config: meta.config.clone(),
        imports: inspection.imports.clone(),
        size: bytes.len(),
        added_by: by.to_string(),
        added_ms: crate::time::now_ms(),
        approval: None,
        withdrawn: Vec::new(),
    };
    let mut b = WriteBatch::new();
    b.put(Space::Plugins, digest.clone().into_bytes(), encode(&entry)?);
    match objects {
        Some(o) => {
            if o.put_bytes(bytes.to_vec(), true)? != digest {
                return Err(RegistryError::Damaged(digest));
            }
        }
        None => b.put(Space::PluginBlobs, digest.into_bytes(), bytes.to_vec()),
    }
    Ok((b, entry))
}

/// Finds a plugin by full digest or a unique prefix of at least 8 digits.
pub fn get(store: &dyn Storage, digest: &str) -> Result<PluginEntry, RegistryError> {
    let d = digest.to_ascii_lowercase();
    if d.len() < 8 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RegistryError::Unknown(digest.to_string()));
    }
    let mut found = store.scan(Space::Plugins, d.as_bytes());
    let first = found
        .next()
        .transpose()?
        .ok_or_else(|| RegistryError::Unknown(digest.to_string()))?;
    if found.next().is_some() {
        return Err(RegistryError::Ambiguous(digest.to_string()));
    }
    serde_json::from_slice(&first.1).map_err(|_| RegistryError::Damaged(d))
}

/// Whether `reference` reads as a digest (at least 8 hex digits) rather
/// than a plugin's name.
pub fn is_digest(reference: &str) -> bool {
    reference.len() >= 8 && reference.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Finds a plugin to run by full digest, a unique prefix of at least 8
/// digits (approved or not: the policy decides), or the name of exactly one *approved* plugin of `kind` (what
/// `plugin list` shows in its name column). A name never picks an
/// unapproved plugin, nor one of several approved versions: those need the
/// digest. Whatever the reference, the entry carries the full digest, which
/// is what a model's lineage records. (A digest's kind is checked when the
/// component is loaded.)
pub fn find(
    store: &dyn Storage,
    reference: &str,
    kind: Option<PluginKind>,
) -> Result<PluginEntry, RegistryError> {
    if is_digest(reference) {
        return get(store, reference);
    }
    // Shorter hex strings are names, or prefixes of too few digits to be
    // told apart by the digest alone.
    let hex = !reference.is_empty() && reference.bytes().all(|b| b.is_ascii_hexdigit());
    let prefix = reference.to_ascii_lowercase();
    let named: Vec<PluginEntry> = list(store)?
        .into_iter()
        .filter(|e| e.name == reference || (hex && e.digest.starts_with(&prefix)))
        .collect();
    let short = |e: &PluginEntry| e.digest.get(..12).unwrap_or(&e.digest).to_string();
    let Some(first) = named.first() else {
        return Err(RegistryError::UnknownName(reference.to_string()));
    };
    let of_kind: Vec<&PluginEntry> = named
        .iter()
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .collect();
    let Some(first_of_kind) = of_kind.first() else {
        return Err(RegistryError::WrongKind {
            name: reference.to_string(),
            is: first.kind.as_str(),
            wanted: kind.map_or("plugin", PluginKind::as_str),
        });
    };
    let mut approved: Vec<&PluginEntry> = of_kind
        .iter()
        .copied()
        .filter(|e| e.approval.is_some())
        .collect();
    match approved.len() {
        1 => Ok(approved.remove(0).clone()),
        0 => Err(RegistryError::NameNotApproved {
            name: reference.to_string(),
            digest: short(first_of_kind),
        }),
        _ => Err(RegistryError::AmbiguousName {
            name: reference.to_string(),
            digests: approved.iter().map(|e| short(e)).collect(),
        }),
    }
}

/// Whether the error is about a name (unknown, of another kind, not
/// approved, ambiguous) rather than a digest or the store.
pub fn is_name_error(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::UnknownName(_)
            | RegistryError::WrongKind { .. }
            | RegistryError::NameNotApproved { .. }
            | RegistryError::AmbiguousName { .. }
    )
}

/// Every registered plugin, by digest.
pub fn list(store: &dyn Storage) -> Result<Vec<PluginEntry>, RegistryError> {
    store
        .scan(Space::Plugins, b"")
        .map(|item| {
            let (k, v) = item?;
            serde_json::from_slice(&v)
                .map_err(|_| RegistryError::Damaged(String::from_utf8_lossy(&k).into_owned()))
        })
        .collect()
}

/// The component bytes of a registered plugin, checked against its digest:
/// from the store, or (registered with an object store) from the object
/// store, verified as they arrive.
pub fn bytes(
    store: &dyn Storage,
    objects: Option<&Objects>,
    entry: &PluginEntry,
) -> Result<Vec<u8>, RegistryError> {
    let b = match (
        store.get(Space::PluginBlobs, entry.digest.as_bytes())?,
        objects,
    ) {
        (Some(b), _) => b,
        (None, Some(o)) => o.get_bytes(&entry.digest, entry.size as u64)?,
        (None, None) => return Err(RegistryError::Damaged(entry.digest.clone())),
    };
    if crate::Digest::of(&b).to_hex() != entry.digest {
        return Err(RegistryError::Damaged(entry.digest.clone()));
    }
    Ok(b)
}

/// Withdraws the approval of the plugin `digest` (in full), by `by`;
/// returns the entry, unapproved, the withdrawal kept in its history.
pub fn withdraw(store: &dyn Storage, digest: &str, by: &str) -> Result<PluginEntry, RegistryError> {
    review(store, digest, |e| {
        let approval = e
            .approval
            .take()
            .ok_or_else(|| RegistryError::NotApproved(e.digest.clone()))?;
        e.withdrawn.push(Withdrawal {
            approval,
            by: by.to_string(),
            time_ms: crate::time::now_ms(),
        });
        Ok(())
    })
}

/// Records an approval of the plugin `digest` (in full) by `by`; returns
/// the approved entry.
pub fn approve(store: &dyn Storage, digest: &str, by: &str) -> Result<PluginEntry, RegistryError> {
    review(store, digest, |e| {
        if e.approval.is_some() {
            return Err(RegistryError::AlreadyApproved(e.digest.clone()));
        }
        e.approval = Some(Approval {
            by: by.to_string(),
            time_ms: crate::time::now_ms(),
        });
        Ok(())
    })
}

/// A review decision on the entry of `digest`: `decide` checks and changes
/// the entry as stored when the write lands, so of two decisions at once
/// one is refused or sees the other's result.
fn review(
    store: &dyn Storage,
    digest: &str,
    decide: impl Fn(&mut PluginEntry) -> Result<(), RegistryError>,
) -> Result<PluginEntry, RegistryError> {
    crate::store::update(store, &[(Space::Plugins, digest.as_bytes())], |values| {
        let bytes = values
            .first()
            .and_then(|v| v.as_deref())
            .ok_or_else(|| RegistryError::Unknown(digest.to_string()))?;
        let mut e: PluginEntry = serde_json::from_slice(bytes)
            .map_err(|_| RegistryError::Damaged(digest.to_string()))?;
        decide(&mut e)?;
        let mut b = WriteBatch::new();
        b.put(Space::Plugins, e.digest.clone().into_bytes(), encode(&e)?);
        Ok((b, e))
    })
}
