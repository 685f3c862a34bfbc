//! AWS Signature Version 4 for the services blockfleet serves: verification (the embedded KMS,
//! the EBS direct APIs, the control plane's own API as service [`FLEET_SERVICE`]) and signing
//! (the fleet's own clients).
//!
//! The server parses the `Authorization` header, finds the caller's secret by access key id,
//! and has the `aws-sigv4` crate compute the signature of the request as received over exactly
//! the headers the caller signed; the two must match (compared in constant time), and the
//! request's `X-Amz-Date` must be within 15 minutes of now.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use thiserror::Error;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The SigV4 service name of the control plane's API.
pub const FLEET_SERVICE: &str = "blockfleet";
/// The SigV4 region the fleet's own clients sign for.
pub const FLEET_REGION: &str = "blockfleet";
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SigV4Error {
    #[error("missing or malformed Authorization header: {0}")]
    Malformed(String),
    #[error("the access key id is not known")]
    UnknownAccessKey,
    #[error("the request signature does not match")]
    BadSignature,
    #[error("the request time is more than 15 minutes from the server's")]
    Expired,
    #[error("credential scope is for service {got:?}, not {expected:?}")]
    WrongService { got: String, expected: String },
}

/// A request as received, for verification.
#[derive(Debug)]
pub struct Received<'a> {
    pub method: &'a str,
    /// Path and query, as on the request line.
    pub path_and_query: &'a str,
    /// Every header, names in any case.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub access_key_id: String,
    pub region: String,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn parse_amz_date(s: &str) -> Option<SystemTime> {
    // 20261123T204501Z
    if s.len() != 16 || &s[8..9] != "T" || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    let days = days.checked_sub(719_468)?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + mi * 60 + se))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verifies a received HTTP request (its head and whole body) for `service`: see [`verify`].
pub fn verify_request(
    parts: &hyper::http::request::Parts,
    body: &[u8],
    service: &str,
    now: SystemTime,
    secret_for: impl Fn(&str) -> Option<String>,
) -> Result<Caller, SigV4Error> {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let received = Received {
        method: parts.method.as_str(),
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers: &headers,
        body,
    };
    verify(&received, service, now, secret_for)
}

/// Verifies a SigV4-signed request for `service`; `secret_for` maps an access key id to its
/// secret. Returns the caller on success.
pub fn verify(
    req: &Received<'_>,
    service: &str,
    now: SystemTime,
    secret_for: impl Fn(&str) -> Option<String>,
) -> Result<Caller, SigV4Error> {
    let malformed = |m: &str| SigV4Error::Malformed(m.to_owned());
    let auth =
        header(req.headers, "authorization").ok_or_else(|| malformed("no Authorization header"))?;
    let rest = auth
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| malformed("algorithm is not AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| malformed("bad field"))?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed_headers = Some(v),
            "Signature" => signature = Some(v),
            _ => {}
        }
    }
    let credential = credential.ok_or_else(|| malformed("no Credential"))?;
    let signed_headers = signed_headers.ok_or_else(|| malformed("no SignedHeaders"))?;
    let signature = signature.ok_or_else(|| malformed("no Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, svc, "aws4_request"] = scope[..] else {
        return Err(malformed("bad credential scope"));
    };
    if svc != service {
        return Err(SigV4Error::WrongService {
            got: svc.to_owned(),
            expected: service.to_owned(),
        });
    }
    let amz_date = header(req.headers, "x-amz-date").ok_or_else(|| malformed("no X-Amz-Date"))?;
    let time = parse_amz_date(amz_date).ok_or_else(|| malformed("bad X-Amz-Date"))?;
    if !amz_date.starts_with(date) {
        return Err(malformed("credential date differs from X-Amz-Date"));
    }
    let skew = now.duration_since(time).unwrap_or_else(|e| e.duration());
    if skew > MAX_SKEW {
        return Err(SigV4Error::Expired);
    }
    let secret = secret_for(akid).ok_or(SigV4Error::UnknownAccessKey)?;

    let names: Vec<&str> = signed_headers.split(';').collect();
    if !names.contains(&"host") {
        return Err(malformed("host is not signed"));
    }
    let mut signed = Vec::new();
    for name in &names {
        if *name == "x-amz-date" {
            continue; // aws-sigv4 inserts it from the signing time
        }
        for (n, v) in req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            signed.push((n.as_str(), v.as_str()));
        }
    }
    let identity = Credentials::new(akid, secret, None, None, "blockfleet-verifier").into();
    let mut settings = SigningSettings::default();
    settings.excluded_headers = None;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SigV4Error::Malformed(e.to_string()))?
        .into();
    // The payload as signed: the body itself, or the hash the caller declared (checked here
    // against the body), or not at all (`UNSIGNED-PAYLOAD`, as SDKs send large uploads).
    let declared = header(req.headers, "x-amz-content-sha256");
    let body = match declared {
        Some("UNSIGNED-PAYLOAD") => SignableBody::UnsignedPayload,
        Some(h) => {
            use sha2::Digest;
            if !h.eq_ignore_ascii_case(&hex::encode(sha2::Sha256::digest(req.body))) {
                return Err(SigV4Error::BadSignature);
            }
            SignableBody::Precomputed(h.to_owned())
        }
        None => SignableBody::Bytes(req.body),
    };
    let signable = SignableRequest::new(req.method, req.path_and_query, signed.into_iter(), body)
        .map_err(|e| SigV4Error::Malformed(e.to_string()))?;
    let expected = sign(signable, &params)
        .map_err(|e| SigV4Error::Malformed(e.to_string()))?
        .signature()
        .to_owned();
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(SigV4Error::BadSignature);
    }
    Ok(Caller {
        access_key_id: akid.to_owned(),
        region: region.to_owned(),
    })
}

/// Signs `req` (whose body is `body`) for `service` as of `time`: sets `host`, `x-amz-date`,
/// `x-amz-content-sha256` and `authorization`. Signs `host` and every header already set.
pub fn sign_request<B>(
    req: &mut http::Request<B>,
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    service: &str,
    region: &str,
    time: SystemTime,
) -> Result<(), SigV4Error> {
    use sha2::Digest;
    let malformed = |e: &dyn std::fmt::Display| SigV4Error::Malformed(e.to_string());
    if let Some(host) = req.uri().authority().map(|a| a.to_string()) {
        let v = http::HeaderValue::from_str(&host).map_err(|e| malformed(&e))?;
        req.headers_mut().insert(http::header::HOST, v);
    }
    let hash = hex::encode(sha2::Sha256::digest(body));
    let v = http::HeaderValue::from_str(&hash).map_err(|e| malformed(&e))?;
    req.headers_mut().insert("x-amz-content-sha256", v);
    let identity = Credentials::new(access_key_id, secret, None, None, "blockfleet").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| malformed(&e))?
        .into();
    let uri = req.uri().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        &uri,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        SignableBody::Precomputed(hash.clone()),
    )
    .map_err(|e| malformed(&e))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| malformed(&e))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates() {
        let t = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_440_938_160
        );
        assert!(parse_amz_date("2015-08-30T12:36:00Z").is_none());
        assert!(parse_amz_date("20151330T123600Z").is_none());
    }

    /// The example of the AWS SigV4 documentation (GET ?Action=ListUsers on IAM), as published.
    #[test]
    fn documented_example_verifies() {
        let headers = vec![
            ("Host".to_owned(), "iam.amazonaws.com".to_owned()),
            ("Content-Type".to_owned(), "application/x-www-form-urlencoded; charset=utf-8".to_owned()),
            ("X-Amz-Date".to_owned(), "20150830T123600Z".to_owned()),
            (
                "Authorization".to_owned(),
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7".to_owned(),
            ),
        ];
        let req = Received {
            method: "GET",
            path_and_query: "/?Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            body: b"",
        };
        let now = parse_amz_date("20150830T123900Z").unwrap();
        let secret = |k: &str| {
            (k == "AKIDEXAMPLE").then(|| "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned())
        };
        assert_eq!(
            verify(&req, "iam", now, secret).unwrap().access_key_id,
            "AKIDEXAMPLE"
        );
        assert_eq!(
            verify(&req, "iam", now, |_| Some("wrong".into())),
            Err(SigV4Error::BadSignature)
        );
        assert_eq!(
            verify(&req, "iam", now, |_| None),
            Err(SigV4Error::UnknownAccessKey)
        );
        assert!(matches!(
            verify(&req, "kms", now, secret),
            Err(SigV4Error::WrongService { .. })
        ));
        let late = now + Duration::from_secs(3600);
        assert_eq!(verify(&req, "iam", late, secret), Err(SigV4Error::Expired));
        let body_changed = Received { body: b"x", ..req };
        assert_eq!(
            verify(&body_changed, "iam", now, secret),
            Err(SigV4Error::BadSignature)
        );
    }

    /// What `sign_request` signs, `verify_request` accepts, and nothing else: another body,
    /// another secret, another service, an old date.
    #[test]
    fn signed_requests_verify_and_altered_ones_do_not() {
        let now = SystemTime::now();
        let signed = |body: &[u8], time: SystemTime| {
            let mut req = http::Request::builder()
                .method("POST")
                .uri("http://127.0.0.1:7000/v1/DescribeVolumes")
                .header("content-type", "application/json")
                .body(())
                .unwrap();
            sign_request(
                &mut req,
                body,
                "AKID",
                "secret-1234",
                FLEET_SERVICE,
                FLEET_REGION,
                time,
            )
            .unwrap();
            req.into_parts().0
        };
        let secret = |k: &str| (k == "AKID").then(|| "secret-1234".to_owned());
        let parts = signed(b"{}", now);
        let caller = verify_request(&parts, b"{}", FLEET_SERVICE, now, secret).unwrap();
        assert_eq!(caller.access_key_id, "AKID");
        assert_eq!(
            verify_request(&parts, b"{\"x\":1}", FLEET_SERVICE, now, secret),
            Err(SigV4Error::BadSignature)
        );
        assert_eq!(
            verify_request(&parts, b"{}", FLEET_SERVICE, now, |_| Some(
                "other-secret".into()
            )),
            Err(SigV4Error::BadSignature)
        );
        assert!(matches!(
            verify_request(&parts, b"{}", "ebs", now, secret),
            Err(SigV4Error::WrongService { .. })
        ));
        let old = signed(b"{}", now - Duration::from_secs(16 * 60));
        assert_eq!(
            verify_request(&old, b"{}", FLEET_SERVICE, now, secret),
            Err(SigV4Error::Expired)
        );
    }
}
