//! The MDB file format: a JSON array of machines, as Dominator reads it, parsed and
//! validated without any I/O.
//!
//! Like Go's `encoding/json` (which the reference uses), key names match case-insensitively
//! and unknown keys are accepted; unlike it, unknown keys are *kept* so that rewriting a
//! hand-edited file never loses what an operator (or mdbd) put there. Entries with an empty
//! `Hostname` are ignored by the dominator but kept in the file.

use model::ImageName;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why an MDB document is not acceptable. Every message is one line naming the entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MdbError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("the MDB must be a JSON array of machines, found {0}")]
    NotArray(&'static str),
    #[error("{entry}: {problem}")]
    Entry {
        entry: String,
        problem: MachineError,
    },
    /// One JSON object holding the same key twice (serde_json would keep the last).
    #[error("{0}")]
    DuplicateKey(String),
    #[error("duplicate Hostname {host:?}: {first} and {second}")]
    Duplicate {
        host: String,
        first: String,
        second: String,
    },
}

/// Why one machine record is refused (the message names the field).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineError {
    #[error("must be an object, found {0}")]
    NotAnObject(&'static str),
    #[error("{key} must be a string, found {found}")]
    NotAString { key: String, found: &'static str },
    #[error("DisableUpdates must be true or false, found {0}")]
    NotABoolean(&'static str),
    #[error("Tags must be an object, found {0}")]
    TagsNotAnObject(&'static str),
    #[error("Hostname is empty")]
    EmptyHostname,
    /// Two spellings of one key (`RequiredImage` and `Requiredimage`): which one would
    /// win is an accident of order.
    #[error("keys {first:?} and {second:?} are the same key (keys are case-insensitive)")]
    SameKeyTwice { first: String, second: String },
    /// `Hostname` or `IpAddress` is not an address.
    #[error("{field}: {source}")]
    Address {
        field: &'static str,
        source: BadAddress,
    },
    /// `RequiredImage` or `PlannedImage` is not an image name.
    #[error("{field}: {source}")]
    ImageName {
        field: &'static str,
        source: model::image::BadImageName,
    },
    /// A tag name or value `mdb list` and the dominator would show with a control or
    /// format character in it.
    #[error("{what} {value:?} contains a control or format character")]
    HiddenCharacter { what: String, value: String },
}

/// A port that is not a number from 1 to 65535.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port {0:?} is not a number from 1 to 65535")]
pub struct BadPort(pub String);

/// One machine record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Machine {
    /// Unique key; may carry `:PORT`. Empty ⇒ the entry is ignored.
    pub hostname: String,
    /// The address actually dialled, if set; may carry `:PORT`.
    pub ip_address: Option<String>,
    /// The image to enforce (empty ⇒ none).
    pub required_image: String,
    /// The image to prefetch (empty ⇒ none).
    pub planned_image: String,
    /// Poll and prefetch, but never send an update.
    pub disable_updates: bool,
    /// Free-form tags; `DisableSafetyCheck` lifts the safety check (unless `false`, `0`, …).
    pub tags: BTreeMap<String, String>,
    /// Keys this program does not interpret, kept verbatim for rewriting.
    pub extra: BTreeMap<String, Value>,
}

/// The tag that lifts the safety check for one machine.
pub const TAG_DISABLE_SAFETY_CHECK: &str = "DisableSafetyCheck";

impl Machine {
    pub fn new(hostname: &str) -> Machine {
        Machine {
            hostname: hostname.to_string(),
            ..Machine::default()
        }
    }

    /// The address to dial: `IpAddress` if set, else `Hostname`.
    pub fn address(&self) -> &str {
        match &self.ip_address {
            Some(ip) if !ip.is_empty() => ip,
            _ => &self.hostname,
        }
    }

    /// Whether the MDB lifts the safety check for this machine: the tag is present (as in
    /// Dominator, whatever its value) unless its value says no (`false`, `0`, `no`, `off`),
    /// so `DisableSafetyCheck=false` keeps the check.
    pub fn safety_check_disabled(&self) -> bool {
        self.tags.get(TAG_DISABLE_SAFETY_CHECK).is_some_and(|v| {
            !["false", "0", "no", "off"]
                .iter()
                .any(|n| v.trim().eq_ignore_ascii_case(n))
        })
    }

    /// Checks the fields that must be well formed (host names, ports, image names).
    pub fn validate(&self) -> Result<(), MachineError> {
        let address = |field| move |source| MachineError::Address { field, source };
        if !self.hostname.is_empty() {
            check_address(&self.hostname).map_err(address("Hostname"))?;
        }
        if let Some(ip) = &self.ip_address {
            if !ip.is_empty() {
                check_address(ip).map_err(address("IpAddress"))?;
            }
        }
        for (k, v) in &self.tags {
            check_text("tag", k)?;
            check_text(&format!("tag {k:?} value"), v)?;
        }
        for (field, v) in [
            ("RequiredImage", &self.required_image),
            ("PlannedImage", &self.planned_image),
        ] {
            if !v.is_empty() {
                ImageName::parse(v).map_err(|source| MachineError::ImageName { field, source })?;
            }
        }
        Ok(())
    }
}

/// Why a `Hostname` or `IpAddress` is refused (the message names the value, escaped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{addr:?}: {reason}")]
pub struct BadAddress {
    pub addr: String,
    pub reason: String,
}

/// The host part of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An RFC 1123 host name: dot-separated labels of letters, digits and inner `-`.
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// A machine's address as the MDB may give it: a host name or an IP address with an
/// optional port — never a URL, a path or anything else a client would read as one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub host: Host,
    pub port: Option<u16>,
}

impl Address {
    /// Parses `HOST`, `HOST:PORT`, `IPV4`, `IPV4:PORT`, `[IPV6]`, `[IPV6]:PORT` or a bare
    /// IPv6 address.
    pub fn parse(addr: &str) -> Result<Address, BadAddress> {
        let bad = |reason: &str| BadAddress {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or a control character"));
        }
        if addr.contains('/') {
            return Err(bad(
                "not a host name or IP address (it has a `/`: URLs and paths are not addresses)",
            ));
        }
        if let Some(rest) = addr.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("`[` without `]`"))?;
            let ip: Ipv6Addr = h
                .parse()
                .map_err(|_| bad("the part in `[…]` is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p if p.starts_with(':') => {
                    Some(parse_port(&p[1..]).map_err(|r| bad(&r.to_string()))?)
                }
                _ => return Err(bad("junk after `]`")),
            };
            return Ok(Address {
                host: Host::V6(ip),
                port,
            });
        }
        if let Ok(ip) = addr.parse::<Ipv6Addr>() {
            return Ok(Address {
                host: Host::V6(ip),
                port: None,
            });
        }
        let (host, port) = match addr.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(bad(
                    "not a host name or IP address with an optional :PORT (a bare IPv6 address, or [IPV6]:PORT)",
                ))
            }
            Some((h, p)) => (h, Some(p)),
            None => (addr, None),
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let host = match host.parse::<Ipv4Addr>() {
            Ok(ip) => Host::V4(ip),
            Err(_) => Host::Name(check_host_name(host).map_err(bad)?.to_string()),
        };
        let port = port
            .map(|p| parse_port(p).map_err(|r| bad(&r.to_string())))
            .transpose()?;
        Ok(Address { host, port })
    }

    /// `HOST:PORT` (`[V6]:PORT`) to dial, with `default_port` when none was given.
    pub fn dial(&self, default_port: u16) -> String {
        let port = self.port.unwrap_or(default_port);
        match &self.host {
            Host::Name(n) => format!("{n}:{port}"),
            Host::V4(ip) => format!("{ip}:{port}"),
            Host::V6(ip) => format!("[{ip}]:{port}"),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, BadPort> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(BadPort(p.to_string())),
    }
}

/// Checks an RFC 1123 host name: at most 253 bytes of dot-separated labels, each 1 to 63
/// letters, digits or inner hyphens; the last label not all digits (that would be a
/// malformed IPv4 address).
fn check_host_name(h: &str) -> Result<&str, &'static str> {
    if h.len() > 253 {
        return Err("host name longer than 253 bytes");
    }
    let mut last = "";
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("not a host name (each dot-separated label must have 1 to 63 characters)");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(
                "not a host name or IP address (a host name has only letters, digits, `-` and `.`)",
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("not a host name (a label starts or ends with `-`)");
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a valid IPv4 address or host name");
    }
    Ok(h)
}

/// Checks `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address.
pub fn check_address(addr: &str) -> Result<(), BadAddress> {
    Address::parse(addr).map(|_| ())
}

/// Refuses control and format characters (escape sequences, bidi overrides) in free text
/// the dominator and `mdb list` show.
fn check_text(what: &str, v: &str) -> Result<(), MachineError> {
    if v.chars().any(model::image::is_hidden_char) {
        return Err(MachineError::HiddenCharacter {
            what: what.to_string(),
            value: v.to_string(),
        });
    }
    Ok(())
}

/// A whole machine database, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mdb {
    /// Every entry, including ignored ones with an empty Hostname.
    pub entries: Vec<Machine>,
}

impl Mdb {
    /// Parses and validates an MDB document.
    pub fn parse(text: &str) -> Result<Mdb, MdbError> {
        Mdb::parse_with_warnings(text).map(|(mdb, _)| mdb)
    }

    /// `parse`, plus a line per odd key (`entry 2 (Hostname "m"): unknown key
    /// "RequiredImag" (kept, but not read): did you mean "RequiredImage"?`). A key given
    /// twice, in any case, is an error.
    pub fn parse_with_warnings(text: &str) -> Result<(Mdb, Vec<String>), MdbError> {
        let value: Value = serde_json::from_str(text).map_err(|e| MdbError::Json(e.to_string()))?;
        crate::keys::check_no_duplicate_keys(text)
            .map_err(|e| MdbError::DuplicateKey(e.to_string()))?;
        let items = match value {
            Value::Array(a) => a,
            other => return Err(MdbError::NotArray(kind_of(&other))),
        };
        let mut entries = Vec::with_capacity(items.len());
        let mut warnings = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            warnings.extend(key_warnings(i, &item));
            let m = machine_from_value(item).map_err(|problem| MdbError::Entry {
                entry: entry_label(i, None),
                problem,
            })?;
            m.validate().map_err(|problem| MdbError::Entry {
                entry: entry_label(i, Some(&m.hostname)),
                problem,
            })?;
            entries.push(m);
        }
        let mdb = Mdb { entries };
        mdb.check_duplicates()?;
        Ok((mdb, warnings))
    }

    fn check_duplicates(&self) -> Result<(), MdbError> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, m) in self.entries.iter().enumerate() {
            if m.hostname.is_empty() {
                continue;
            }
            if let Some(&first) = seen.get(&m.hostname.to_ascii_lowercase()) {
                return Err(MdbError::Duplicate {
                    host: m.hostname.clone(),
                    first: entry_label(first, Some(&self.entries[first].hostname)),
                    second: entry_label(i, Some(&m.hostname)),
                });
            }
            seen.insert(m.hostname.to_ascii_lowercase(), i);
        }
        Ok(())
    }

    /// The machines the dominator manages (entries with a Hostname), in file order.
    pub fn machines(&self) -> impl Iterator<Item = &Machine> {
        self.entries.iter().filter(|m| !m.hostname.is_empty())
    }

    /// Number of entries ignored for an empty Hostname.
    pub fn ignored(&self) -> usize {
        self.entries
            .iter()
            .filter(|m| m.hostname.is_empty())
            .count()
    }

    /// The machine named `host` (case-insensitive, as host names are).
    pub fn get(&self, host: &str) -> Option<&Machine> {
        self.machines()
            .find(|m| m.hostname.eq_ignore_ascii_case(host))
    }

    pub fn get_mut(&mut self, host: &str) -> Option<&mut Machine> {
        self.entries
            .iter_mut()
            .find(|m| !m.hostname.is_empty() && m.hostname.eq_ignore_ascii_case(host))
    }

    /// Adds a machine; refuses a duplicate or an invalid record.
    pub fn add(&mut self, m: Machine) -> Result<(), MdbError> {
        if m.hostname.is_empty() {
            return Err(MdbError::Entry {
                entry: "new entry".into(),
                problem: MachineError::EmptyHostname,
            });
        }
        m.validate().map_err(|problem| MdbError::Entry {
            entry: format!("machine {:?}", m.hostname),
            problem,
        })?;
        self.entries.push(m);
        self.check_duplicates().inspect_err(|_| {
            self.entries.pop();
        })
    }

    /// The host names of the machines `selection` picks, in file order.
    pub fn select(&self, selection: &model::select::Where) -> Vec<String> {
        self.machines()
            .filter(|m| selection.matches(&m.hostname, &m.tags))
            .map(|m| m.hostname.clone())
            .collect()
    }

    /// Removes the machine named `host`; returns it.
    pub fn remove(&mut self, host: &str) -> Option<Machine> {
        let i = self
            .entries
            .iter()
            .position(|m| !m.hostname.is_empty() && m.hostname.eq_ignore_ascii_case(host))?;
        Some(self.entries.remove(i))
    }

    /// The document as pretty JSON (known keys first, in Dominator's spelling), newline-ended.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.entries).expect("MDB serializes");
        s.push('\n');
        s
    }
}

fn entry_label(i: usize, host: Option<&str>) -> String {
    match host {
        Some(h) if !h.is_empty() => format!("entry {} (Hostname {h:?})", i + 1),
        _ => format!("entry {}", i + 1),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn want_string(key: &str, v: Value) -> Result<String, MachineError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Null => Ok(String::new()),
        other => Err(MachineError::NotAString {
            key: key.to_string(),
            found: kind_of(&other),
        }),
    }
}

/// The warnings about the keys of record `i` (`crate::keys::key_warning`), each naming it.
fn key_warnings(i: usize, item: &Value) -> Vec<String> {
    let Value::Object(obj) = item else {
        return Vec::new();
    };
    let host = obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("hostname"))
        .and_then(|(_, v)| v.as_str());
    obj.keys()
        .filter_map(|k| crate::keys::key_warning(k))
        .map(|w| format!("{}: {w}", entry_label(i, host)))
        .collect()
}

fn machine_from_value(v: Value) -> Result<Machine, MachineError> {
    let obj = match v {
        Value::Object(o) => o,
        other => return Err(MachineError::NotAnObject(kind_of(&other))),
    };
    if let Some((first, second)) = crate::keys::same_field_twice(&obj) {
        return Err(MachineError::SameKeyTwice { first, second });
    }
    let mut m = Machine::default();
    for (key, value) in obj {
        match key.to_ascii_lowercase().as_str() {
            "hostname" => m.hostname = want_string("Hostname", value)?,
            "ipaddress" => {
                let s = want_string("IpAddress", value)?;
                m.ip_address = (!s.is_empty()).then_some(s);
            }
            "requiredimage" => m.required_image = want_string("RequiredImage", value)?,
            "plannedimage" => m.planned_image = want_string("PlannedImage", value)?,
            "disableupdates" => {
                m.disable_updates = match value {
                    Value::Bool(b) => b,
                    Value::Null => false,
                    other => return Err(MachineError::NotABoolean(kind_of(&other))),
                }
            }
            "tags" => match value {
                Value::Null => {}
                Value::Object(t) => {
                    for (k, v) in t {
                        let s = want_string(&format!("Tags.{k}"), v)?;
                        m.tags.insert(k, s);
                    }
                }
                other => return Err(MachineError::TagsNotAnObject(kind_of(&other))),
            },
            _ => {
                m.extra.insert(key, value);
            }
        }
    }
    Ok(m)
}

impl Serialize for Machine {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("Hostname", &self.hostname)?;
        if let Some(ip) = &self.ip_address {
            map.serialize_entry("IpAddress", ip)?;
        }
        map.serialize_entry("RequiredImage", &self.required_image)?;
        if !self.planned_image.is_empty() {
            map.serialize_entry("PlannedImage", &self.planned_image)?;
        }
        if self.disable_updates {
            map.serialize_entry("DisableUpdates", &true)?;
        }
        if !self.tags.is_empty() {
            map.serialize_entry("Tags", &self.tags)?;
        }
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Machine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Machine, D::Error> {
        let v = Value::deserialize(d)?;
        machine_from_value(v).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string_pretty(self).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_safety_check_false_keeps_the_check() {
        let with = |v: Option<&str>| {
            let mut m = Machine::new("h");
            if let Some(v) = v {
                m.tags.insert(TAG_DISABLE_SAFETY_CHECK.into(), v.into());
            }
            m.safety_check_disabled()
        };
        assert!(!with(None));
        for yes in ["", "true", "1", "yes", "anything"] {
            assert!(with(Some(yes)), "{yes:?} lifts the check");
        }
        for no in ["false", "False", "0", "no", "OFF", " false "] {
            assert!(!with(Some(no)), "{no:?} keeps the check");
        }
    }

    #[test]
    fn machine_errors_are_classified() {
        let problem = |text: &str| match Mdb::parse(text) {
            Err(MdbError::Entry { problem, .. }) => problem,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(problem("[1]"), MachineError::NotAnObject("a number"));
        assert_eq!(
            problem(r#"[{"Hostname": 7}]"#),
            MachineError::NotAString {
                key: "Hostname".into(),
                found: "a number"
            }
        );
        assert_eq!(
            problem(r#"[{"Hostname": "a", "DisableUpdates": "yes"}]"#),
            MachineError::NotABoolean("a string")
        );
        assert_eq!(
            problem(r#"[{"Hostname": "a", "Tags": []}]"#),
            MachineError::TagsNotAnObject("an array")
        );
        assert!(matches!(
            problem(r#"[{"Hostname": "a:0"}]"#),
            MachineError::Address { field: "Hostname", source } if source.reason == BadPort("0".into()).to_string()
        ));
        assert!(matches!(
            problem(r#"[{"Hostname": "a", "IpAddress": "http://x"}]"#),
            MachineError::Address {
                field: "IpAddress",
                ..
            }
        ));
        assert!(matches!(
            problem(r#"[{"Hostname": "a", "PlannedImage": "x/../y"}]"#),
            MachineError::ImageName {
                field: "PlannedImage",
                ..
            }
        ));
        assert!(matches!(
            problem("[{\"Hostname\": \"a\", \"Tags\": {\"k\": \"\\u001b[2J\"}}]"),
            MachineError::HiddenCharacter { .. }
        ));
        let mut mdb = Mdb::default();
        assert!(matches!(
            mdb.add(Machine::default()),
            Err(MdbError::Entry {
                problem: MachineError::EmptyHostname,
                ..
            })
        ));
        assert_eq!(parse_port("65536"), Err(BadPort("65536".into())));
        assert_eq!(parse_port("443"), Ok(443));
    }

    /// Parses `text`; returns `Ok(summary)` of the managed machines or the error text.
    fn check(text: &str) -> Result<Vec<String>, String> {
        Mdb::parse(text)
            .map(|m| {
                m.machines()
                    .map(|m| {
                        format!(
                            "{}@{} req={} plan={} dis={} tags={:?}",
                            m.hostname,
                            m.address(),
                            m.required_image,
                            m.planned_image,
                            m.disable_updates,
                            m.tags
                        )
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn parse_table() {
        let ok: &[(&str, &[&str])] = &[
            ("[]", &[]),
            (
                r#"[{"Hostname":"a","RequiredImage":"img/1"}]"#,
                &["a@a req=img/1 plan= dis=false tags={}"],
            ),
            (
                r#"[{"hostname":"a:7000","ipaddress":"127.0.0.1:7001","requiredimage":"x","PLANNEDIMAGE":"y","DisableUpdates":true}]"#,
                &["a:7000@127.0.0.1:7001 req=x plan=y dis=true tags={}"],
            ),
            (
                r#"[{"Hostname":"a","Tags":{"DisableSafetyCheck":""},"Location":"rack1","OwnerGroups":["x"]}]"#,
                &[r#"a@a req= plan= dis=false tags={"DisableSafetyCheck": ""}"#],
            ),
            (
                r#"[{"Hostname":"","RequiredImage":"x"},{"Hostname":"b"}]"#,
                &["b@b req= plan= dis=false tags={}"],
            ),
            (
                r#"[{"Hostname":"[::1]:6969"},{"Hostname":"c","IpAddress":""}]"#,
                &[
                    "[::1]:6969@[::1]:6969 req= plan= dis=false tags={}",
                    "c@c req= plan= dis=false tags={}",
                ],
            ),
        ];
        for (text, want) in ok {
            assert_eq!(
                check(text),
                Ok(want.iter().map(|s| s.to_string()).collect()),
                "{text}"
            );
        }
        let bad: &[(&str, &str)] = &[
            ("", "not valid JSON"),
            ("{}", "must be a JSON array of machines, found an object"),
            (r#"[{"Hostname":"a"},]"#, "not valid JSON"),
            ("[1]", "entry 1: must be an object, found a number"),
            (r#"[{"Hostname":5}]"#, "entry 1: Hostname must be a string"),
            (
                r#"[{"Hostname":"a"},{"Hostname":"b","DisableUpdates":"yes"}]"#,
                "entry 2: DisableUpdates must be true or false",
            ),
            (
                r#"[{"Hostname":"a","Tags":{"k":1}}]"#,
                "entry 1: Tags.k must be a string",
            ),
            (
                r#"[{"Hostname":"a:99999"}]"#,
                r#"entry 1 (Hostname "a:99999"): Hostname: "a:99999": port "99999""#,
            ),
            (
                r#"[{"Hostname":"a","IpAddress":"1.2.3.4:x"}]"#,
                "IpAddress: \"1.2.3.4:x\": port",
            ),
            (r#"[{"Hostname":"a b"}]"#, "contains whitespace"),
            (
                r#"[{"Hostname":"a","RequiredImage":"../x"}]"#,
                "RequiredImage: invalid image name",
            ),
            (
                r#"[{"Hostname":"a"},{"Hostname":"b"},{"Hostname":"A"}]"#,
                r#"duplicate Hostname "A": entry 1 (Hostname "a") and entry 3 (Hostname "A")"#,
            ),
        ];
        for (text, want) in bad {
            let got = check(text).unwrap_err();
            assert!(got.contains(want), "{text}: got {got:?}, want {want:?}");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn addresses_are_host_names_or_ip_addresses_with_an_optional_port() {
        for (addr, dial) in [
            ("web1", "web1:6969"),
            ("web-1.example.com:7000", "web-1.example.com:7000"),
            ("WEB1", "WEB1:6969"),
            ("127.0.0.1", "127.0.0.1:6969"),
            ("127.0.0.1:7001", "127.0.0.1:7001"),
            ("::1", "[::1]:6969"),
            ("[::1]", "[::1]:6969"),
            ("[2001:db8::5]:7000", "[2001:db8::5]:7000"),
            ("4chan", "4chan:6969"),
        ] {
            let a = Address::parse(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(a.dial(6969), dial, "{addr}");
        }
        for bad in [
            "https://h:1/rpc/X?",
            "http://h",
            "h/rpc/Subd.Poll",
            "../etc",
            "a:b:c",
            "a:b",
            "a:+80",
            "a:0",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a_b",
            "a@b",
            "a%2fb",
            "h?x",
            "h#x",
            "[::1",
            "[::1]x",
            "[web1]:80",
            "999.1.1.1",
            "1.2.3",
            "a\u{1b}[31m",
            "a\u{202e}b",
            "",
            ":80",
        ] {
            let e = Address::parse(bad).expect_err(bad).to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(
                !e.chars().any(model::image::is_hidden_char),
                "escaped: {e:?}"
            );
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(Address::parse(&long).is_err(), "over 253 bytes");
        assert!(Address::parse(&long[..253]).is_ok());
        assert!(Address::parse(&"a".repeat(64)).is_err(), "label over 63");
    }

    #[test]
    fn hostile_records_are_refused_naming_the_record() {
        for (text, want) in [
            (
                r#"[{"Hostname":"a"},{"Hostname":"https://h:1/rpc/X?"}]"#,
                r#"entry 2 (Hostname "https://h:1/rpc/X?"): Hostname: "https://h:1/rpc/X?": not a host name"#,
            ),
            (
                r#"[{"Hostname":"../etc"}]"#,
                r#"entry 1 (Hostname "../etc"): Hostname: "../etc": not a host name"#,
            ),
            (
                r#"[{"Hostname":"a","IpAddress":"http://10.0.0.1/"}]"#,
                r#"entry 1 (Hostname "a"): IpAddress: "http://10.0.0.1/": not a host name"#,
            ),
            (
                r#"[{"Hostname":"a","RequiredImage":"web/\u001b[2J1"}]"#,
                "RequiredImage: invalid image name \"web/\\x1b[2J1\": contains a control or format character",
            ),
            (
                r#"[{"Hostname":"a","PlannedImage":"web/\u202e1"}]"#,
                "PlannedImage: invalid image name",
            ),
            (
                r#"[{"Hostname":"a","Tags":{"k\tx":"v"}}]"#,
                r#"tag "k\tx" contains a control or format character"#,
            ),
            (
                r#"[{"Hostname":"a","Tags":{"k":"v\u001b[31m"}}]"#,
                r#"tag "k" value "v\u{1b}[31m" contains a control or format character"#,
            ),
        ] {
            let got = check(text).unwrap_err();
            assert!(got.contains(want), "{text}: got {got:?}, want {want:?}");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn round_trip_keeps_unknown_keys_and_ignored_entries() {
        let text = r#"[{"Hostname":"a","RequiredImage":"i/1","Location":"rack1","OwnerGroups":["ops"]},{"Hostname":""}]"#;
        let mdb = Mdb::parse(text).unwrap();
        let out = mdb.to_json();
        let again = Mdb::parse(&out).unwrap();
        assert_eq!(again, mdb);
        assert!(out.contains("\"Location\": \"rack1\""), "{out}");
        assert_eq!(again.entries.len(), 2);
        assert_eq!(again.ignored(), 1);
    }

    #[test]
    fn edits() {
        let mut mdb = Mdb::parse(r#"[{"Hostname":"a"}]"#).unwrap();
        assert!(mdb
            .add(Machine::new("A"))
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        assert_eq!(mdb.entries.len(), 1);
        assert!(mdb.add(Machine::new("b:0")).is_err());
        mdb.add(Machine::new("b")).unwrap();
        mdb.get_mut("B").unwrap().required_image = "x".into();
        assert_eq!(mdb.get("b").unwrap().required_image, "x");
        assert_eq!(mdb.remove("a").unwrap().hostname, "a");
        assert!(mdb.get("a").is_none());
    }
}
