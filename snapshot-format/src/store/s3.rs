//! The S3 object store on `aws-sdk-s3`: any S3-compatible service (AWS S3, Garage, ...).
//!
//! Credentials come from the config file when it names them, else from the usual AWS chain
//! (environment, profile, web identity, container and instance metadata). Every call has the
//! SDK's standard retries and a per-attempt and per-operation timeout from the config.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{validate_key, validate_prefix, ObjectStore, StoreError};
use blockfleet_core::config::S3StoreConfig;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
}

impl S3Store {
    /// Builds a client for the configured endpoint. Nothing is sent until the first call;
    /// [`ObjectStore::check`] proves the endpoint and bucket.
    pub async fn connect(config: &S3StoreConfig) -> Self {
        let shared = blockfleet_core::aws::sdk_config(blockfleet_core::aws::Endpoint {
            url: config.endpoint.as_deref(),
            region: &config.region,
            credentials: config
                .access_key_id
                .as_deref()
                .zip(config.secret_access_key.as_ref()),
            // Object-store credentials (no data keys) may come from the AWS environment.
            environment: Ok(()),
            max_attempts: config.max_attempts,
            fleet_role: None,
            timeouts: TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                .operation_attempt_timeout(Duration::from_secs(config.attempt_timeout_secs))
                .operation_timeout(Duration::from_secs(
                    config.attempt_timeout_secs * u64::from(config.max_attempts) + 5,
                ))
                .build(),
        })
        .await;
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            .build();
        let prefix = match config.prefix.trim_end_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        S3Store {
            client: Client::from_conf(s3_config),
            bucket: config.bucket.clone(),
            prefix,
        }
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        op: &'static str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError {
        let store = self.describe();
        let key = key.to_owned();
        let status = err.raw_response().map(|r| r.status().as_u16());
        match &err {
            SdkError::TimeoutError(_) => return StoreError::Timeout { store, op, key },
            SdkError::DispatchFailure(d) if d.is_timeout() => {
                return StoreError::Timeout { store, op, key }
            }
            SdkError::DispatchFailure(_) => {
                return StoreError::Unreachable {
                    store,
                    reason: DisplayErrorContext(&err).to_string(),
                }
            }
            _ => {}
        }
        let code = err.code().unwrap_or_default();
        match (code, status) {
            ("NoSuchBucket", _) => StoreError::NoSuchBucket {
                store,
                bucket: self.bucket.clone(),
            },
            ("NoSuchKey" | "NotFound", _) | ("", Some(404)) => StoreError::NotFound { store, key },
            ("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "Forbidden", _)
            | ("", Some(403)) => StoreError::AccessDenied {
                store,
                reason: err.message().unwrap_or(code).to_owned(),
            },
            _ => StoreError::Backend {
                store,
                op,
                key,
                reason: DisplayErrorContext(&err).to_string(),
            },
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn check(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            // HeadBucket has no body, so a missing bucket shows only as a 404.
            Err(e) => Err(match self.error("check", "", e) {
                StoreError::NotFound { store, .. } => StoreError::NoSuchBucket {
                    store,
                    bucket: self.bucket.clone(),
                },
                other => other,
            }),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("get", key, e))?;
        out.body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| StoreError::Backend {
                store: self.describe(),
                op: "get",
                key: key.to_owned(),
                reason: format!("reading the body: {e}"),
            })
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match self.error("head", key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        validate_prefix(prefix)?;
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("list", prefix, e))?;
            for obj in page.contents() {
                if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    keys.push(k.to_owned());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("delete", key, e))
    }
}
