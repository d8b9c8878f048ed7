//! Object storage for Medallion: the S3 settings every service shares, an S3 client built
//! from them with aws-config's default credential chain (environment, profile, web identity /
//! IRSA, instance role), and the object work the services do besides Delta tables: listing
//! source objects, streaming them to local spool files, staging files for a warehouse load and
//! removing them again.
//!
//! The same settings also configure delta-rs' S3 backend ([`ObjectStore::delta_storage_options`]),
//! so the lake's tables and the services' own object calls reach the same store the same way.
//! Credentials are never written to logs or errors: they stay inside the AWS credential chain.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aws_config::BehaviorVersion;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use tokio::io::AsyncWriteExt;

/// S3 settings shared by every service; each flag also reads an environment variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct S3Options {
    /// S3 region; defaults to the AWS chain's region (AWS_REGION, profile), else us-east-1.
    #[arg(long = "s3-region", env = "MEDALLION_S3_REGION")]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO and friends), e.g. http://127.0.0.1:9000.
    #[arg(long = "s3-endpoint", env = "MEDALLION_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) on AWS S3; always used with --s3-endpoint.
    #[arg(long = "s3-path-style", env = "MEDALLION_S3_PATH_STYLE")]
    pub path_style: bool,
}

impl S3Options {
    /// A custom endpoint is addressed path-style by both the SDK and delta-rs: delta-rs' S3
    /// backend would otherwise take the endpoint itself as the bucket's address.
    fn path_style_addressing(&self) -> bool {
        self.path_style || self.endpoint.is_some()
    }
}

/// Errors of object work; each names the object or prefix involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{url}` is not an S3 URL: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("bad glob in `{url}`: {reason}")]
    InvalidGlob { url: String, reason: String },
    #[error("bucket `{bucket}` does not exist")]
    NoSuchBucket { bucket: String },
    #[error("no objects at {url}")]
    NotFound { url: String },
    #[error("{op} {url}: {message}")]
    S3 {
        op: &'static str,
        url: String,
        message: String,
    },
    #[error("{op} {path}: {source}")]
    Local {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A location in S3: `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    /// Parses `s3://bucket[/key]`.
    pub fn parse(url: &str) -> Result<S3Url> {
        let invalid = |reason| Error::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("must start with s3://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// Whether `location` names an S3 object or prefix.
    pub fn is_s3(location: &str) -> bool {
        location.starts_with("s3://")
    }

    /// The URL of `name` under this prefix (a `/` is put between them if missing).
    pub fn join(&self, name: &str) -> S3Url {
        let key = if self.key.is_empty() || self.key.ends_with('/') {
            format!("{}{name}", self.key)
        } else {
            format!("{}/{name}", self.key)
        };
        S3Url {
            bucket: self.bucket.clone(),
            key,
        }
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// One listed object and the identity a reader remembers it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub url: S3Url,
    pub size: u64,
    /// The entity tag without quotes; a rewritten object gets a new one.
    pub etag: String,
    /// Last modification, microseconds since the epoch.
    pub modified_us: i64,
}

/// An S3 client plus the settings it was built from; cheap to clone.
#[derive(Clone)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    options: S3Options,
    region: String,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("options", &self.options)
            .field("region", &self.region)
            .finish()
    }
}

/// Bytes of one multipart upload part (S3's minimum is 5 MiB).
const UPLOAD_PART: u64 = 16 * 1024 * 1024;

impl ObjectStore {
    /// Loads the AWS configuration (credential chain, region) and builds the S3 client.
    pub async fn connect(options: S3Options) -> ObjectStore {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &options.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let region = sdk
            .region()
            .map_or_else(|| "us-east-1".to_string(), |r| r.to_string());
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .region(aws_config::Region::new(region.clone()))
            .force_path_style(options.path_style_addressing());
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint.clone());
        }
        ObjectStore {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            options,
            region,
        }
    }

    /// The region requests go to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Storage options that point delta-rs' S3 backend at the same store, with the same
    /// credential chain. Commits use S3 conditional writes (`If-None-Match`), so of two writers
    /// racing for one table version exactly one wins; no locking table is needed.
    pub fn delta_storage_options(&self) -> HashMap<String, String> {
        let mut options = HashMap::from([
            ("AWS_REGION".to_string(), self.region.clone()),
            // Resolve credentials with aws-config's chain even against a custom endpoint.
            ("AWS_FORCE_CREDENTIAL_LOAD".to_string(), "true".to_string()),
            ("AWS_CONDITIONAL_PUT".to_string(), "etag".to_string()),
        ]);
        if let Some(endpoint) = &self.options.endpoint {
            options.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
            if endpoint.starts_with("http://") {
                options.insert("AWS_ALLOW_HTTP".into(), "true".into());
            }
        }
        options.insert(
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into(),
            (!self.options.path_style_addressing()).to_string(),
        );
        options
    }

    /// The underlying SDK client, for calls this crate does not wrap.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Lists the objects a source location names, sorted by key, page by page:
    /// - a glob (`s3://b/raw/*.csv`): objects whose whole key matches it (`*` does not cross `/`);
    /// - an object key: that object;
    /// - a prefix (`s3://b/raw/` or `s3://b/raw`): the objects directly under it, not in
    ///   sub-folders, except names starting with `.` or `_` (markers such as `_SUCCESS`).
    ///
    /// Folder markers (zero-byte keys ending in `/`) are never listed. A location that names
    /// no object is an error, as a missing local path is.
    pub async fn list(&self, location: &str) -> Result<Vec<ObjectInfo>> {
        let url = S3Url::parse(location)?;
        let wildcard = url.key.find(['*', '?', '[']);
        let mut found = Vec::new();
        if let Some(at) = wildcard {
            let pattern = glob::Pattern::new(&url.key).map_err(|e| Error::InvalidGlob {
                url: location.to_string(),
                reason: e.to_string(),
            })?;
            let options = glob::MatchOptions {
                require_literal_separator: true,
                ..Default::default()
            };
            let prefix = &url.key[..at];
            self.list_prefix(
                &url.bucket,
                prefix,
                false,
                |key| pattern.matches_with(key, options),
                &mut found,
            )
            .await?;
        } else {
            if !url.key.is_empty() && !url.key.ends_with('/') {
                // An object of exactly this key?
                self.list_prefix(
                    &url.bucket,
                    &url.key,
                    true,
                    |key| key == url.key,
                    &mut found,
                )
                .await?;
            }
            if found.is_empty() {
                let folder = if url.key.is_empty() || url.key.ends_with('/') {
                    url.key.clone()
                } else {
                    format!("{}/", url.key)
                };
                let visible = |key: &str| {
                    key.strip_prefix(folder.as_str()).is_some_and(|name| {
                        !name.is_empty()
                            && !name.contains('/')
                            && !name.starts_with('.')
                            && !name.starts_with('_')
                    })
                };
                self.list_prefix(&url.bucket, &folder, true, visible, &mut found)
                    .await?;
            }
        }
        if found.is_empty() {
            return Err(Error::NotFound {
                url: location.to_string(),
            });
        }
        found.sort_by(|a, b| a.url.key.cmp(&b.url.key));
        Ok(found)
    }

    /// Every object under `prefix` that `keep` accepts; with `direct_only`, listed with the
    /// `/` delimiter so objects in sub-folders are not even fetched.
    async fn list_prefix(
        &self,
        bucket: &str,
        prefix: &str,
        direct_only: bool,
        keep: impl Fn(&str) -> bool,
        found: &mut Vec<ObjectInfo>,
    ) -> Result<()> {
        let mut request = self.client.list_objects_v2().bucket(bucket).prefix(prefix);
        if direct_only {
            request = request.delimiter("/");
        }
        let mut pages = request.into_paginator().send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| s3_error("list", &format!("s3://{bucket}/{prefix}"), bucket, e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                if key.ends_with('/') || !keep(key) {
                    continue;
                }
                found.push(ObjectInfo {
                    url: S3Url {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                    },
                    size: object
                        .size()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                    etag: object
                        .e_tag()
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_string(),
                    modified_us: object
                        .last_modified()
                        .and_then(|t| t.to_millis().ok())
                        .map_or(0, |ms| ms.saturating_mul(1000)),
                });
            }
        }
        Ok(())
    }

    /// Checks that `bucket` exists and these credentials may use it, so a misconfigured lake
    /// fails at start with S3's own reason instead of on the first task.
    pub async fn check_bucket(&self, bucket: &str) -> Result<()> {
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            // HEAD responses carry no body: a 404 is the only word on a missing bucket.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                Err(Error::NoSuchBucket {
                    bucket: bucket.to_string(),
                })
            }
            Err(e) => Err(s3_error("check", &format!("s3://{bucket}"), bucket, e)),
        }
    }

    /// Streams `object` into the local file `path`, chunk by chunk, so memory stays bounded
    /// whatever its size. The read is pinned to the listed ETag: an object rewritten since it
    /// was listed fails instead of mixing two versions.
    pub async fn download(&self, object: &ObjectInfo, path: &Path) -> Result<u64> {
        let url = object.url.to_string();
        let mut request = self
            .client
            .get_object()
            .bucket(&object.url.bucket)
            .key(&object.url.key);
        if !object.etag.is_empty() {
            request = request.if_match(format!("\"{}\"", object.etag));
        }
        let output = request
            .send()
            .await
            .map_err(|e| s3_error("read", &url, &object.url.bucket, e))?;
        let local = |op, source| Error::Local {
            op,
            path: path.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| local("create", e))?;
        let mut body = output.body;
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::S3 {
                op: "read",
                url: url.clone(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
            file.write_all(&chunk)
                .await
                .map_err(|e| local("write", e))?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| local("write", e))?;
        Ok(written)
    }

    /// Uploads the local file at `path` to `url`, streaming it from disk: one PUT for small
    /// files, a multipart upload (aborted on failure) for large ones.
    pub async fn upload(&self, path: &Path, url: &S3Url) -> Result<()> {
        let target = url.to_string();
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| Error::Local {
                op: "stat",
                path: path.display().to_string(),
                source,
            })?
            .len();
        let body = |offset: u64, length: u64| async move {
            ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(aws_sdk_s3::primitives::Length::Exact(length))
                .build()
                .await
                .map_err(|e| Error::Local {
                    op: "read",
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })
        };
        if size <= UPLOAD_PART {
            self.client
                .put_object()
                .bucket(&url.bucket)
                .key(&url.key)
                .body(body(0, size).await?)
                .send()
                .await
                .map_err(|e| s3_error("write", &target, &url.bucket, e))?;
            return Ok(());
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .map_err(|e| s3_error("start upload", &target, &url.bucket, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let result: Result<()> = async {
            let mut parts = Vec::new();
            let mut offset = 0;
            while offset < size {
                let length = UPLOAD_PART.min(size - offset);
                let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
                let part = self
                    .client
                    .upload_part()
                    .bucket(&url.bucket)
                    .key(&url.key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(body(offset, length).await?)
                    .send()
                    .await
                    .map_err(|e| s3_error("upload part", &target, &url.bucket, e))?;
                parts.push(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .build(),
                );
                offset += length;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(&upload_id)
                .multipart_upload(
                    aws_sdk_s3::types::CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| s3_error("complete upload", &target, &url.bucket, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Best effort: an abandoned upload only costs storage until a lifecycle rule runs.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    /// Deletes every object under `prefix`; returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &S3Url) -> Result<usize> {
        let mut found = Vec::new();
        self.list_prefix(&prefix.bucket, &prefix.key, false, |_| true, &mut found)
            .await?;
        let target = prefix.to_string();
        for chunk in found.chunks(1000) {
            let objects = chunk
                .iter()
                .filter_map(|o| ObjectIdentifier::builder().key(&o.url.key).build().ok())
                .collect();
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::S3 {
                    op: "delete",
                    url: target.clone(),
                    message: e.to_string(),
                })?;
            let output = self
                .client
                .delete_objects()
                .bucket(&prefix.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| s3_error("delete", &target, &prefix.bucket, e))?;
            if let Some(failed) = output.errors().first() {
                return Err(Error::S3 {
                    op: "delete",
                    url: format!(
                        "s3://{}/{}",
                        prefix.bucket,
                        failed.key().unwrap_or_default()
                    ),
                    message: format!(
                        "{}: {} ({} keys not deleted)",
                        failed.code().unwrap_or("error"),
                        failed.message().unwrap_or("no message"),
                        output.errors().len()
                    ),
                });
            }
        }
        Ok(found.len())
    }
}

/// An SDK error as text a user can act on: S3's own code and message where it sent one.
fn s3_error<E, R>(op: &'static str, url: &str, bucket: &str, error: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    if let Some(service) = error.as_service_error() {
        if service.code() == Some("NoSuchBucket") {
            return Error::NoSuchBucket {
                bucket: bucket.to_string(),
            };
        }
        if let Some(code) = service.code() {
            return Error::S3 {
                op,
                url: url.to_string(),
                message: format!("{code}: {}", service.message().unwrap_or("no message")),
            };
        }
    }
    Error::S3 {
        op,
        url: url.to_string(),
        message: DisplayErrorContext(&error).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls() {
        let url = S3Url::parse("s3://lake/raw/a.csv").unwrap();
        assert_eq!(
            (url.bucket.as_str(), url.key.as_str()),
            ("lake", "raw/a.csv")
        );
        assert_eq!(S3Url::parse("s3://lake").unwrap().key, "");
        assert_eq!(url.to_string(), "s3://lake/raw/a.csv");
        assert_eq!(
            S3Url::parse("s3://lake/raw").unwrap().join("x").key,
            "raw/x"
        );
        assert!(S3Url::parse("s3:///key").is_err());
        assert!(S3Url::parse("/tmp/x").is_err());
    }
}
