//! The EC2 Query API on the EBS endpoint, driven by the AWS CLI (botocore's EC2 serializer and
//! XML parser): create-snapshots of an instance with exclusions and tags, describe-snapshots
//! with filters and its `snapshot-completed` waiter, create-volume from the snapshot
//! (encrypted), attach-volume, and the restored volume read through NBD equals the source at
//! the cut. Bad input gets EC2's error codes and changes nothing.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use std::time::SystemTime;

use blockfleet_core::sigv4::sign_request;
use common::{qemu_io, spawn, Fleet, FleetOptions};
use serde_json::Value;

/// `aws ec2 ARGS` as `key`: the parsed JSON output, or the CLI's error text.
fn ec2_as(f: &Fleet, key: (&str, &str), args: &[&str]) -> Result<Value, String> {
    common::aws("ec2", &f.ebs_endpoint, key, args)
}

const ADMIN: (&str, &str) = ("AKADMIN", "admin-secret-0123");

fn ec2(f: &Fleet, args: &[&str]) -> Value {
    ec2_as(f, ADMIN, args).unwrap_or_else(|e| panic!("aws ec2 {args:?}: {e}"))
}

/// The error code the CLI reports for a refused call.
fn ec2_error(f: &Fleet, key: (&str, &str), args: &[&str]) -> String {
    let e = ec2_as(f, key, args).expect_err("the call should be refused");
    e.split('(')
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no error code in {e:?}"))
        .to_owned()
}

fn volume_count(f: &Fleet) -> usize {
    ec2(f, &["describe-volumes"])["Volumes"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_snapshots_an_instance_and_restores_through_ec2() {
    let f = Fleet::start(FleetOptions::default());
    let instance = "i-0ec2ec2ec2ec2ec20";
    // Two volumes on one instance, tagged; only the first is to be in the set.
    let mut ids = Vec::new();
    for team in ["db", "logs"] {
        let v = ec2(
            &f,
            &[
                "create-volume",
                "--size",
                "1",
                "--availability-zone",
                "blockfleet-1a",
                "--tag-specifications",
                &format!("ResourceType=volume,Tags=[{{Key=team,Value={team}}}]"),
            ],
        );
        assert_eq!(v["Size"], 1, "{v}");
        assert_eq!(v["Tags"][0]["Value"], team, "{v}");
        ids.push(v["VolumeId"].as_str().unwrap().to_owned());
    }
    for (v, dev) in ids.iter().zip(["/dev/sdf", "/dev/sdg"]) {
        let a = ec2(
            &f,
            &[
                "attach-volume",
                "--volume-id",
                v,
                "--instance-id",
                instance,
                "--device",
                dev,
            ],
        );
        assert_eq!(a["State"], "attached", "{a}");
        assert_eq!(a["Device"], dev);
    }
    let described = ec2(
        &f,
        &[
            "describe-volumes",
            "--filters",
            &format!("Name=attachment.instance-id,Values={instance}"),
        ],
    );
    assert_eq!(described["Volumes"].as_array().unwrap().len(), 2);
    assert_eq!(
        described["Volumes"][0]["Attachments"][0]["InstanceId"],
        instance
    );
    let inst = ec2(&f, &["describe-instances", "--instance-ids", instance]);
    assert_eq!(
        inst["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{inst}"
    );

    // Data on the first volume through its host agent.
    let agent = spawn(
        &f.config,
        &["attach", "--volume", &ids[0], "--listen", "127.0.0.1:0"],
    );
    qemu_io(&agent, "write -P 0x5a 0 4M");
    qemu_io(&agent, "write -P 0xa5 4M 1M");
    drop(agent);

    // One call for the instance, leaving out the second volume; tags given and copied.
    let set = ec2(
        &f,
        &[
            "create-snapshots",
            "--instance-specification",
            &format!(
                "InstanceId={instance},ExcludeBootVolume=true,ExcludeDataVolumeIds={}",
                ids[1]
            ),
            "--tag-specifications",
            "ResourceType=snapshot,Tags=[{Key=set,Value=nightly}]",
            "--copy-tags-from-source",
            "volume",
            "--description",
            "nightly <db>",
        ],
    );
    let snaps = set["Snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{set}");
    assert_eq!(snaps[0]["VolumeId"], ids[0].as_str());
    let snap = snaps[0]["SnapshotId"].as_str().unwrap().to_owned();
    ec2(&f, &["wait", "snapshot-completed", "--snapshot-ids", &snap]);
    let d = ec2(&f, &["describe-snapshots", "--snapshot-ids", &snap]);
    let s = &d["Snapshots"][0];
    assert_eq!(s["State"], "completed", "{d}");
    assert_eq!(s["Progress"], "100%");
    assert_eq!(s["VolumeSize"], 1);
    assert_eq!(s["Description"], "nightly <db>");
    let tags: Vec<(String, String)> = s["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Key"].as_str().unwrap().to_owned(),
                t["Value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(tags.contains(&("set".into(), "nightly".into())), "{tags:?}");
    assert!(tags.contains(&("team".into(), "db".into())), "{tags:?}");
    // Filters: by tag and status finds it, by the other volume nothing.
    let by_tag = ec2(
        &f,
        &[
            "describe-snapshots",
            "--filters",
            "Name=tag:set,Values=night*",
            "Name=status,Values=completed",
        ],
    );
    assert_eq!(by_tag["Snapshots"].as_array().unwrap().len(), 1, "{by_tag}");
    let other = ec2(
        &f,
        &[
            "describe-snapshots",
            "--filters",
            &format!("Name=volume-id,Values={}", ids[1]),
        ],
    );
    assert!(other["Snapshots"].as_array().unwrap().is_empty(), "{other}");

    // A volume from the snapshot, encrypted under its own key, on another instance: it reads
    // as the source at the cut.
    let other_key = f
        .kms("AKCP", "cp-secret-0123")
        .await
        .create_key("restores")
        .await
        .unwrap();
    let restore = |token: &str, size: &str| {
        ec2_as(
            &f,
            ADMIN,
            &[
                "create-volume",
                "--snapshot-id",
                &snap,
                "--encrypted",
                "--kms-key-id",
                &other_key,
                "--size",
                size,
                "--client-token",
                token,
                "--availability-zone",
                "blockfleet-1a",
            ],
        )
    };
    let restored = restore("restore-1", "1").unwrap();
    assert_eq!(restored["Encrypted"], true, "{restored}");
    assert!(
        restored["KmsKeyId"].as_str().unwrap().contains(&other_key),
        "{restored}"
    );
    assert_eq!(restored["SnapshotId"], snap.as_str());
    // A retry with its client token is the same volume; the token with other parameters is
    // refused.
    let again = restore("restore-1", "1").unwrap();
    assert_eq!(again["VolumeId"], restored["VolumeId"], "{again}");
    let e = restore("restore-1", "2").unwrap_err();
    assert!(e.contains("IdempotentParameterMismatch"), "{e}");
    let rv = restored["VolumeId"].as_str().unwrap().to_owned();
    ec2(
        &f,
        &[
            "attach-volume",
            "--volume-id",
            &rv,
            "--instance-id",
            "i-0ec2ec2ec2ec2ec21",
            "--device",
            "/dev/sdh",
        ],
    );
    let agent = spawn(
        &f.config,
        &["attach", "--volume", &rv, "--listen", "127.0.0.1:0"],
    );
    let text = qemu_io(&agent, "read -P 0x5a 0 4M");
    assert!(text.contains("read 4194304/4194304"), "{text}");
    qemu_io(&agent, "read -P 0xa5 4M 1M");
    qemu_io(&agent, "read -P 0 5M 3M");
    drop(agent);

    // Bad input: EC2's codes, nothing changed.
    let before = volume_count(&f);
    assert_eq!(
        ec2_error(
            &f,
            ADMIN,
            &[
                "create-snapshots",
                "--instance-specification",
                "InstanceId=i-0000000000000dead"
            ]
        ),
        "InvalidInstanceID.NotFound"
    );
    assert_eq!(
        ec2_error(
            &f,
            ADMIN,
            &["describe-snapshots", "--filters", "Name=bogus,Values=x"]
        ),
        "InvalidParameterValue"
    );
    assert_eq!(
        ec2_error(
            &f,
            ADMIN,
            &[
                "describe-snapshots",
                "--snapshot-ids",
                "snap-00000000000000000"
            ]
        ),
        "InvalidSnapshot.NotFound"
    );
    assert_eq!(
        ec2_error(
            &f,
            ADMIN,
            &["delete-volume", "--volume-id", "vol-00000000000000000"]
        ),
        "InvalidVolume.NotFound"
    );
    assert_eq!(
        ec2_error(&f, ADMIN, &["delete-volume", "--volume-id", &ids[0]]),
        "VolumeInUse",
        "an attached volume"
    );
    assert_eq!(
        ec2_error(&f, ("AKADMIN", "not-the-secret"), &["describe-volumes"]),
        "SignatureDoesNotMatch"
    );
    assert_eq!(
        ec2_error(&f, ("AKNOBODY", "whatever-secret"), &["describe-volumes"]),
        "AuthFailure"
    );
    // The EBS uploader's principal is no EC2 caller.
    assert_eq!(
        ec2_error(&f, ("AKEBS", "ebs-secret-0123"), &["describe-volumes"]),
        "AuthFailure"
    );
    // A host agent's principal may not call user actions.
    assert_eq!(
        ec2_error(
            &f,
            ("AKHOSTCP", "hostcp-secret-0123"),
            &["describe-volumes"]
        ),
        "UnauthorizedOperation"
    );
    // What the CLI would never send: a missing parameter, an unknown action, another version.
    let raw = |form: &str| -> (u16, String) {
        let addr = f.ebs_endpoint.trim_start_matches("http://").to_owned();
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(())
            .unwrap();
        sign_request(
            &mut req,
            form.as_bytes(),
            ADMIN.0,
            ADMIN.1,
            "ec2",
            "local",
            SystemTime::now(),
        )
        .unwrap();
        raw_request(&addr, &req, form)
    };
    for (form, code) in [
        ("Action=DeleteVolume&Version=2016-11-15", "MissingParameter"),
        ("Action=RunInstances&Version=2016-11-15", "InvalidAction"),
        (
            "Action=DescribeVolumes&Version=2014-01-01",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&MaxResults=2",
            "InvalidParameterValue",
        ),
    ] {
        let (status, body) = raw(form);
        assert_eq!(status, 400, "{form}: {body}");
        assert!(
            body.contains(&format!("<Code>{code}</Code>")),
            "{form}: {body}"
        );
        assert!(body.contains("<RequestID>"), "{body}");
    }
    assert_eq!(volume_count(&f), before, "refused calls changed nothing");

    // Paging: five at a time through all volumes.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut args = vec!["describe-volumes", "--max-results", "5"];
        if let Some(t) = &token {
            args.extend(["--next-token", t.as_str()]);
        }
        let page = ec2(&f, &args);
        for v in page["Volumes"].as_array().unwrap() {
            seen.push(v["VolumeId"].as_str().unwrap().to_owned());
        }
        match page["NextToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), before);

    // One volume's snapshot (CreateSnapshot) cuts that volume only.
    let one = ec2(&f, &["create-snapshot", "--volume-id", &ids[1]]);
    assert_eq!(one["VolumeId"], ids[1].as_str(), "{one}");
    assert!(
        matches!(one["State"].as_str(), Some("pending" | "completed")),
        "{one}"
    );

    // Detach, delete: `true`, and gone. A detached volume has no host to cut it.
    let d = ec2(&f, &["detach-volume", "--volume-id", &rv]);
    assert_eq!(d["State"], "detached", "{d}");
    assert_eq!(
        ec2_error(&f, ADMIN, &["create-snapshot", "--volume-id", &rv]),
        "IncorrectState"
    );
    ec2(&f, &["delete-volume", "--volume-id", &rv]);
    assert_eq!(volume_count(&f), before - 1);
}

/// One raw HTTP/1.1 request with `req`'s signed headers and `body`; the status and body.
fn raw_request(addr: &str, req: &http::Request<()>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "POST / HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in req.headers() {
        head += &format!("{n}: {}\r\n", v.to_str().unwrap());
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (
        status,
        out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned(),
    )
}
