//! Bulk bytes in an object store, addressed by content.
//!
//! Dataset segments and model weights are written to the environment
//! directory first (synced, renamed into place) and then, when the
//! environment names an object store, copied there under
//! `sha256/XX/HEX` — the SHA-256 of the bytes. Their manifests, which
//! carry the digest, are committed only after the copy is durable. A
//! process that lacks a file locally (another machine sharing the store)
//! fetches it by digest; the bytes are hashed as they arrive and a file
//! whose digest differs is discarded, not used.
//!
//! Backends (the `object_store` crate): the local filesystem
//! (`file:///path`, e.g. a shared volume; objects are made private and
//! synced after they are written) and S3-compatible stores
//! (`s3://BUCKET/PREFIX`; credentials, region and endpoint from the
//! standard `AWS_*` environment variables, never from a file of the
//! environment). The only module that names `object_store`.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};

use cloister_types::digest::Digest;

use super::StoreError;

/// Bytes per part when uploading.
const PART: usize = 8 << 20;

/// An object store for bulk bytes. See the module docs.
pub struct Objects {
    rt: Option<tokio::runtime::Runtime>,
    store: Arc<dyn ObjectStore>,
    /// The directory of a `file://` store.
    root: Option<PathBuf>,
    url: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Objects({})", self.url)
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn engine(url: &str) -> impl Fn(object_store::Error) -> StoreError + '_ {
    move |e| StoreError::Engine(format!("object store {url}: {e}"))
}

/// The object name of content `sha256` (lower-case hex).
fn location(sha256: &str) -> Result<ObjectPath, StoreError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::Engine(format!(
            "`{sha256}` is not a SHA-256 digest"
        )));
    }
    Ok(ObjectPath::from(format!(
        "sha256/{}/{sha256}",
        &sha256[..2]
    )))
}

/// The object stored at `loc`; a missing object is named as missing.
async fn open_object(
    store: &dyn ObjectStore,
    loc: &ObjectPath,
    url: &str,
) -> Result<object_store::GetResult, StoreError> {
    match store.get(loc).await {
        Ok(got) => Ok(got),
        Err(object_store::Error::NotFound { .. }) => Err(StoreError::Engine(format!(
            "object store {url}: content {loc} is missing"
        ))),
        Err(e) => Err(engine(url)(e)),
    }
}

impl Objects {
    /// Opens the store at `url`: `file:///ABSOLUTE/PATH` (an existing
    /// private directory) or `s3://BUCKET[/PREFIX]` (reachable now).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::open_s3(url, rest);
        }
        let Some(path) = url.strip_prefix("file://") else {
            return Err(StoreError::Engine(format!(
                "objects: `{url}` is not a supported object store URL (file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX)"
            )));
        };
        let root = PathBuf::from(path);
        if !root.is_absolute() || !root.is_dir() {
            return Err(StoreError::Engine(format!(
                "objects: {url} is not an existing directory given by an absolute path"
            )));
        }
        // The objects are records and weights in the clear: the directory
        // must be closed to everyone but its owner, like the environment's.
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&root)?.permissions());
        if mode & 0o077 != 0 {
            return Err(StoreError::Engine(format!(
                "objects: {url} is open to other users (mode {:o}); make it private (chmod 700)",
                mode & 0o777
            )));
        }
        let store = LocalFileSystem::new_with_prefix(&root).map_err(engine(url))?;
        Ok(Self {
            rt: Some(Self::runtime()?),
            store: Arc::new(store),
            root: Some(root),
            url: url.to_string(),
        })
    }

    fn runtime() -> Result<tokio::runtime::Runtime, StoreError> {
        super::client_runtime("cloister-objects", 1)
    }

    fn open_s3(url: &str, rest: &str) -> Result<Self, StoreError> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Engine(format!(
                "objects: `{url}` names no bucket (s3://BUCKET/PREFIX)"
            )));
        }
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(engine(url))?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix.to_string()))
        };
        let me = Self {
            rt: Some(Self::runtime()?),
            store,
            root: None,
            url: url.to_string(),
        };
        // Fail now, not at the first import, when the bucket or the
        // credentials are wrong (a HEAD of an absent object cannot tell a
        // missing bucket from a missing object; a listing can).
        let store = Arc::clone(&me.store);
        let shown = url.to_string();
        me.wait(async move {
            store
                .list_with_delimiter(Some(&ObjectPath::from("sha256")))
                .await
                .map(|_| ())
                .map_err(engine(&shown))
        })?;
        Ok(me)
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Engine("the object store client stopped".into()))?;
        super::wait_on(rt, fut)
    }

    /// Whether content `sha256` is stored.
    pub fn contains(&self, sha256: &str) -> Result<bool, StoreError> {
        let loc = location(sha256)?;
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        self.wait(async move {
            match store.head(&loc).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(engine(&url)(e)),
            }
        })
    }

    /// Copies file `name` of `dir`, whose content has digest `sha256`, into
    /// the store, durably. The file is hashed as it is read; if it does not
    /// match `sha256` nothing is stored. Content already stored is not
    /// copied again.
    pub fn put_file(&self, dir: &Dir, name: &str, sha256: &str) -> Result<(), StoreError> {
        if self.contains(sha256)? {
            return Ok(());
        }
        let loc = location(sha256)?;
        let mut file = dir.open(name)?.into_std();
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        let want = sha256.to_string();
        let shown = name.to_string();
        self.wait(async move {
            let err = engine(&url);
            let mut upload = store.put_multipart(&loc).await.map_err(&err)?;
            let mut hasher = Digest::hasher();
            loop {
                let mut part = vec![0u8; PART];
                let mut filled = 0;
                while filled < PART {
                    let n = file.read(&mut part[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                part.truncate(filled);
                if part.is_empty() {
                    break;
                }
                hasher.update(&part);
                upload
                    .put_part(PutPayload::from(part))
                    .await
                    .map_err(&err)?;
            }
            if hasher.finish().to_hex() != want {
                let _ = upload.abort().await;
                return Err(StoreError::Corrupted(format!(
                    "{shown} does not have the digest its manifest records; not stored"
                )));
            }
            upload.complete().await.map_err(&err)?;
            Ok(())
        })?;
        self.finish_object(sha256, true)
    }

    /// Stores `bytes` under their digest, which is returned; `durable`
    /// waits until they survive a power loss (a `file://` store syncs
    /// them), which content that can be made again does not need. Content
    /// already stored is not written again.
    pub fn put_bytes(&self, bytes: Vec<u8>, durable: bool) -> Result<String, StoreError> {
        self.put_bytes_after(bytes, durable, &mut |_| Ok(()))
    }

    /// [`Objects::put_bytes`], calling `first` with the digest before
    /// anything is looked up or written (to record a claim on the object
    /// that must precede it); its error is returned and nothing written.
    pub fn put_bytes_after(
        &self,
        bytes: Vec<u8>,
        durable: bool,
        first: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<String, StoreError> {
        let sha256 = Digest::of(&bytes).to_hex();
        first(&sha256)?;
        if self.contains(&sha256)? {
            return Ok(sha256);
        }
        let loc = location(&sha256)?;
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        self.wait(async move {
            store
                .put(&loc, PutPayload::from(bytes))
                .await
                .map_err(engine(&url))?;
            Ok(())
        })?;
        self.finish_object(&sha256, durable)?;
        Ok(sha256)
    }

    /// Deletes content `sha256` (gone already is not an error). Only for
    /// content no one else can name: the store does not count references.
    pub fn delete(&self, sha256: &str) -> Result<(), StoreError> {
        let loc = location(sha256)?;
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        self.wait(async move {
            match store.delete(&loc).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(engine(&url)(e)),
            }
        })
    }

    /// The content with digest `sha256`, hashed after it arrived: content
    /// that does not match is reported as [`StoreError::Corrupted`], not
    /// returned. `limit` bounds the bytes read.
    pub fn get_bytes(&self, sha256: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let loc = location(sha256)?;
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        let bytes = self.wait(async move {
            use futures_util::StreamExt as _;
            let err = engine(&url);
            let mut stream = open_object(store.as_ref(), &loc, &url)
                .await?
                .into_stream();
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(&err)?;
                if (out.len() + chunk.len()) as u64 > limit {
                    return Err(StoreError::Corrupted(format!(
                        "object store {url}: content {loc} is larger than the {limit} bytes allowed; not used"
                    )));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        })?;
        if Digest::of(&bytes).to_hex() != sha256 {
            return Err(StoreError::Corrupted(format!(
                "object store {}: content {sha256} does not have its digest (changed in the store); not used",
                self.url
            )));
        }
        Ok(bytes)
    }

    /// Makes a stored object private (0600, its directories 0700: the
    /// filesystem backend creates them with the process's umask) and, when
    /// asked, durable (the backend does not sync what it writes).
    fn finish_object(&self, sha256: &str, durable: bool) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let Some(root) = &self.root else {
            // An S3 store has it durably when the upload completes.
            return Ok(());
        };
        let path = root.join("sha256").join(&sha256[..2]).join(sha256);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if durable {
            std::fs::File::open(&path)?.sync_all()?;
        }
        for dir in [path.parent(), path.parent().and_then(|p| p.parent())]
            .into_iter()
            .flatten()
        {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            if durable {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Fetches content `sha256` into file `name` of `dir` (written under a
    /// temporary name, synced, renamed into place). The bytes are hashed as
    /// they arrive; content that does not match is discarded and reported
    /// as [`StoreError::Corrupted`].
    pub fn fetch_to(&self, sha256: &str, dir: &Dir, name: &str) -> Result<(), StoreError> {
        let loc = location(sha256)?;
        let tmp = format!("{name}.fetch");
        let _ = dir.remove_file(&tmp);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let mut out = dir.open_with(&tmp, &opts)?.into_std();
        let store = Arc::clone(&self.store);
        let url = self.url.clone();
        let fetched = self.wait(async move {
            use futures_util::StreamExt as _;
            use std::io::Write as _;
            let err = engine(&url);
            let mut stream = open_object(store.as_ref(), &loc, &url).await?.into_stream();
            let mut hasher = Digest::hasher();
            while let Some(bytes) = stream.next().await {
                let bytes = bytes.map_err(&err)?;
                hasher.update(&bytes);
                out.write_all(&bytes)?;
            }
            out.sync_all()?;
            Ok(hasher.finish().to_hex())
        });
        let result = match fetched {
            Ok(got) if got == sha256 => dir.rename(&tmp, dir, name).map_err(StoreError::Io),
            Ok(_) => Err(StoreError::Corrupted(format!(
                "object store {}: the object stored for {name} does not have its digest (changed in the store); not used",
                self.url
            ))),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = dir.remove_file(&tmp);
        }
        result
    }
}
