//! Node identity: [`NodeId`] (128 random bits, printed as 32 lowercase hex
//! digits), the node [`Level`] and its human [`Label`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A node's id: 16 random bytes drawn when the node is created, stable for
/// the node's life, printed as 32 lowercase hex digits (also its file name).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 16]);

impl NodeId {
    /// The id's length in printed hex digits.
    pub const HEX_LEN: usize = 32;

    /// A fresh random id.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(NodeId(bytes))
    }

    /// The id's raw bytes (as stored in node headers).
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// An id from its raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        NodeId(bytes)
    }

    /// The first `n` hex digits, for compact display.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(12);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// A string is not a node id (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a snapshot node id (32 hex digits)")]
pub struct ParseNodeIdError(pub String);

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseNodeIdError(s.to_owned());
        if s.len() != Self::HEX_LEN || !s.is_ascii() {
            return Err(err());
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            let digits = s.get(i * 2..i * 2 + 2).ok_or_else(err)?;
            *b = u8::from_str_radix(digits, 16).map_err(|_| err())?;
        }
        Ok(NodeId(bytes))
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a node sits in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Guest booted, runtime initialised, no function. Has no parent.
    Base,
    /// Child of a base: a function's artifact loaded and `init()` done.
    Function,
    /// Child of a function node: an invocation with one input reached
    /// `checkpoint()`.
    Argument,
}

impl Level {
    /// The byte stored in node headers.
    pub fn to_byte(self) -> u8 {
        match self {
            Level::Base => 1,
            Level::Function => 2,
            Level::Argument => 3,
        }
    }

    /// The level a header byte names.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Level::Base),
            2 => Some(Level::Function),
            3 => Some(Level::Argument),
            _ => None,
        }
    }

    /// The level a parent of this level must have (`None`: no parent).
    pub fn parent_level(self) -> Option<Level> {
        match self {
            Level::Base => None,
            Level::Function => Some(Level::Base),
            Level::Argument => Some(Level::Function),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Base => "base",
            Level::Function => "function",
            Level::Argument => "argument",
        })
    }
}

/// What a node is of: free-form strings the backend chooses.
///
/// - base: `digest` may name the guest image build;
/// - function: `function` is the name, `digest` the artifact's digest (a
///   redeployed, changed artifact gets a new function node with a new digest);
/// - argument: `function` and `digest` as its parent, `input_hash` a hash of
///   function + input (the key a later invocation looks the node up by).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Label {
    /// Function name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Artifact (or guest image) digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Hash of function + input, for argument nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hash: Option<String>,
}

impl Label {
    /// A base node's label.
    pub fn base(guest_digest: Option<&str>) -> Self {
        Label {
            digest: guest_digest.map(str::to_owned),
            ..Label::default()
        }
    }

    /// A function node's label.
    pub fn function(name: &str, digest: &str) -> Self {
        Label {
            function: Some(name.to_owned()),
            digest: Some(digest.to_owned()),
            input_hash: None,
        }
    }

    /// An argument node's label.
    pub fn argument(name: &str, digest: &str, input_hash: &str) -> Self {
        Label {
            function: Some(name.to_owned()),
            digest: Some(digest.to_owned()),
            input_hash: Some(input_hash.to_owned()),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let mut parts = Vec::new();
        if let Some(name) = &self.function {
            parts.push(name.clone());
        }
        if let Some(d) = &self.digest {
            parts.push(format!("@{}", short(d)));
        }
        if let Some(h) = &self.input_hash {
            parts.push(format!("input={}", short(h)));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_text_and_json() {
        let id = NodeId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), NodeId::HEX_LEN);
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        assert_ne!(NodeId::random().unwrap(), id);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("g".repeat(32).parse::<NodeId>().is_err());
        assert!("é".repeat(16).parse::<NodeId>().is_err());
    }

    #[test]
    fn levels_round_trip() {
        for l in [Level::Base, Level::Function, Level::Argument] {
            assert_eq!(Level::from_byte(l.to_byte()), Some(l));
        }
        assert_eq!(Level::from_byte(0), None);
        assert_eq!(Level::Argument.parent_level(), Some(Level::Function));
    }

    #[test]
    fn label_display() {
        assert_eq!(Label::base(None).to_string(), "-");
        assert_eq!(
            Label::argument("echo", "0123456789abcdef", "ffff").to_string(),
            "echo @0123456789ab input=ffff"
        );
    }
}
