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
    /// Already approved.
    #[error("plugin {0} is already approved")]
    AlreadyApproved(String),
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

/// Records an approval of the plugin `digest` (in full) by `by`; returns
/// the approved entry.
pub fn approve(store: &dyn Storage, digest: &str, by: &str) -> Result<PluginEntry, RegistryError> {
    // Checked and changed on the entry as stored when the write lands: of
    // two approvals at once, one is refused.
    crate::store::update(store, &[(Space::Plugins, digest.as_bytes())], |values| {
        let bytes = values
            .first()
            .and_then(|v| v.as_deref())
            .ok_or_else(|| RegistryError::Unknown(digest.to_string()))?;
        let mut e: PluginEntry = serde_json::from_slice(bytes)
            .map_err(|_| RegistryError::Damaged(digest.to_string()))?;
        if e.approval.is_some() {
            return Err(RegistryError::AlreadyApproved(e.digest));
        }
        e.approval = Some(Approval {
            by: by.to_string(),
            time_ms: crate::time::now_ms(),
        });
        let mut b = WriteBatch::new();
        b.put(Space::Plugins, e.digest.clone().into_bytes(), encode(&e)?);
        Ok((b, e))
    })
}
