//! The EC2 Query protocol's reply side: XML documents in the 2016-11-15 namespace, and errors
//! as `<Response><Errors><Error>` with a request id.

use std::fmt::Write;

use blockfleet_core::httpjson::ApiError;

pub(super) const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// An EC2 error: HTTP status, code (as EC2 names it) and message.
#[derive(Debug)]
pub(crate) struct Ec2Error {
    pub(super) status: u16,
    pub(super) code: String,
    pub(super) message: String,
}

impl Ec2Error {
    pub(super) fn new(code: &str, message: impl Into<String>) -> Self {
        Ec2Error {
            status: 400,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Ec2Error::new("InvalidParameterValue", message)
    }
}

impl From<ApiError> for Ec2Error {
    /// The control plane's codes are EC2's already; EC2 answers client errors with 400.
    fn from(e: ApiError) -> Self {
        let code = match e.code.as_str() {
            "InvalidParameter" => "InvalidParameterValue".to_owned(),
            "InvalidAction" => "InvalidAction".to_owned(),
            other => other.to_owned(),
        };
        let status = match e.status {
            401 | 403 | 500 | 503 => e.status,
            _ => 400,
        };
        Ec2Error {
            status,
            code,
            message: e.message,
        }
    }
}

/// Escapes text for an element's content.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// An XML document being written: elements open and close in order.
#[derive(Debug, Default)]
pub(super) struct Xml {
    out: String,
}

impl Xml {
    /// `<{action}Response xmlns=...><requestId>..</requestId>` then `body`, then the close.
    pub(super) fn response(action: &str, request_id: &str, body: impl FnOnce(&mut Xml)) -> String {
        let mut x = Xml::default();
        let _ = write!(
            x.out,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response xmlns=\"{NAMESPACE}\">"
        );
        x.leaf("requestId", request_id);
        body(&mut x);
        let _ = write!(x.out, "</{action}Response>");
        x.out
    }

    /// `<name>text</name>`.
    pub(super) fn leaf(&mut self, name: &str, text: impl std::fmt::Display) -> &mut Self {
        let _ = write!(self.out, "<{name}>{}</{name}>", escape(&text.to_string()));
        self
    }

    /// `<name>` ... `</name>` around `body`.
    pub(super) fn node(&mut self, name: &str, body: impl FnOnce(&mut Xml)) -> &mut Self {
        let _ = write!(self.out, "<{name}>");
        body(self);
        let _ = write!(self.out, "</{name}>");
        self
    }

    /// `<name><item>..</item>...</name>`, one item per element of `items`.
    pub(super) fn items<T>(
        &mut self,
        name: &str,
        items: &[T],
        mut each: impl FnMut(&mut Xml, &T),
    ) -> &mut Self {
        self.node(name, |x| {
            for i in items {
                x.node("item", |x| each(x, i));
            }
        })
    }

    /// `<tagSet>` of key/value items.
    pub(super) fn tags(&mut self, tags: &std::collections::BTreeMap<String, String>) -> &mut Self {
        let pairs: Vec<_> = tags.iter().collect();
        self.items("tagSet", &pairs, |x, (k, v)| {
            x.leaf("key", k).leaf("value", v);
        })
    }
}

/// The error document.
pub(super) fn error_document(e: &Ec2Error, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        escape(&e.code),
        escape(&e.message),
        escape(request_id)
    )
}

/// Seconds since the epoch (how the control plane keeps times) as EC2 writes them
/// (`2026-12-07T03:04:05.000Z`).
pub(super) fn time(secs: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_escape_and_nest() {
        let doc = Xml::response("DeleteVolume", "r-1", |x| {
            x.leaf("return", true);
            x.items("set", &["a<b", "c&d"], |x, s| {
                x.leaf("v", s);
            });
        });
        assert!(doc.starts_with("<?xml"));
        assert!(doc.contains(&format!("<DeleteVolumeResponse xmlns=\"{NAMESPACE}\">")));
        assert!(doc.contains("<requestId>r-1</requestId><return>true</return>"));
        assert!(doc.contains("<set><item><v>a&lt;b</v></item><item><v>c&amp;d</v></item></set>"));
        assert!(doc.ends_with("</DeleteVolumeResponse>"));
        let e = error_document(&Ec2Error::new("X", "a <b>"), "r");
        assert!(e.contains("<Code>X</Code><Message>a &lt;b&gt;</Message>"));
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
    }
}
