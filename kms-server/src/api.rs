//! The AWS KMS JSON operations the embedded KMS serves, and who may call them.
//!
//! | operation | control plane | transform | host agent | block server |
//! |---|---|---|---|---|
//! | CreateKey, GenerateDataKeyWithoutPlaintext, CreateGrant, RetireGrant, ListGrants | yes | no | no | no |
//! | DescribeKey | yes | yes | no | no |
//! | Decrypt | no | yes | only under a live grant naming it, the key and the volume | no |
//!
//! The coordinator role may only GenerateDataKeyWithoutPlaintext and Decrypt the fleet's
//! manifest MAC key (encryption context `blockfleet:purpose = manifest-mac`).
//!
//! Errors carry AWS KMS error codes (`__type`), so AWS SDKs map them as they would AWS's.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use blockfleet_core::config::KmsRole;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::keystore::{new_uuid, Grant, Keystore};

/// An AWS-shaped error: code (`__type`) and message.
#[derive(Debug)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

fn err(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

fn denied(principal: &str, op: &str) -> ApiError {
    err(
        "AccessDeniedException",
        format!("principal {principal} is not allowed to call {op}"),
    )
}

/// The calling principal.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: KmsRole,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| err("ValidationException", format!("bad request body: {e}")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolves a KeyId (UUID or key ARN) to the key's UUID; aliases are not supported here.
fn resolve(ks: &Keystore, key_id: &str) -> Result<String, ApiError> {
    let id = key_id.rsplit_once(":key/").map_or(key_id, |(_, id)| id);
    match ks.key(id).map_err(internal)? {
        Some(_) => Ok(id.to_owned()),
        None => Err(err(
            "NotFoundException",
            format!("key {key_id} does not exist"),
        )),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    err("KMSInternalException", e.to_string())
}

fn arn(region: &str, id: &str) -> String {
    format!("arn:aws:kms:{region}:000000000000:key/{id}")
}

fn metadata(ks: &Keystore, region: &str, id: &str) -> Result<Value, ApiError> {
    let rec = ks
        .key(id)
        .map_err(internal)?
        .ok_or_else(|| err("NotFoundException", id.to_owned()))?;
    Ok(json!({
        "AWSAccountId": "000000000000",
        "KeyId": id,
        "Arn": arn(region, id),
        "Description": rec.description,
        "CreationDate": rec.created,
        "Enabled": true,
        "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyManager": "CUSTOMER",
        "Origin": "AWS_KMS",
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyIdOnly {
    key_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct CreateKeyReq {
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateReq {
    key_id: String,
    number_of_bytes: Option<u32>,
    key_spec: Option<String>,
    #[serde(default)]
    encryption_context: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DecryptReq {
    ciphertext_blob: String,
    #[serde(default)]
    encryption_context: BTreeMap<String, String>,
    key_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Constraints {
    #[serde(default)]
    encryption_context_subset: BTreeMap<String, String>,
    #[serde(default)]
    encryption_context_equals: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateGrantReq {
    key_id: String,
    grantee_principal: String,
    operations: Vec<String>,
    #[serde(default)]
    constraints: Option<Constraints>,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RetireGrantReq {
    key_id: Option<String>,
    grant_id: Option<String>,
    grant_token: Option<String>,
}

/// Serves one operation for `who`.
pub fn dispatch(
    ks: &Keystore,
    region: &str,
    who: &Principal,
    op: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    use KmsRole::*;
    let allowed = |roles: &[KmsRole]| {
        if roles.contains(&who.role) {
            Ok(())
        } else {
            Err(denied(&who.name, op))
        }
    };
    match op {
        "CreateKey" => {
            allowed(&[ControlPlane])?;
            let req: CreateKeyReq = if body.is_empty() {
                CreateKeyReq::default()
            } else {
                parse(body)?
            };
            let id = ks.create_key(&req.description, now()).map_err(internal)?;
            Ok(json!({ "KeyMetadata": metadata(ks, region, &id)? }))
        }
        "DescribeKey" => {
            allowed(&[ControlPlane, Transform])?;
            let req: KeyIdOnly = parse(body)?;
            let id = resolve(ks, &req.key_id)?;
            Ok(json!({ "KeyMetadata": metadata(ks, region, &id)? }))
        }
        "GenerateDataKeyWithoutPlaintext" => {
            let req: GenerateReq = parse(body)?;
            if !(who.role == Coordinator && is_manifest_mac(&req.encryption_context)) {
                allowed(&[ControlPlane])?;
            }
            let len = match (req.number_of_bytes, req.key_spec.as_deref()) {
                (Some(n), None) if (1..=1024).contains(&n) => n as usize,
                (None, Some("AES_256")) => 32,
                (None, Some("AES_128")) => 16,
                _ => {
                    return Err(err(
                        "ValidationException",
                        "give NumberOfBytes (1-1024) or KeySpec (AES_128, AES_256), not both",
                    ))
                }
            };
            let id = resolve(ks, &req.key_id)?;
            let mut plain = Zeroizing::new(vec![0u8; len]);
            getrandom::fill(&mut plain).map_err(internal)?;
            let blob = ks
                .wrap(&id, &plain, &req.encryption_context)
                .map_err(internal)?
                .ok_or_else(|| err("NotFoundException", id.clone()))?;
            Ok(json!({ "CiphertextBlob": B64.encode(blob), "KeyId": arn(region, &id) }))
        }
        "Decrypt" => {
            let req: DecryptReq = parse(body)?;
            if !(who.role == Coordinator && is_manifest_mac(&req.encryption_context)) {
                allowed(&[Transform, HostAgent])?;
            }
            let blob = B64
                .decode(&req.ciphertext_blob)
                .map_err(|_| err("InvalidCiphertextException", "CiphertextBlob is not base64"))?;
            let key_id = Keystore::blob_key_id(&blob)
                .ok_or_else(|| err("InvalidCiphertextException", "not a ciphertext of this KMS"))?;
            if let Some(asked) = &req.key_id {
                if resolve(ks, asked)? != key_id {
                    return Err(err(
                        "IncorrectKeyException",
                        "the ciphertext was made under another key",
                    ));
                }
            }
            if who.role == HostAgent && !has_grant(ks, who, &key_id, &req.encryption_context)? {
                return Err(err(
                    "AccessDeniedException",
                    format!("principal {} has no live grant to decrypt with key {key_id} in this context", who.name),
                ));
            }
            let (id, plain) = ks
                .unwrap(&blob, &req.encryption_context)
                .map_err(internal)?
                .ok_or_else(|| {
                    err(
                        "InvalidCiphertextException",
                        "the ciphertext does not open with this key and encryption context",
                    )
                })?;
            let encoded = Zeroizing::new(B64.encode(&plain[..]));
            Ok(
                json!({ "Plaintext": encoded.as_str(), "KeyId": arn(region, &id), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" }),
            )
        }
        "CreateGrant" => {
            allowed(&[ControlPlane])?;
            let req: CreateGrantReq = parse(body)?;
            let id = resolve(ks, &req.key_id)?;
            if req.operations.is_empty() || req.operations.iter().any(|o| o != "Decrypt") {
                return Err(err(
                    "ValidationException",
                    "this KMS grants only the Decrypt operation",
                ));
            }
            let c = req.constraints.unwrap_or_default();
            let mut subset = c.encryption_context_subset;
            subset.extend(c.encryption_context_equals);
            if subset.is_empty() {
                return Err(err(
                    "ValidationException",
                    "a grant must constrain the encryption context (the volume)",
                ));
            }
            let grant_id = new_uuid().replace('-', "");
            let token = new_uuid().replace('-', "") + &new_uuid().replace('-', "");
            let grant = Grant {
                key_id: id,
                grantee: req.grantee_principal,
                operations: req.operations,
                context_subset: subset,
                name: req.name,
                token: token.clone(),
            };
            ks.put_grant(&grant_id, &grant).map_err(internal)?;
            Ok(json!({ "GrantId": grant_id, "GrantToken": token }))
        }
        "RetireGrant" => {
            allowed(&[ControlPlane])?;
            let req: RetireGrantReq = parse(body)?;
            let grants = ks.grants().map_err(internal)?;
            let found = grants.iter().find(|(gid, g)| {
                match (&req.grant_token, &req.grant_id, &req.key_id) {
                    (Some(t), _, _) => &g.token == t,
                    (None, Some(id), Some(k)) => {
                        gid == id && resolve(ks, k).is_ok_and(|k| k == g.key_id)
                    }
                    _ => false,
                }
            });
            match found {
                Some((gid, _)) => {
                    ks.remove_grant(gid).map_err(internal)?;
                    Ok(json!({}))
                }
                None if req.grant_token.is_none()
                    && (req.grant_id.is_none() || req.key_id.is_none()) =>
                {
                    Err(err(
                        "ValidationException",
                        "give GrantToken, or KeyId and GrantId",
                    ))
                }
                None => Err(err("NotFoundException", "no such grant")),
            }
        }
        "ListGrants" => {
            allowed(&[ControlPlane])?;
            let req: KeyIdOnly = parse(body)?;
            let id = resolve(ks, &req.key_id)?;
            let grants: Vec<Value> = ks
                .grants()
                .map_err(internal)?
                .into_iter()
                .filter(|(_, g)| g.key_id == id)
                .map(|(gid, g)| {
                    json!({
                        "KeyId": arn(region, &g.key_id),
                        "GrantId": gid,
                        "Name": g.name,
                        "GranteePrincipal": g.grantee,
                        "Operations": g.operations,
                        "Constraints": { "EncryptionContextSubset": g.context_subset },
                    })
                })
                .collect();
            Ok(json!({ "Grants": grants, "Truncated": false }))
        }
        other => Err(err(
            "UnknownOperationException",
            format!("operation {other} is not supported"),
        )),
    }
}

fn is_manifest_mac(context: &BTreeMap<String, String>) -> bool {
    context
        .get("blockfleet:purpose")
        .is_some_and(|p| p == "manifest-mac")
}

/// A live grant lets `who` decrypt with `key_id` when the request's context holds every pair of
/// the grant's constraint.
fn has_grant(
    ks: &Keystore,
    who: &Principal,
    key_id: &str,
    context: &BTreeMap<String, String>,
) -> Result<bool, ApiError> {
    Ok(ks.grants().map_err(internal)?.iter().any(|(_, g)| {
        g.key_id == key_id
            && g.grantee == who.name
            && g.operations.iter().any(|o| o == "Decrypt")
            && g.context_subset
                .iter()
                .all(|(k, v)| context.get(k) == Some(v))
    }))
}
