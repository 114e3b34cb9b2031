//! The credentials file `microfaas serve` reads at start: the AWS
//! shared-credentials INI, access key id -> (secret, profile = tenant).

use std::collections::HashMap;
use std::path::Path;

/// Access key id -> secret, read from a credentials file.
#[derive(Clone, Default)]
pub struct Credentials {
    keys: HashMap<String, Key>,
}

#[derive(Clone)]
pub(super) struct Key {
    pub(super) secret: String,
    pub(super) profile: crate::Tenant,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Credentials").field("access_key_ids", &ids).finish()
    }
}

/// A credentials file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("reading credentials file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `[profile]`, `key = value`, a comment or blank.
    #[error("credentials line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A profile has one of the two keys but not the other.
    #[error("profile `{profile}` needs both aws_access_key_id and aws_secret_access_key")]
    Incomplete {
        /// The profile.
        profile: String,
    },
    /// A profile name is not a tenant label (each profile is a tenant).
    #[error("profile name: {0}")]
    Tenant(#[from] crate::InvalidTenant),
    /// Two profiles share an access key id.
    #[error("access key id of profile `{profile}` is used by another profile too")]
    Duplicate {
        /// The second profile.
        profile: String,
    },
    /// No profile has a key pair.
    #[error("no profile with aws_access_key_id and aws_secret_access_key")]
    Empty,
}

impl Credentials {
    /// Reads the INI file at `path`.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses the AWS shared-credentials format: `[profile]` sections with
    /// `aws_access_key_id` and `aws_secret_access_key` (other keys, such as
    /// `region`, are ignored; `#` and `;` start comments). Each profile is a
    /// tenant: its name must be a tenant label (1 to 32 of `[a-z0-9_-]`).
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let mut keys = HashMap::new();
        let mut profile: Option<(String, Option<String>, Option<String>)> = None;
        let finish = |p: Option<(String, Option<String>, Option<String>)>,
                      keys: &mut HashMap<String, Key>|
         -> Result<(), CredentialsError> {
            match p {
                None | Some((_, None, None)) => Ok(()),
                Some((profile, Some(id), Some(secret))) => {
                    let tenant = crate::Tenant::new(&profile)?;
                    if keys
                        .insert(
                            id,
                            Key {
                                secret,
                                profile: tenant,
                            },
                        )
                        .is_some()
                    {
                        return Err(CredentialsError::Duplicate { profile });
                    }
                    Ok(())
                }
                Some((profile, _, _)) => Err(CredentialsError::Incomplete { profile }),
            }
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let name = rest.strip_suffix(']').ok_or(CredentialsError::Syntax {
                    line: i + 1,
                    reason: "a section header needs a closing `]`",
                })?;
                finish(profile.take(), &mut keys)?;
                profile = Some((name.trim().to_owned(), None, None));
                continue;
            }
            let (k, v) = line.split_once('=').ok_or(CredentialsError::Syntax {
                line: i + 1,
                reason: "expected `key = value`",
            })?;
            let p = profile.as_mut().ok_or(CredentialsError::Syntax {
                line: i + 1,
                reason: "a key before any [profile] section",
            })?;
            match k.trim() {
                "aws_access_key_id" => p.1 = Some(v.trim().to_owned()),
                "aws_secret_access_key" => p.2 = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        finish(profile, &mut keys)?;
        if keys.is_empty() {
            return Err(CredentialsError::Empty);
        }
        Ok(Self { keys })
    }

    pub(super) fn get(&self, access_key_id: &str) -> Option<&Key> {
        self.keys.get(access_key_id)
    }
}
