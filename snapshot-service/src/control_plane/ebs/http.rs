//! AWS-shaped errors (`x-amzn-ErrorType` + JSON) and request parsing of the EBS direct APIs.

use std::collections::HashMap;

use base64::Engine;
use blockfleet_core::ids::SnapshotId;
use blockfleet_keys::kms::KmsError;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

/// An AWS-shaped error: HTTP status, `x-amzn-ErrorType`, and a JSON body with a message and,
/// for `ValidationException`, a reason.
#[derive(Debug)]
pub(crate) struct EbsError {
    pub(super) status: u16,
    pub(super) code: &'static str,
    pub(super) reason: Option<&'static str>,
    pub(super) message: String,
}

pub(super) fn invalid(reason: &'static str, message: impl Into<String>) -> EbsError {
    EbsError {
        status: 400,
        code: "ValidationException",
        reason: Some(reason),
        message: message.into(),
    }
}

pub(super) fn not_found(reason: &'static str, message: impl Into<String>) -> EbsError {
    EbsError {
        status: 404,
        code: "ResourceNotFoundException",
        reason: Some(reason),
        message: message.into(),
    }
}

pub(super) fn conflict(message: impl Into<String>) -> EbsError {
    EbsError {
        status: 409,
        code: "ConflictException",
        reason: None,
        message: message.into(),
    }
}

pub(super) fn internal(message: impl Into<String>) -> EbsError {
    EbsError {
        status: 500,
        code: "InternalServerException",
        reason: None,
        message: message.into(),
    }
}

pub(super) fn kms_ebs_error(e: KmsError) -> EbsError {
    match e {
        KmsError::NotFound(_) => invalid("INVALID_PARAMETER_VALUE", format!("KmsKeyArn: {e}")),
        KmsError::AccessDenied(_) => EbsError {
            status: 403,
            code: "AccessDeniedException",
            reason: Some("UNAUTHORIZED_ACCOUNT"),
            message: e.to_string(),
        },
        _ => internal(format!("KMS: {e}")),
    }
}

impl From<crate::state::StateError> for EbsError {
    fn from(e: crate::state::StateError) -> Self {
        internal(e.to_string())
    }
}

pub(super) type Reply = Result<Response<Full<Bytes>>, EbsError>;

pub(super) fn json_reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub(super) fn error_reply(e: &EbsError) -> Response<Full<Bytes>> {
    let mut body = json!({ "Message": e.message, "message": e.message });
    if let Some(r) = e.reason {
        body["Reason"] = json!(r);
    }
    let mut r = json_reply(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(e.code) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

pub(super) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(super) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(super) fn query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding of a query component.
pub(super) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn snapshot_id(s: &str) -> Result<SnapshotId, EbsError> {
    s.parse()
        .map_err(|_| invalid("INVALID_SNAPSHOT_ID", format!("{s:?} is not a snapshot id")))
}

pub(super) fn block_index(s: &str) -> Result<u64, EbsError> {
    s.parse()
        .map_err(|_| invalid("INVALID_BLOCK", format!("{s:?} is not a block index")))
}
