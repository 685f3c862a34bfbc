//! The EC2 Query protocol's request side: form-encoded parameters (`Action=...&Name.1=...`),
//! with the list, filter and tag-specification forms the AWS SDKs and the AWS CLI send.

use std::collections::{BTreeMap, HashMap};

use super::xml::Ec2Error;

/// One request's parameters.
#[derive(Debug)]
pub(super) struct Params(HashMap<String, String>);

impl Params {
    /// Parses a form-encoded body; a parameter given twice is an error (it has no meaning).
    pub(super) fn parse(body: &[u8]) -> Result<Params, Ec2Error> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Ec2Error::invalid(format!("parameter {k} is given twice")));
            }
        }
        Ok(Params(map))
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub(super) fn required(&self, name: &str) -> Result<&str, Ec2Error> {
        self.get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            Ec2Error::new(
                "MissingParameter",
                format!("The request must contain the parameter {name}"),
            )
        })
    }

    pub(super) fn bool(&self, name: &str) -> Result<bool, Ec2Error> {
        match self.get(name) {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(Ec2Error::invalid(format!(
                "Value ({v}) for parameter {name} is invalid: true or false"
            ))),
        }
    }

    pub(super) fn number(&self, name: &str) -> Result<Option<u64>, Ec2Error> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    Ec2Error::invalid(format!(
                        "Value ({v}) for parameter {name} is invalid: a whole number"
                    ))
                })
            })
            .transpose()
    }

    /// `Prefix.1`, `Prefix.2`, ... in order; a gap ends nothing (members are sorted by index).
    pub(super) fn list(&self, prefix: &str) -> Result<Vec<String>, Ec2Error> {
        let mut items: Vec<(u32, String)> = Vec::new();
        let dotted = format!("{prefix}.");
        for (k, v) in &self.0 {
            if let Some(rest) = k.strip_prefix(&dotted) {
                if let Ok(i) = rest.parse::<u32>() {
                    items.push((i, v.clone()));
                }
            }
        }
        items.sort();
        Ok(items.into_iter().map(|(_, v)| v).collect())
    }

    /// The indexes `n` for which some `Prefix.n.` parameter exists.
    fn indexes(&self, prefix: &str) -> Vec<u32> {
        let dotted = format!("{prefix}.");
        let mut out: Vec<u32> = self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&dotted)?.split('.').next()?.parse().ok())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// `Filter.N.Name` with its `Filter.N.Value.M`.
    pub(super) fn filters(&self) -> Result<Vec<(String, Vec<String>)>, Ec2Error> {
        self.indexes("Filter")
            .into_iter()
            .map(|n| {
                let name = self.required(&format!("Filter.{n}.Name"))?.to_owned();
                let values = self.list(&format!("Filter.{n}.Value"))?;
                Ok((name, values))
            })
            .collect()
    }

    /// The tags of `TagSpecification.N` whose ResourceType is `resource` (another resource
    /// type is an error: it would tag nothing).
    pub(super) fn tags_for(&self, resource: &str) -> Result<BTreeMap<String, String>, Ec2Error> {
        let mut tags = BTreeMap::new();
        for n in self.indexes("TagSpecification") {
            let kind = self.required(&format!("TagSpecification.{n}.ResourceType"))?;
            if kind != resource {
                return Err(Ec2Error::invalid(format!(
                    "TagSpecification.{n}.ResourceType {kind} cannot be tagged here ({resource} only)"
                )));
            }
            let prefix = format!("TagSpecification.{n}.Tag");
            for m in self.indexes(&prefix) {
                let key = self.required(&format!("{prefix}.{m}.Key"))?.to_owned();
                let value = self.get(&format!("{prefix}.{m}.Value")).unwrap_or("");
                tags.insert(key, value.to_owned());
            }
        }
        Ok(tags)
    }
}

/// Whether `tags` and the other `fields` (filter name -> values of the item) match every filter.
/// Unknown filter names are an error, as in EC2.
pub(super) fn matches(
    filters: &[(String, Vec<String>)],
    known: &[&str],
    fields: &dyn Fn(&str) -> Vec<String>,
    tags: &BTreeMap<String, String>,
) -> Result<bool, Ec2Error> {
    for (name, values) in filters {
        let have: Vec<String> = if let Some(key) = name.strip_prefix("tag:") {
            tags.get(key).cloned().into_iter().collect()
        } else if name == "tag-key" {
            tags.keys().cloned().collect()
        } else if known.contains(&name.as_str()) {
            fields(name)
        } else {
            return Err(Ec2Error::invalid(format!("The filter '{name}' is invalid")));
        };
        if !have.iter().any(|h| values.iter().any(|v| glob(v, h))) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// EC2 filter values take `*` (any run) and `?` (one character).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_filters_and_tags() {
        let p = Params::parse(
            b"Action=X&SnapshotId.2=b&SnapshotId.1=a&Filter.1.Name=status&Filter.1.Value.1=completed\
              &TagSpecification.1.ResourceType=snapshot&TagSpecification.1.Tag.1.Key=k\
              &TagSpecification.1.Tag.1.Value=v%20w",
        )
        .unwrap();
        assert_eq!(p.list("SnapshotId").unwrap(), ["a", "b"]);
        assert_eq!(
            p.filters().unwrap(),
            [("status".to_owned(), vec!["completed".to_owned()])]
        );
        assert_eq!(p.tags_for("snapshot").unwrap()["k"], "v w");
        assert!(p.tags_for("volume").is_err());
        assert!(Params::parse(b"A=1&A=2").is_err());
        assert!(p.required("VolumeId").is_err());
    }

    #[test]
    fn filter_values_glob() {
        assert!(glob("vol-*", "vol-123"));
        assert!(glob("a?c", "abc") && !glob("a?c", "abbc"));
        assert!(glob("*", "") && !glob("x", ""));
        let tags = BTreeMap::from([("team".to_owned(), "db".to_owned())]);
        let none = |_: &str| Vec::new();
        let f = |n: &str, v: &str| vec![(n.to_owned(), vec![v.to_owned()])];
        assert!(matches(&f("tag:team", "d*"), &[], &none, &tags).unwrap());
        assert!(!matches(&f("tag:team", "web"), &[], &none, &tags).unwrap());
        assert!(matches(&f("tag-key", "team"), &[], &none, &tags).unwrap());
        assert!(matches(&f("bogus", "x"), &[], &none, &tags).is_err());
    }
}
