//! Registry credentials from image pull secrets, as the kubelet reads them:
//! `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`, `{"auths": {…}}`)
//! and the older `kubernetes.io/dockercfg` (`.dockercfg`, the map itself).
//! Each entry has `username`/`password` or `auth` (base64 of `user:password`).
//! Keys match a registry by host (`https://reg:5000/v1/` matches `reg:5000`);
//! the kubelet's glob keys (`*.example.com`) are not supported.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
}

/// The secret's entries by registry host. `kind` is the secret's type;
/// `data` its decoded data. Unreadable entries are skipped; an unreadable
/// secret is an error naming what is wrong with it.
pub fn from_secret(
    kind: Option<&str>,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Credentials>, String> {
    let entries: BTreeMap<String, Entry> = match (kind, data.get(".dockerconfigjson"), data.get(".dockercfg")) {
        (Some("kubernetes.io/dockercfg"), _, Some(cfg)) | (_, None, Some(cfg)) => {
            serde_json::from_slice(cfg).map_err(|e| format!(".dockercfg is not valid JSON: {e}"))?
        }
        (_, Some(json), _) => {
            serde_json::from_slice::<DockerConfigJson>(json)
                .map_err(|e| format!(".dockerconfigjson is not valid JSON: {e}"))?
                .auths
        }
        (_, None, None) => return Err("it has neither .dockerconfigjson nor .dockercfg".into()),
    };
    Ok(entries.into_iter().filter_map(|(key, entry)| Some((host_of(&key), credentials(entry)?))).collect())
}

fn credentials(entry: Entry) -> Option<Credentials> {
    if let (Some(username), Some(password)) = (entry.username.clone(), entry.password.clone()) {
        return Some(Credentials { username, password });
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(entry.auth?.trim()).ok()?;
    let (username, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credentials { username: username.into(), password: password.into() })
}

/// The registry host a key or reference's registry names, Docker Hub's
/// aliases folded into one.
pub fn host_of(key: &str) -> String {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = key.split('/').next().unwrap_or_default().to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io".into(),
        _ => host,
    }
}

/// The credentials for `registry` among the secrets' entries, in the order
/// the secrets were listed (the first secret that has the host wins).
pub fn for_registry<'a>(secrets: &'a [BTreeMap<String, Credentials>], registry: &str) -> Option<&'a Credentials> {
    let host = host_of(registry);
    secrets.iter().find_map(|entries| entries.get(&host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: &str, value: &str) -> BTreeMap<String, Vec<u8>> {
        [(key.to_string(), value.as_bytes().to_vec())].into()
    }

    #[test]
    fn dockerconfigjson_with_auth_or_username() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cr:et");
        let json = format!(
            r#"{{"auths": {{"https://10.0.0.1:5001/v1/": {{"auth": "{auth}"}},
                "docker.io": {{"username": "alice", "password": "pw"}}}}}}"#
        );
        let entries =
            from_secret(Some("kubernetes.io/dockerconfigjson"), &data(".dockerconfigjson", &json)).expect("parses");
        let secrets = [entries];
        let bob = for_registry(&secrets, "10.0.0.1:5001").expect("bob");
        assert_eq!((bob.username.as_str(), bob.password.as_str()), ("bob", "s3cr:et"));
        assert_eq!(for_registry(&secrets, "index.docker.io").map(|c| c.username.as_str()), Some("alice"));
        assert!(for_registry(&secrets, "10.0.0.1:5000").is_none());
    }

    #[test]
    fn legacy_dockercfg() {
        let json = r#"{"reg.example:443": {"username": "u", "password": "p"}}"#;
        let entries = from_secret(Some("kubernetes.io/dockercfg"), &data(".dockercfg", json)).expect("parses");
        assert_eq!(for_registry(&[entries], "reg.example:443").map(|c| c.password.as_str()), Some("p"));
    }

    #[test]
    fn the_first_secret_with_the_host_wins() {
        let one = from_secret(
            None,
            &data(".dockerconfigjson", r#"{"auths": {"r:1": {"username": "first", "password": "p"}}}"#),
        );
        let two = from_secret(
            None,
            &data(".dockerconfigjson", r#"{"auths": {"r:1": {"username": "second", "password": "p"}}}"#),
        );
        let secrets = [one.expect("one"), two.expect("two")];
        assert_eq!(for_registry(&secrets, "r:1").map(|c| c.username.as_str()), Some("first"));
    }

    #[test]
    fn a_secret_that_is_not_a_docker_config_says_why() {
        let err = from_secret(Some("Opaque"), &data("token", "x")).expect_err("not a pull secret");
        assert!(err.contains(".dockerconfigjson"), "{err}");
        let err = from_secret(None, &data(".dockerconfigjson", "{")).expect_err("bad JSON");
        assert!(err.contains("not valid JSON"), "{err}");
        // Passwords never show in debug output.
        let c = Credentials { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
