//! The EC2 Query API (SigV4 service `ec2`, version 2016-11-15) on the EBS endpoint, so one base
//! URL serves `aws ec2 ...` (create-snapshots, describe-snapshots and its waiters,
//! create-volume, attach-volume, ...) and the EBS direct APIs, as coldsnap expects.
//!
//! Each action maps onto the control plane's own (same checks, same state); callers are the
//! control plane's `admin` and `user` principals under the same policy table. `POST /` with a
//! form-encoded body; replies are XML ([`xml`]), parameters parsed by [`query`].

mod query;
mod xml;

use std::sync::Arc;
use std::time::SystemTime;

use blockfleet_api::{
    Instance, Snapshot, SnapshotSet, SnapshotState, Volume, VolumeState, VolumesReply,
};
use blockfleet_core::config::FleetRole;
use blockfleet_core::sigv4::{self, SigV4Error};
use bytes::Bytes;
use http_body_util::Full;
use hyper::http::request::Parts;
use hyper::Response;
use serde_json::{json, Value};

use self::query::{matches, Params};
use self::xml::{time, Ec2Error, Xml};
use super::auth::allowed;
use super::ControlPlane;

const GIB: u64 = 1 << 30;
/// What the API version parameter must say (the only one spoken).
const VERSION: &str = "2016-11-15";
/// The availability zone every volume reports (one fleet, one zone).
const ZONE: &str = "blockfleet-1a";

type Ec2Reply = Result<String, Ec2Error>;

/// Whether a request is for the EC2 Query API rather than the EBS direct APIs.
pub(super) fn is_ec2(parts: &Parts) -> bool {
    parts.method == hyper::Method::POST
        && parts.uri.path() == "/"
        && parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

fn request_id() -> String {
    blockfleet_core::ids::new_uuid()
}

fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn size_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// The JSON body an action of the control plane takes.
fn json_body(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap_or_default()
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Ec2Error> {
    serde_json::from_value(v).map_err(|e| Ec2Error {
        status: 500,
        code: "InternalError".into(),
        message: format!("unexpected control-plane reply: {e}"),
    })
}

/// The list `name` of a control-plane reply.
fn list_of<T: serde::de::DeserializeOwned>(reply: Value, name: &str) -> Result<Vec<T>, Ec2Error> {
    from(reply.get(name).cloned().unwrap_or(Value::Null))
}

/// The page of `items` (sorted by `key`) after `NextToken`, at most `MaxResults`.
fn page<T>(
    p: &Params,
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
) -> Result<(Vec<T>, Option<String>), Ec2Error> {
    let max = match p.number("MaxResults")? {
        Some(m) if !(5..=1000).contains(&m) => {
            return Err(Ec2Error::invalid(format!(
                "Value ({m}) for parameter MaxResults is invalid: 5 to 1000"
            )))
        }
        Some(m) => m as usize,
        None => usize::MAX,
    };
    items.sort_by_key(&key);
    if let Some(t) = p.get("NextToken") {
        let after = String::from_utf8(hex::decode(t).unwrap_or_default())
            .map_err(|_| Ec2Error::new("InvalidNextToken", "The token is not valid"))?;
        if after.is_empty() {
            return Err(Ec2Error::new("InvalidNextToken", "The token is not valid"));
        }
        items.retain(|i| key(i) > after);
    }
    let next = (items.len() > max).then(|| hex::encode(key(&items[max - 1])));
    items.truncate(max);
    Ok((items, next))
}

fn snapshot_state(s: SnapshotState) -> &'static str {
    match s {
        SnapshotState::Pending => "pending",
        SnapshotState::Completed => "completed",
        SnapshotState::Error => "error",
    }
}

fn progress(s: &Snapshot) -> String {
    match (s.state, s.changed_chunks) {
        (SnapshotState::Completed, _) => "100%".into(),
        (_, Some(t)) if t > 0 => format!("{}%", (s.done_chunks * 100 / t).min(99)),
        _ => "0%".into(),
    }
}

/// A snapshot's fields (`snapshotInfo` of CreateSnapshots uses `state`, the rest `status`).
fn write_snapshot(x: &mut Xml, s: &Snapshot, state_name: &str) {
    x.leaf("snapshotId", &s.snapshot_id);
    if let Some(v) = &s.volume_id {
        x.leaf("volumeId", v);
    }
    x.leaf(state_name, snapshot_state(s.state))
        .leaf("startTime", time(s.created_at))
        .leaf("progress", progress(s))
        .leaf("ownerId", "blockfleet")
        .leaf("volumeSize", size_gib(s.volume_size))
        .leaf("description", &s.description)
        .leaf("encrypted", s.encrypted);
    if let Some(k) = &s.kms_key_id {
        x.leaf("kmsKeyId", k);
    }
    if let Some(e) = &s.error {
        x.leaf("stateMessage", e);
    }
    x.tags(&s.tags);
}

fn volume_status(v: &Volume) -> &'static str {
    match v.state {
        VolumeState::Creating => "creating",
        VolumeState::Available => "available",
        VolumeState::InUse => "in-use",
        VolumeState::Deleting => "deleting",
    }
}

fn write_attachment(x: &mut Xml, v: &Volume, status: &str) {
    if let Some(a) = &v.attachment {
        x.leaf("volumeId", &v.volume_id)
            .leaf("instanceId", &a.instance_id)
            .leaf("device", &a.device)
            .leaf("status", status)
            .leaf("attachTime", time(a.attached_at))
            .leaf("deleteOnTermination", false);
    }
}

fn write_volume(x: &mut Xml, v: &Volume) {
    x.leaf("volumeId", &v.volume_id)
        .leaf("size", size_gib(v.size))
        .leaf(
            "snapshotId",
            v.snapshot_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        )
        .leaf("availabilityZone", ZONE)
        .leaf("status", volume_status(v))
        .leaf("createTime", time(v.created_at));
    let attached: Vec<&Volume> = v.attachment.iter().map(|_| v).collect();
    x.items("attachmentSet", &attached, |x, v| {
        write_attachment(x, v, "attached")
    });
    x.leaf("volumeType", "gp3").leaf("encrypted", v.encrypted);
    if let Some(k) = &v.kms_key_id {
        x.leaf("kmsKeyId", k);
    }
    x.tags(&v.tags);
}

impl ControlPlane {
    /// Serves one EC2 Query request (already known to be one: [`is_ec2`]).
    pub(super) async fn ec2_request(
        self: &Arc<Self>,
        parts: Parts,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let id = request_id();
        match self.ec2_action(&parts, &body, &id).await {
            Ok(doc) => reply(200, doc),
            Err(e) => {
                tracing::info!(code = %e.code, error = %e.message, "ec2 request refused");
                reply(e.status, xml::error_document(&e, &id))
            }
        }
    }

    async fn ec2_action(self: &Arc<Self>, parts: &Parts, body: &[u8], id: &str) -> Ec2Reply {
        let caller = sigv4::verify_request(parts, body, "ec2", SystemTime::now(), |akid| {
            self.principal(akid)
                .map(|p| p.secret_access_key.expose().to_owned())
        })
        .map_err(|e| Ec2Error {
            status: 401,
            code: match e {
                SigV4Error::UnknownAccessKey => "AuthFailure",
                _ => "SignatureDoesNotMatch",
            }
            .into(),
            message: e.to_string(),
        })?;
        let role = self
            .principal(&caller.access_key_id)
            .map(|p| p.role)
            .unwrap_or(FleetRole::User);
        let p = Params::parse(body)?;
        let action = p.required("Action")?.to_owned();
        match p.get("Version") {
            Some(VERSION) => {}
            other => {
                return Err(Ec2Error::new(
                    "InvalidParameterValue",
                    format!(
                        "Version {} is not spoken here: {VERSION}",
                        other.unwrap_or("(none)")
                    ),
                ))
            }
        }
        // The control-plane action each EC2 action is, for the policy table.
        let cp_action = match action.as_str() {
            "CreateSnapshot" => "CreateSnapshots",
            a => a,
        };
        if !allowed(role, cp_action) {
            return Err(match role {
                FleetRole::Admin | FleetRole::User => Ec2Error::new(
                    "InvalidAction",
                    format!("The action {action} is not valid for this web service."),
                ),
                _ => Ec2Error {
                    status: 403,
                    code: "UnauthorizedOperation".into(),
                    message: format!(
                        "You are not authorized to perform this operation ({action})."
                    ),
                },
            });
        }
        match action.as_str() {
            "CreateSnapshots" => self.ec2_create_snapshots(&p, id).await,
            "CreateSnapshot" => self.ec2_create_snapshot(&p, id).await,
            "DescribeSnapshots" => self.ec2_describe_snapshots(&p, id),
            "DeleteSnapshot" => {
                let s = p.required("SnapshotId")?;
                self.delete_snapshot(&json_body(json!({ "snapshot_id": s })))
                    .await?;
                Ok(Xml::response("DeleteSnapshot", id, |x| {
                    x.leaf("return", true);
                }))
            }
            "CreateVolume" => self.ec2_create_volume(&p, id).await,
            "DescribeVolumes" => self.ec2_describe_volumes(&p, id).await,
            "DeleteVolume" => {
                let v = p.required("VolumeId")?;
                self.delete_volume(&json_body(json!({ "volume_id": v })))
                    .await?;
                Ok(Xml::response("DeleteVolume", id, |x| {
                    x.leaf("return", true);
                }))
            }
            "AttachVolume" => self.ec2_attach(&p, id).await,
            "DetachVolume" => self.ec2_detach(&p, id).await,
            "DescribeInstances" => self.ec2_describe_instances(&p, id),
            _ => Err(Ec2Error::new(
                "InvalidAction",
                format!("The action {action} is not valid for this web service."),
            )),
        }
    }

    async fn ec2_create_snapshots(self: &Arc<Self>, p: &Params, id: &str) -> Ec2Reply {
        let instance = p.required("InstanceSpecification.InstanceId")?;
        let copy_tags = match p.get("CopyTagsFromSource") {
            None => false,
            Some("volume") => true,
            Some(o) => {
                return Err(Ec2Error::invalid(format!(
                    "Value ({o}) for parameter CopyTagsFromSource is invalid: volume"
                )))
            }
        };
        let req = json!({
            "instance_id": instance,
            "exclude_boot_volume": p.bool("InstanceSpecification.ExcludeBootVolume")?,
            "exclude_volume_ids": p.list("InstanceSpecification.ExcludeDataVolumeId")?,
            "description": p.get("Description").unwrap_or(""),
            "tags": p.tags_for("snapshot")?,
            "copy_tags_from_source": copy_tags,
        });
        let set: SnapshotSet = from(self.create_snapshots(&json_body(req)).await?)?;
        Ok(Xml::response("CreateSnapshots", id, |x| {
            x.items("snapshotSet", &set.snapshots, |x, s| {
                write_snapshot(x, s, "state")
            });
        }))
    }

    /// One volume's snapshot: a CreateSnapshots of its instance leaving out every other volume
    /// (the coordinator cuts attached volumes: it pauses their host agent).
    async fn ec2_create_snapshot(self: &Arc<Self>, p: &Params, id: &str) -> Ec2Reply {
        let vid = p.required("VolumeId")?;
        let v = self.ec2_volume(vid).await?;
        let Some(a) = &v.attachment else {
            return Err(Ec2Error::new(
                "IncorrectState",
                format!(
                    "volume {vid} is not attached: blockfleet snapshots attached volumes \
                     (AttachVolume first)"
                ),
            ));
        };
        let instances: Vec<Instance> = list_of(
            self.describe_instances(&json_body(json!({ "instance_ids": [a.instance_id] })))?,
            "instances",
        )?;
        let others: Vec<String> = instances
            .iter()
            .flat_map(|i| &i.volumes)
            .filter(|iv| iv.volume_id != v.volume_id && !iv.boot)
            .map(|iv| iv.volume_id.to_string())
            .collect();
        let req = json!({
            "instance_id": a.instance_id,
            "exclude_boot_volume": !a.boot,
            "exclude_volume_ids": others,
            "description": p.get("Description").unwrap_or(""),
            "tags": p.tags_for("snapshot")?,
        });
        let set: SnapshotSet = from(self.create_snapshots(&json_body(req)).await?)?;
        let s = set
            .snapshots
            .iter()
            .find(|s| s.volume_id.as_ref() == Some(&v.volume_id))
            .ok_or_else(|| {
                Ec2Error::from(blockfleet_core::httpjson::ApiError::internal(
                    "the set holds no snapshot of the volume",
                ))
            })?;
        Ok(Xml::response("CreateSnapshot", id, |x| {
            write_snapshot(x, s, "status")
        }))
    }

    fn ec2_describe_snapshots(&self, p: &Params, id: &str) -> Ec2Reply {
        let ids = p.list("SnapshotId")?;
        let filters = p.filters()?;
        let all: Vec<Snapshot> = list_of(
            self.describe_snapshots(&json_body(json!({ "snapshot_ids": ids })))?,
            "snapshots",
        )?;
        let mut kept = Vec::new();
        for s in all {
            let field = |name: &str| -> Vec<String> {
                match name {
                    "status" => vec![snapshot_state(s.state).to_owned()],
                    "volume-id" => s.volume_id.iter().map(ToString::to_string).collect(),
                    "snapshot-id" => vec![s.snapshot_id.to_string()],
                    "description" => vec![s.description.clone()],
                    "encrypted" => vec![s.encrypted.to_string()],
                    "owner-id" => vec!["blockfleet".into()],
                    "progress" => vec![progress(&s)],
                    _ => Vec::new(),
                }
            };
            let known = [
                "status",
                "volume-id",
                "snapshot-id",
                "description",
                "encrypted",
                "owner-id",
                "progress",
            ];
            if matches(&filters, &known, &field, &s.tags)? {
                kept.push(s);
            }
        }
        let (kept, next) = page(p, kept, |s| s.snapshot_id.to_string())?;
        Ok(Xml::response("DescribeSnapshots", id, |x| {
            x.items("snapshotSet", &kept, |x, s| write_snapshot(x, s, "status"));
            if let Some(n) = &next {
                x.leaf("nextToken", n);
            }
        }))
    }

    async fn ec2_create_volume(self: &Arc<Self>, p: &Params, id: &str) -> Ec2Reply {
        let size = p
            .number("Size")?
            .map(|g| {
                g.checked_mul(GIB)
                    .ok_or_else(|| Ec2Error::invalid(format!("Size {g} GiB is too large")))
            })
            .transpose()?;
        let snapshot = p.get("SnapshotId");
        if size.is_none() && snapshot.is_none() {
            return Err(Ec2Error::new(
                "MissingParameter",
                "The request must contain the parameter size or snapshotId",
            ));
        }
        let kms = p.get("KmsKeyId");
        let encrypted = p.bool("Encrypted")? || kms.is_some();
        let mut req = json!({ "encrypted": encrypted, "tags": p.tags_for("volume")? });
        if let Some(s) = size {
            req["size"] = json!(s);
        }
        if let Some(s) = snapshot {
            req["snapshot_id"] = json!(s);
        }
        if let Some(k) = kms {
            req["kms_key_id"] = json!(k);
        }
        if let Some(t) = p.get("ClientToken") {
            req["client_token"] = json!(t);
        }
        let created: VolumesReply = from(self.create_volume(&json_body(req)).await?)?;
        let v = created.volumes.into_iter().next().ok_or_else(|| {
            Ec2Error::from(blockfleet_core::httpjson::ApiError::internal(
                "no volume made",
            ))
        })?;
        Ok(Xml::response("CreateVolume", id, |x| write_volume(x, &v)))
    }

    async fn ec2_describe_volumes(&self, p: &Params, id: &str) -> Ec2Reply {
        let ids = p.list("VolumeId")?;
        let filters = p.filters()?;
        let all: VolumesReply = from(
            self.describe_volumes(&json_body(json!({ "volume_ids": ids })))
                .await?,
        )?;
        let mut kept = Vec::new();
        for v in all.volumes {
            let field = |name: &str| -> Vec<String> {
                let a = v.attachment.as_ref();
                match name {
                    "status" => vec![volume_status(&v).to_owned()],
                    "volume-id" => vec![v.volume_id.to_string()],
                    "snapshot-id" => v.snapshot_id.iter().map(ToString::to_string).collect(),
                    "size" => vec![size_gib(v.size).to_string()],
                    "encrypted" => vec![v.encrypted.to_string()],
                    "availability-zone" => vec![ZONE.into()],
                    "attachment.instance-id" => {
                        a.map(|a| a.instance_id.to_string()).into_iter().collect()
                    }
                    "attachment.device" => a.map(|a| a.device.clone()).into_iter().collect(),
                    "attachment.status" => a.map(|_| "attached".to_owned()).into_iter().collect(),
                    _ => Vec::new(),
                }
            };
            let known = [
                "status",
                "volume-id",
                "snapshot-id",
                "size",
                "encrypted",
                "availability-zone",
                "attachment.instance-id",
                "attachment.device",
                "attachment.status",
            ];
            if matches(&filters, &known, &field, &v.tags)? {
                kept.push(v);
            }
        }
        let (kept, next) = page(p, kept, |v| v.volume_id.to_string())?;
        Ok(Xml::response("DescribeVolumes", id, |x| {
            x.items("volumeSet", &kept, write_volume);
            if let Some(n) = &next {
                x.leaf("nextToken", n);
            }
        }))
    }

    async fn ec2_attach(&self, p: &Params, id: &str) -> Ec2Reply {
        let req = json!({
            "volume_id": p.required("VolumeId")?,
            "instance_id": p.required("InstanceId")?,
            "device": p.required("Device")?,
        });
        self.attach_volume(&json_body(req)).await?;
        let v = self.ec2_volume(p.required("VolumeId")?).await?;
        Ok(Xml::response("AttachVolume", id, |x| {
            write_attachment(x, &v, "attached")
        }))
    }

    async fn ec2_detach(&self, p: &Params, id: &str) -> Ec2Reply {
        let vid = p.required("VolumeId")?;
        let before = self.ec2_volume(vid).await?;
        if let (Some(want), Some(a)) = (p.get("InstanceId"), &before.attachment) {
            if want != a.instance_id.as_str() {
                return Err(Ec2Error::new(
                    "InvalidAttachment.NotFound",
                    format!("volume {vid} is not attached to instance {want}"),
                ));
            }
        }
        self.detach_volume(&json_body(json!({ "volume_id": vid })))
            .await?;
        Ok(Xml::response("DetachVolume", id, |x| {
            write_attachment(x, &before, "detached")
        }))
    }

    async fn ec2_volume(&self, vid: &str) -> Result<Volume, Ec2Error> {
        let r: VolumesReply = from(
            self.describe_volumes(&json_body(json!({ "volume_ids": [vid] })))
                .await?,
        )?;
        r.volumes.into_iter().next().ok_or_else(|| {
            Ec2Error::new(
                "InvalidVolume.NotFound",
                format!("The volume '{vid}' does not exist."),
            )
        })
    }

    fn ec2_describe_instances(&self, p: &Params, id: &str) -> Ec2Reply {
        let ids = p.list("InstanceId")?;
        let instances: Vec<Instance> = list_of(
            self.describe_instances(&json_body(json!({ "instance_ids": ids })))?,
            "instances",
        )?;
        Ok(Xml::response("DescribeInstances", id, |x| {
            x.items("reservationSet", &instances, |x, i| {
                x.leaf(
                    "reservationId",
                    format!("r-{}", &i.instance_id.as_str()[2..]),
                )
                .leaf("ownerId", "blockfleet");
                x.items("instancesSet", std::slice::from_ref(i), |x, i| {
                    x.leaf("instanceId", &i.instance_id);
                    x.node("instanceState", |x| {
                        x.leaf("code", 16).leaf("name", "running");
                    });
                    x.items("blockDeviceMapping", &i.volumes, |x, v| {
                        x.leaf("deviceName", &v.device);
                        x.node("ebs", |x| {
                            x.leaf("volumeId", &v.volume_id)
                                .leaf("status", "attached")
                                .leaf("deleteOnTermination", false);
                        });
                    });
                    if let Some(root) = i.volumes.iter().find(|v| v.boot) {
                        x.leaf("rootDeviceName", &root.device);
                    }
                });
            });
        }))
    }
}
