//! Object stores (`s3://`, `gs://`, `az://`, read-only `http(s)://`) behind the
//! synchronous [`Storage`] trait, on `object_store`.
//!
//! The engine's readers and writers are plain threads, so every call runs on a
//! private tokio runtime and the caller waits on a channel: this works from any
//! thread, including those of another runtime (the gRPC worker's). Credentials
//! and endpoints come from the environment the standard way for each cloud
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`); transient failures (5xx, timeouts, resets)
//! are retried by `object_store` with exponential backoff and jitter, permanent
//! ones (403, 404) fail at once with the URL.
//!
//! - A range read is one GET; a range larger than [`PART`] is split into parts
//!   fetched concurrently, at most [`concurrency`] at a time per read.
//! - A streamed write is a multipart upload of [`PART`]-sized parts uploaded
//!   concurrently; the object appears when the upload completes, and an
//!   abandoned upload is aborted.
//! - Idempotent requests (reads, listings, plain PUTs, deletes) whose transfer
//!   breaks off in a way `object_store` does not retry (a body cut off by a
//!   dropped connection) are sent again a few times ([`idempotent`]);
//!   conditional writes and multipart uploads are not.

use super::{overrides, ObjectWriter, Storage, StorageError};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// Size of the parts of large reads and of multipart uploads.
pub const PART: usize = 16 << 20;

/// Concurrent requests per large read or upload (`FLEETMERGE_IO_CONCURRENCY`, default 8).
pub fn concurrency() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("FLEETMERGE_IO_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(8)
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("fleetmerge-io")
            .enable_all()
            .build()
            .expect("starting the I/O runtime")
    })
}

/// Runs `fut` on the I/O runtime and waits for it from this (any) thread.
fn block<T: Send + 'static>(
    location: &str,
    fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StorageError::io(location, "the I/O task stopped"))?
}

/// Attempts of an idempotent request whose transfer broke off in a way
/// `object_store` does not retry itself (it sends again only what it can tell
/// never reached the server, or what ended in a timeout or reset; a body that
/// breaks off otherwise, as a dropped connection can, fails at once).
const TRANSFER_ATTEMPTS: u32 = 4;

/// Whether `e` is a failed transfer (the connection or a body broke off), as
/// opposed to an answer of the server: an idempotent request may be sent again.
fn broken_transfer(e: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A failed completion that may have completed: its transfer broke off, or
/// the upload is gone (a retry of one that had).
fn broken_or_gone(e: &object_store::Error) -> bool {
    broken_transfer(e)
        || matches!(e, object_store::Error::NotFound { .. })
        || e.to_string().contains("NoSuchUpload")
}

/// Runs the idempotent request `op` again (with backoff) while its transfer
/// breaks off, at most [`TRANSFER_ATTEMPTS`] times in all.
async fn idempotent<T, Fut>(mut op: impl FnMut() -> Fut) -> object_store::Result<T>
where
    Fut: Future<Output = object_store::Result<T>>,
{
    let mut delay = std::time::Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < TRANSFER_ATTEMPTS && broken_transfer(&e) => {
                tracing::info!(error = %e, attempt, "a transfer broke off; sending the request again");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Bytes `range` of `path`, read as the body streams in, each piece's size
/// sent to `sizes` as it arrives.
async fn streamed(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    range: Range<u64>,
    sizes: &std::sync::mpsc::Sender<u64>,
) -> object_store::Result<Bytes> {
    let want = range.end - range.start;
    let options = object_store::GetOptions {
        range: Some(object_store::GetRange::Bounded(range.clone())),
        ..Default::default()
    };
    let mut body = store.get_opts(path, options).await?.into_stream();
    let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
    while let Some(piece) = body.next().await {
        let piece = piece?;
        let _ = sizes.send(piece.len() as u64);
        buf.extend_from_slice(&piece);
    }
    if buf.len() as u64 != want {
        return Err(object_store::Error::Generic {
            store: "fleetmerge",
            source: format!(
                "{path}: asked for bytes {}..{}, got {} bytes",
                range.start,
                range.end,
                buf.len()
            )
            .into(),
        });
    }
    Ok(Bytes::from(buf))
}

/// One bucket (or container, or web origin).
pub struct ObjectStorage {
    /// `scheme://bucket`, the prefix of every location it serves.
    root: String,
    store: Arc<dyn ObjectStore>,
    /// The same client's multipart API (not for `http(s)://`).
    multipart: Option<Arc<dyn MultipartStore>>,
}

/// Splits `s3://bucket/a/b` into (`s3://bucket`, `a/b`).
fn split(location: &str) -> Option<(&str, &str)> {
    let scheme_end = location.find("://")? + 3;
    match location[scheme_end..].find('/') {
        Some(i) => Some((&location[..scheme_end + i], &location[scheme_end + i + 1..])),
        None => Some((location, "")),
    }
}

/// reqwest is built without a TLS crypto provider of its own (Cargo.toml: ring
/// rather than the C library aws-lc); its clients use the process default,
/// set here once, before the first client is built. A provider installed
/// earlier by someone else is kept.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client as both an object store and a multipart store.
fn both<T: ObjectStore + MultipartStore>(
    store: T,
) -> (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>) {
    let s = Arc::new(store);
    (s.clone(), Some(s))
}

type Clients = (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>);

/// Timeouts for merges, which move large ranges on links of any speed:
/// object_store's default (30 s for a whole request, body included) fails
/// every 16 MiB range or upload chunk that shares a slow link with others
/// (25 Mbit/s and 32 in flight: minutes each), and a failed upload chunk is
/// sent again from its start. Instead a request may take 10 minutes in all,
/// but a download that receives nothing for 60 s is retried (object_store
/// resumes a GET from the bytes it has). An environment variable
/// (`AWS_TIMEOUT`, `GOOGLE_READ_TIMEOUT`, ...) or a storage setting
/// (`timeout`, `read_timeout`) overrides each.
pub const CLIENT_DEFAULTS: [(&str, &str); 2] = [("timeout", "10m"), ("read_timeout", "60s")];

/// [`CLIENT_DEFAULTS`] that the environment does not set for the client
/// whose variables start with `prefix` (`AWS`, `GOOGLE`, `AZURE`; empty for
/// plain HTTP, which reads none).
fn client_defaults(prefix: &str) -> Vec<(String, String)> {
    CLIENT_DEFAULTS
        .iter()
        .filter(|(k, _)| {
            prefix.is_empty()
                || std::env::var_os(format!("{prefix}_{}", k.to_ascii_uppercase())).is_none()
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn build(root: &str, options: &[(String, String)]) -> Result<Clients, String> {
    use std::str::FromStr;
    install_crypto_provider();
    let url = url::Url::parse(root).map_err(|e| e.to_string())?;
    let bad = |k: &str| format!("unknown storage option '{k}'");
    let retry = object_store::RetryConfig {
        max_retries: std::env::var("FLEETMERGE_IO_RETRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
        ..Default::default()
    };
    // Our client defaults first, so that the settings' own win.
    let prefix = match url.scheme() {
        "s3" | "s3a" => "AWS",
        "gs" => "GOOGLE",
        "az" | "abfs" | "abfss" => "AZURE",
        _ => "",
    };
    let options: Vec<(String, String)> = client_defaults(prefix)
        .into_iter()
        .chain(options.iter().cloned())
        .collect();
    let store: Clients = match url.scheme() {
        "s3" | "s3a" => both(
            options
                .iter()
                .try_fold(
                    object_store::aws::AmazonS3Builder::from_env().with_url(root),
                    |b, (k, v)| {
                        let key = object_store::aws::AmazonS3ConfigKey::from_str(k)
                            .map_err(|_| bad(k))?;
                        Ok::<_, String>(b.with_config(key, v))
                    },
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        "gs" => both(
            options
                .iter()
                .try_fold(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(root),
                    |b, (k, v)| {
                        let key =
                            object_store::gcp::GoogleConfigKey::from_str(k).map_err(|_| bad(k))?;
                        Ok::<_, String>(b.with_config(key, v))
                    },
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        "az" | "abfs" | "abfss" => both(
            options
                .iter()
                .try_fold(
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(root),
                    |b, (k, v)| {
                        let key =
                            object_store::azure::AzureConfigKey::from_str(k).map_err(|_| bad(k))?;
                        Ok::<_, String>(b.with_config(key, v))
                    },
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        "http" | "https" => (
            Arc::new(
                options
                    .iter()
                    .try_fold(
                        // An http:// reference is an explicit choice of plain HTTP.
                        object_store::http::HttpBuilder::new()
                            .with_url(root)
                            .with_config(
                                object_store::ClientConfigKey::AllowHttp,
                                (url.scheme() == "http").to_string(),
                            ),
                        |b, (k, v)| {
                            let key =
                                object_store::ClientConfigKey::from_str(k).map_err(|_| bad(k))?;
                            Ok::<_, String>(b.with_config(key, v))
                        },
                    )?
                    .with_retry(retry)
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            None,
        ),
        other => return Err(format!("unsupported scheme {other}://")),
    };
    Ok(store)
}

/// The storage for an object-store URL: one client per bucket, or per prefix
/// that has its own settings (see [`super::overrides`]), shared.
pub fn for_url(location: &str) -> Result<Arc<ObjectStorage>, StorageError> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<ObjectStorage>>>> = OnceLock::new();
    let (root, _) =
        split(location).ok_or_else(|| StorageError::io(location, "not an object-store URL"))?;
    let custom = overrides::for_location(location);
    let key = custom.map(|o| o.prefix.as_str()).unwrap_or(root);
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(s) = stores.get(key) {
        return Ok(s.clone());
    }
    let options = custom.map(|o| o.options.as_slice()).unwrap_or(&[]);
    let store = build(root, options).map_err(|e| StorageError::Denied {
        location: location.to_string(),
        message: format!("cannot set up the client: {e}"),
    })?;
    let (store, multipart) = store;
    let s = Arc::new(ObjectStorage {
        root: root.to_string(),
        store,
        multipart,
    });
    stores.insert(key.to_string(), s.clone());
    Ok(s)
}

/// Our error for an `object_store` error on `location`.
fn error(location: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound {
            location: location.to_string(),
        },
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StorageError::Conflict {
                location: location.to_string(),
            }
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::Denied {
            location: location.to_string(),
            message: e.to_string(),
        },
        other => StorageError::io(location, other),
    }
}

impl ObjectStorage {
    fn multipart(&self, location: &str) -> Result<Arc<dyn MultipartStore>, StorageError> {
        self.multipart.clone().ok_or_else(|| {
            StorageError::io(location, "this store cannot take a file written in parts")
        })
    }

    fn path(&self, location: &str) -> Result<Path, StorageError> {
        let key = location
            .strip_prefix(&self.root)
            .map(|k| k.trim_start_matches('/'))
            .ok_or_else(|| StorageError::io(location, format!("not under {}", self.root)))?;
        Path::parse(key).map_err(|e| StorageError::io(location, e))
    }

    /// Bytes `range` of the object, in parts fetched concurrently when large;
    /// `arrived` hears each part's size as it arrives (on this thread).
    fn get_range(
        &self,
        location: &str,
        range: Range<u64>,
        arrived: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<Bytes>, StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        let (sizes, heard) = std::sync::mpsc::channel::<u64>();
        let reporting = arrived.is_some();
        let fut = async move {
            let parts: Vec<Range<u64>> = (range.start..range.end)
                .step_by(PART)
                .map(|s| s..(s + PART as u64).min(range.end))
                .collect();
            let fetched: Vec<Bytes> = futures::stream::iter(parts)
                .map(|r| {
                    let (store, path, sizes) = (store.clone(), path.clone(), sizes.clone());
                    async move {
                        if !reporting {
                            return idempotent(|| store.get_range(&path, r.clone())).await;
                        }
                        // The body as it arrives, each piece told: with many
                        // parts in flight on a slow link, a whole part can
                        // take minutes. (An attempt sent again may tell some
                        // bytes twice; the callers cap what they count.)
                        idempotent(|| streamed(&store, &path, r.clone(), &sizes)).await
                    }
                })
                .buffered(concurrency())
                .try_collect()
                .await
                .map_err(|e| error(&loc, e))?;
            Ok(fetched)
        };
        let Some(arrived) = arrived else {
            return block(location, fut);
        };
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let task = runtime().spawn(async move {
            let _ = done.send(fut.await);
        });
        // Every sender is dropped once the fetch ends, either way; while it
        // runs, `arrived` hears each piece, or 0 now and then, and may stop it.
        loop {
            let n = match heard.recv_timeout(std::time::Duration::from_millis(250)) {
                Ok(n) => n,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => 0,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if !arrived(n) {
                // Dropping the task's future drops its requests.
                task.abort();
                return Err(StorageError::Cancelled {
                    location: location.to_string(),
                });
            }
        }
        result
            .recv()
            .map_err(|_| StorageError::io(location, "the I/O task stopped"))?
    }

    /// [`Storage::read_into`], telling `arrived` the bytes as they arrive.
    fn read_into_reporting(
        &self,
        location: &str,
        offset: u64,
        buf: &mut [u8],
        arrived: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<(), StorageError> {
        let end = offset + buf.len() as u64;
        let parts = match self.get_range(location, offset..end, arrived) {
            Ok(p) => p,
            Err(
                e @ (StorageError::NotFound { .. }
                | StorageError::Denied { .. }
                | StorageError::Cancelled { .. }),
            ) => return Err(e),
            Err(e) => {
                // A range past the end reads as an error: say so plainly.
                return match self.size(location) {
                    Ok(size) if size < end => Err(StorageError::OutOfRange {
                        location: location.to_string(),
                        start: offset,
                        end,
                        size,
                    }),
                    _ => Err(e),
                };
            }
        };
        let mut at = 0;
        for p in parts {
            let n = p.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&p[..n]);
            at += n;
        }
        if at != buf.len() {
            let size = self.size(location).unwrap_or(offset + at as u64);
            return Err(StorageError::OutOfRange {
                location: location.to_string(),
                start: offset,
                end,
                size,
            });
        }
        Ok(())
    }
}

impl Storage for ObjectStorage {
    fn size(&self, location: &str) -> Result<u64, StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        block(location, async move {
            idempotent(|| store.head(&path))
                .await
                .map(|m| m.size)
                .map_err(|e| error(&loc, e))
        })
    }

    fn exists(&self, location: &str) -> Result<bool, StorageError> {
        match self.size(location) {
            Ok(_) => Ok(true),
            Err(StorageError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read_into(&self, location: &str, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.read_into_reporting(location, offset, buf, None)
    }

    fn read_range_reporting(
        &self,
        location: &str,
        range: Range<u64>,
        arrived: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<u8>, StorageError> {
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|e| StorageError::io(location, e))?;
        let mut buf = vec![0u8; len];
        self.read_into_reporting(location, range.start, &mut buf, Some(arrived))?;
        Ok(buf)
    }

    fn read_all(&self, location: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        block(location, async move {
            idempotent(|| async { store.get(&path).await?.bytes().await })
                .await
                .map(|b| b.to_vec())
                .map_err(|e| error(&loc, e))
        })
    }

    fn put(&self, location: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        let payload = PutPayload::from(Bytes::copy_from_slice(bytes));
        // A single PUT is atomic on every object store (and may be sent again).
        block(location, async move {
            idempotent(|| store.put(&path, payload.clone()))
                .await
                .map(|_| ())
                .map_err(|e| error(&loc, e))
        })
    }

    fn put_conditional(
        &self,
        location: &str,
        bytes: &[u8],
        expect: Option<&str>,
    ) -> Result<String, StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        let payload = PutPayload::from(Bytes::copy_from_slice(bytes));
        let mode = match expect {
            None => object_store::PutMode::Create,
            Some(tag) => object_store::PutMode::Update(object_store::UpdateVersion {
                e_tag: Some(tag.to_string()),
                version: None,
            }),
        };
        block(location, async move {
            let r = store
                .put_opts(&path, payload, mode.into())
                .await
                .map_err(|e| error(&loc, e))?;
            r.e_tag
                .ok_or_else(|| StorageError::io(&loc, "the store returned no ETag for a write"))
        })
    }

    fn read_versioned(&self, location: &str) -> Result<super::Versioned, StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        block(location, async move {
            let (tag, bytes) = idempotent(|| async {
                let r = store.get(&path).await?;
                let tag = r.meta.e_tag.clone();
                Ok((tag, r.bytes().await?))
            })
            .await
            .map_err(|e| error(&loc, e))?;
            let version =
                tag.ok_or_else(|| StorageError::io(&loc, "the store returned no ETag"))?;
            let bytes = bytes.to_vec();
            Ok(super::Versioned { bytes, version })
        })
    }

    fn create(&self, location: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        Ok(Box::new(MultipartWriter {
            location: location.to_string(),
            path: self.path(location)?,
            store: self.store.clone(),
            upload: None,
            buffer: Vec::new(),
            in_flight: Vec::new(),
        }))
    }

    fn parts_begin(&self, location: &str, _size: u64) -> Result<Option<String>, StorageError> {
        let (path, mp) = (self.path(location)?, self.multipart(location)?);
        let loc = location.to_string();
        // Sent again when its answer breaks off: the upload the lost answer
        // named is then left unfinished (an S3 lifecycle rule
        // AbortIncompleteMultipartUpload removes such uploads; README).
        block(location, async move {
            idempotent(|| mp.create_multipart(&path))
                .await
                .map(Some)
                .map_err(|e| error(&loc, e))
        })
    }

    fn parts_writer(
        &self,
        location: &str,
        part: &super::PartSpec,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let upload = part.upload.clone().ok_or_else(|| {
            StorageError::io(
                location,
                "a part of an object-store shard without its upload id",
            )
        })?;
        let chunks = super::upload_chunks(part.len, part.chunk);
        Ok(Box::new(ChunkWriter {
            location: location.to_string(),
            path: self.path(location)?,
            store: self.multipart(location)?,
            upload,
            next: part.first_chunk as usize,
            sizes: chunks
                .iter()
                .rev()
                .map(|r| (r.end - r.start) as usize)
                .collect(),
            buffer: Vec::new(),
            in_flight: Vec::new(),
            done: ChunkIds(Vec::new()),
        }))
    }

    fn parts_finish(
        &self,
        location: &str,
        upload: Option<&str>,
        chunks: Vec<String>,
    ) -> Result<(), StorageError> {
        let upload = upload
            .ok_or_else(|| StorageError::io(location, "finishing parts without an upload id"))?
            .to_string();
        let (path, mp) = (self.path(location)?, self.multipart(location)?);
        let loc = location.to_string();
        let parts: Vec<PartId> = chunks
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        let store = self.store.clone();
        block(location, async move {
            match idempotent(|| mp.complete_multipart(&path, &upload, parts.clone())).await {
                Ok(_) => Ok(()),
                // A completion whose answer was lost, sent again, finds its
                // upload gone: the object is there (and checked by the caller).
                Err(e) => match store.head(&path).await {
                    Ok(_) if broken_or_gone(&e) => Ok(()),
                    _ => Err(error(&loc, e)),
                },
            }
        })
    }

    fn parts_abort(&self, location: &str, upload: Option<&str>) -> Result<(), StorageError> {
        let Some(upload) = upload.map(str::to_string) else {
            return Ok(());
        };
        let (path, mp) = (self.path(location)?, self.multipart(location)?);
        let loc = location.to_string();
        block(location, async move {
            match idempotent(|| mp.abort_multipart(&path, &upload)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(error(&loc, e)),
            }
        })
    }

    fn delete(&self, location: &str) -> Result<(), StorageError> {
        let path = self.path(location)?;
        let store = self.store.clone();
        let loc = location.to_string();
        block(location, async move {
            match idempotent(|| store.delete(&path)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(error(&loc, e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let dir = self.path(prefix)?;
        let store = self.store.clone();
        let loc = prefix.to_string();
        block(prefix, async move {
            let metas: Vec<object_store::ObjectMeta> =
                idempotent(|| store.list(Some(&dir)).try_collect())
                    .await
                    .map_err(|e| error(&loc, e))?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    m.location.prefix_match(&dir).map(|parts| {
                        parts
                            .map(|p| p.as_ref().to_string())
                            .collect::<Vec<_>>()
                            .join("/")
                    })
                })
                .filter(|n| !n.is_empty())
                .collect())
        })
    }
}

/// One part of a shard written in parts: its bytes go up as the upload
/// chunks [`super::upload_chunks`] cuts, numbered from the part's first
/// chunk, at most [`concurrency`] in flight. The upload belongs to the
/// coordinator, which completes (or aborts) it: dropping the writer only stops
/// its requests.
struct ChunkWriter {
    location: String,
    path: Path,
    store: Arc<dyn MultipartStore>,
    upload: String,
    /// The number of the next chunk, and the sizes of the chunks to come
    /// (last first).
    next: usize,
    sizes: Vec<usize>,
    buffer: Vec<u8>,
    in_flight: Vec<tokio::task::JoinHandle<object_store::Result<PartId>>>,
    done: ChunkIds,
}

impl ChunkWriter {
    fn send(&mut self, ids: &mut Vec<String>) -> Result<(), StorageError> {
        let chunk = std::mem::take(&mut self.buffer);
        let (store, path, upload, n) = (
            self.store.clone(),
            self.path.clone(),
            self.upload.clone(),
            self.next,
        );
        self.next += 1;
        let payload = PutPayload::from(Bytes::from(chunk));
        self.in_flight.push(runtime().spawn(async move {
            // The same chunk under the same number: safe to send again.
            idempotent(|| store.put_part(&path, &upload, n, payload.clone())).await
        }));
        while self.in_flight.len() >= concurrency() {
            let oldest = self.in_flight.remove(0);
            ids.push(self.join(oldest)?);
        }
        Ok(())
    }

    fn join(
        &self,
        h: tokio::task::JoinHandle<object_store::Result<PartId>>,
    ) -> Result<String, StorageError> {
        let loc = self.location.clone();
        block(&self.location, async move {
            match h.await {
                Ok(r) => r.map(|p| p.content_id).map_err(|e| error(&loc, e)),
                Err(e) => Err(StorageError::io(&loc, e)),
            }
        })
    }
}

/// Chunk ids of a [`ChunkWriter`] joined so far (kept until commit).
struct ChunkIds(Vec<String>);

impl ObjectWriter for ChunkWriter {
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        let mut ids = Vec::new();
        while !bytes.is_empty() {
            let Some(&size) = self.sizes.last() else {
                return Err(StorageError::io(
                    &self.location,
                    "a part write past its end",
                ));
            };
            let take = (size - self.buffer.len()).min(bytes.len());
            self.buffer.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buffer.len() == size {
                self.sizes.pop();
                self.send(&mut ids)?;
            }
        }
        self.done.0.extend(ids);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), StorageError> {
        self.commit_chunks().map(|_| ())
    }

    fn commit_chunks(mut self: Box<Self>) -> Result<Vec<String>, StorageError> {
        if !self.buffer.is_empty() || !self.sizes.is_empty() {
            return Err(StorageError::io(
                &self.location,
                "a part ended before all of its bytes were written",
            ));
        }
        let mut ids = std::mem::take(&mut self.done.0);
        for h in std::mem::take(&mut self.in_flight) {
            ids.push(self.join(h)?);
        }
        Ok(ids)
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
    }
}

/// A streamed object: small objects go up in one PUT on commit; larger ones as a
/// multipart upload whose parts are sent while the next ones are produced.
struct MultipartWriter {
    location: String,
    path: Path,
    store: Arc<dyn ObjectStore>,
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    buffer: Vec<u8>,
    in_flight: Vec<tokio::task::JoinHandle<object_store::Result<()>>>,
}

impl MultipartWriter {
    /// Starts the upload of a full part, keeping at most [`concurrency`] in flight.
    fn send_part(&mut self, part: Vec<u8>) -> Result<(), StorageError> {
        if self.upload.is_none() {
            let (store, path, loc) = (self.store.clone(), self.path.clone(), self.location.clone());
            self.upload = Some(block(&self.location, async move {
                store.put_multipart(&path).await.map_err(|e| error(&loc, e))
            })?);
        }
        let fut = self
            .upload
            .as_mut()
            .expect("started above")
            .put_part(PutPayload::from(Bytes::from(part)));
        self.in_flight.push(runtime().spawn(fut));
        while self.in_flight.len() >= concurrency() {
            let oldest = self.in_flight.remove(0);
            self.join(oldest)?;
        }
        Ok(())
    }

    fn join(
        &self,
        h: tokio::task::JoinHandle<object_store::Result<()>>,
    ) -> Result<(), StorageError> {
        let loc = self.location.clone();
        block(&self.location, async move {
            match h.await {
                Ok(r) => r.map_err(|e| error(&loc, e)),
                Err(e) => Err(StorageError::io(&loc, e)),
            }
        })
    }
}

impl ObjectWriter for MultipartWriter {
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        while !bytes.is_empty() {
            let take = (PART - self.buffer.len()).min(bytes.len());
            self.buffer.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buffer.len() == PART {
                let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(PART));
                self.send_part(part)?;
            }
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let Some(mut upload) = self.upload.take() else {
            // Never reached one part: a single atomic PUT.
            let (store, path, loc) = (self.store.clone(), self.path.clone(), self.location.clone());
            let payload = PutPayload::from(Bytes::from(std::mem::take(&mut self.buffer)));
            return block(&self.location, async move {
                store
                    .put(&path, payload)
                    .await
                    .map(|_| ())
                    .map_err(|e| error(&loc, e))
            });
        };
        if !self.buffer.is_empty() {
            let last = std::mem::take(&mut self.buffer);
            self.in_flight
                .push(runtime().spawn(upload.put_part(PutPayload::from(Bytes::from(last)))));
        }
        let pending = std::mem::take(&mut self.in_flight);
        let mut result = Ok(());
        for h in pending {
            if let Err(e) = self.join(h) {
                result = result.and(Err(e));
            }
        }
        let loc = self.location.clone();
        match result {
            Ok(()) => block(&self.location, async move {
                upload
                    .complete()
                    .await
                    .map(|_| ())
                    .map_err(|e| error(&loc, e))
            }),
            Err(e) => {
                runtime().spawn(async move {
                    let _ = upload.abort().await;
                });
                Err(e)
            }
        }
    }
}

impl Drop for MultipartWriter {
    fn drop(&mut self) {
        // Not committed: abort the upload so no parts linger.
        if let Some(mut upload) = self.upload.take() {
            for h in self.in_flight.drain(..) {
                h.abort();
            }
            runtime().spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An S3 endpoint on loopback that answers every request with
    /// `answer(n, head)` (`n`: the request's number from 0) and closes the
    /// connection.
    fn server(answer: fn(usize, &str) -> Vec<u8>) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(&answer(n, &String::from_utf8_lossy(&head)));
            }
        });
        (url, count)
    }

    fn storage(endpoint: &str) -> ObjectStorage {
        install_crypto_provider();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: std::time::Duration::from_millis(1),
                    ..Default::default()
                },
                ..Default::default()
            })
            .build()
            .unwrap();
        let store = Arc::new(store);
        ObjectStorage {
            root: "s3://b".into(),
            store: store.clone(),
            multipart: Some(store),
        }
    }

    const BODY: &[u8] = b"0123456789";

    /// An answer of `BODY` (or of the range the request asks for) whose body
    /// breaks off after `keep` bytes.
    fn answer(head: &str, keep: usize) -> Vec<u8> {
        let range = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let (a, b) = k
                .eq_ignore_ascii_case("range")
                .then(|| v.trim().strip_prefix("bytes=")?.split_once('-'))??;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
        });
        let (status, body, extra) = match range {
            Some((a, b)) => (
                "206 Partial Content",
                &BODY[a..=b],
                format!("Content-Range: bytes {a}-{b}/{}\r\n", BODY.len()),
            ),
            None => ("200 OK", BODY, String::new()),
        };
        let mut a = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"v1\"\r\n{extra}\
             Last-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(&body[..keep.min(body.len())]);
        a
    }

    #[test]
    fn a_whole_object_read_cut_off_mid_body_is_read_again() {
        // The first answer breaks off after 3 of its 10 bytes.
        let (url, count) = server(|n, head| match n {
            0 => answer(head, 3),
            _ => answer(head, usize::MAX),
        });
        let s = storage(&url);
        assert_eq!(s.read_all("s3://b/journal/unit.json").unwrap(), BODY);
        assert!(count.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn a_read_that_keeps_breaking_off_fails_with_its_location() {
        let (url, _) = server(|_, head| answer(head, 3).into_iter().take(1).collect());
        let e = storage(&url).read_all("s3://b/x.json").unwrap_err();
        assert!(
            matches!(&e, StorageError::Io { location, .. } if location == "s3://b/x.json"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod client_default_tests {
    use super::*;

    /// Our timeouts parse for every backend, a storage setting may override
    /// them, and an environment variable keeps them from being set at all.
    #[test]
    fn client_defaults_parse_everywhere_and_give_way() {
        let account = ("account_name".to_string(), "a".to_string());
        for (root, needs) in [
            ("s3://b", vec![]),
            ("az://c", vec![account]),
            ("http://127.0.0.1:1", vec![]),
        ] {
            build(root, &needs).unwrap_or_else(|e| panic!("{root}: {e}"));
            let own = [needs, vec![("timeout".to_string(), "5s".to_string())]].concat();
            build(root, &own).unwrap_or_else(|e| panic!("{root}: {e}"));
        }
        let keys = |v: Vec<(String, String)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(client_defaults("")), ["timeout", "read_timeout"]);
        std::env::set_var("FLEETMERGE_TEST_CLIENT_READ_TIMEOUT", "1s");
        assert_eq!(keys(client_defaults("FLEETMERGE_TEST_CLIENT")), ["timeout"]);
    }
}
