//! The embedded KMS (`blockfleet kms`): the subset of the AWS KMS JSON protocol blockfleet uses,
//! over HTTP on loopback, every request authenticated by SigV4 against the principals of
//! `[kms_server]`, with the policy of [`api`].
//!
//! - [`keystore`]: sealed master keys, wrapped data keys, grants (sled + root key file).
//! - [`api`]: the operations, the policy, AWS error codes.
//!
//! Nothing here logs a request or response body: plaintext keys cross this server only inside
//! `Decrypt` responses to the transform fleet and to granted host agents.

pub mod api;
pub mod keystore;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use blockfleet_core::config::KmsServerConfig;
use blockfleet_core::sigv4::{self, SigV4Error};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;

use api::{ApiError, Principal};
use keystore::{Keystore, KeystoreError};

const MAX_BODY: usize = 1 << 20;

struct State {
    keystore: Keystore,
    region: String,
    /// access key id -> (secret, principal)
    principals: HashMap<String, (String, Principal)>,
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_reply(e: &ApiError) -> Response<Full<Bytes>> {
    let status = if e.code == "KMSInternalException" {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::BAD_REQUEST
    };
    reply(status, json!({ "__type": e.code, "message": e.message }))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_reply(&ApiError {
                code: "ValidationException",
                message: format!("request body larger than {MAX_BODY} bytes or unreadable"),
            })
        }
    };
    let caller = sigv4::verify_request(&parts, &body, "kms", SystemTime::now(), |akid| {
        state.principals.get(akid).map(|(secret, _)| secret.clone())
    });
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            let code = match e {
                SigV4Error::UnknownAccessKey => "UnrecognizedClientException",
                SigV4Error::BadSignature | SigV4Error::Expired => "InvalidSignatureException",
                SigV4Error::Malformed(_) | SigV4Error::WrongService { .. } => {
                    "IncompleteSignatureException"
                }
            };
            tracing::info!(code, "kms request refused at authentication");
            return error_reply(&ApiError {
                code,
                message: e.to_string(),
            });
        }
    };
    let Some((_, principal)) = state.principals.get(&caller.access_key_id).cloned() else {
        return error_reply(&ApiError {
            code: "UnrecognizedClientException",
            message: "unknown access key".into(),
        });
    };
    let op = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix("TrentService."))
        .unwrap_or("")
        .to_owned();
    let st = Arc::clone(&state);
    let who = principal.clone();
    let op2 = op.clone();
    let result = tokio::task::spawn_blocking(move || {
        api::dispatch(&st.keystore, &st.region, &who, &op2, &body)
    })
    .await
    .unwrap_or_else(|e| {
        Err(ApiError {
            code: "KMSInternalException",
            message: e.to_string(),
        })
    });
    match result {
        Ok(v) => {
            tracing::info!(principal = %principal.name, op, "kms request served");
            reply(StatusCode::OK, v)
        }
        Err(e) => {
            tracing::info!(principal = %principal.name, op, code = e.code, "kms request refused");
            error_reply(&e)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KmsServerError {
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error("config: {0}")]
    Config(String),
}

/// Serves the embedded KMS on `listener` until `shutdown` resolves.
pub async fn run(
    config: KmsServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), KmsServerError> {
    config
        .validate()
        .map_err(|e| KmsServerError::Config(e.to_string()))?;
    let keystore = Keystore::open(&config.data_dir, &config.root_key_file)?;
    let principals = config
        .principals
        .iter()
        .map(|p| {
            let principal = Principal {
                name: p.name.clone(),
                role: p.role,
            };
            (
                p.access_key_id.clone(),
                (p.secret_access_key.expose().to_owned(), principal),
            )
        })
        .collect();
    let state = Arc::new(State {
        keystore,
        region: config.region.clone(),
        principals,
    });
    // With [tls], HTTPS only: Decrypt's replies are plaintext keys. Callers authenticate by
    // SigV4 (AWS SDKs present no certificate).
    let tls = match &config.tls {
        Some(t) => {
            use blockfleet_core::tls::Role;
            Some(blockfleet_core::httpjson::ServerTls {
                config: blockfleet_core::tls::server_config_optional_client(&t.dir, Role::Kms)
                    .map_err(|e| KmsServerError::Config(e.to_string()))?,
                allow: vec![Role::ControlPlane, Role::Transform, Role::HostAgent],
                anonymous: true,
            })
        }
        None => None,
    };
    blockfleet_core::httpjson::serve_http_tls(listener, tls, shutdown, move |req| {
        handle(Arc::clone(&state), req)
    })
    .await;
    Ok(())
}
