//! The app container's command when its template leaves it to the image:
//! the image's ENTRYPOINT and CMD, read from the registry (issue 16).
//!
//! The rules are pure functions here, unit-tested: how `command`/`args`
//! combine with the image's config (Kubernetes' rules), how a reference is
//! pinned to the digest it resolved to, and which entry of a multi-platform
//! index is the node's. The registry I/O is in [`registry`]; pull-secret
//! parsing in [`credentials`].

pub mod credentials;
pub mod registry;

use std::fmt;

/// What the operator needs of an image's config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Informational: the pinned image is the same image, so the runtime
    /// applies its WORKDIR itself.
    pub working_dir: Option<String>,
}

/// An image reference resolved against its registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The reference as the template wrote it, pinned to `digest`.
    pub pinned: String,
    /// What the tag pointed to: the index's digest for a multi-platform
    /// image (so every node pulls its own platform of the same release).
    pub digest: String,
    pub config: ImageConfig,
}

/// The process a container runs: `command` then `args`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub command: Vec<String>,
    pub args: Vec<String>,
}

/// The image says nothing to run and neither does the template.
#[derive(Debug, PartialEq, Eq)]
pub struct NothingToRun;

/// Kubernetes' rules for a container's process: `command` replaces the
/// image's ENTRYPOINT (and drops its CMD); `args` replace the CMD. An empty
/// list counts as unset, as the kubelet treats it.
pub fn process(
    command: Option<&[String]>,
    args: Option<&[String]>,
    image: &ImageConfig,
) -> Result<Process, NothingToRun> {
    let set = |v: Option<&[String]>| v.filter(|v| !v.is_empty()).map(<[String]>::to_vec);
    let process = match (set(command), set(args)) {
        (Some(command), args) => Process { command, args: args.unwrap_or_default() },
        (None, Some(args)) => Process { command: image.entrypoint.clone(), args },
        (None, None) => Process { command: image.entrypoint.clone(), args: image.cmd.clone() },
    };
    if process.command.is_empty() && process.args.is_empty() {
        return Err(NothingToRun);
    }
    Ok(process)
}

/// `image` with its digest replaced by (or extended with) `digest`; the tag
/// stays for people to read (`repo:tag@sha256:…`: the runtime pulls the digest).
pub fn pinned(image: &str, digest: &str) -> String {
    format!("{}@{digest}", without_digest(image))
}

/// The digest `live` is pinned to, if it is `image` pinned by [`pinned`].
pub fn pinned_digest<'a>(image: &str, live: &'a str) -> Option<&'a str> {
    live.strip_prefix(without_digest(image))?.strip_prefix('@').filter(|d| d.contains(':'))
}

fn without_digest(image: &str) -> &str {
    image.split_once('@').map_or(image, |(name, _)| name)
}

/// The Degraded message for an app container whose image config could not
/// be read: what failed, and how to fix it.
pub fn unavailable_message(
    container: &str,
    image: &str,
    registry: &str,
    error: &registry::ResolveError,
    secrets: &[String],
) -> String {
    use registry::ResolveError as E;
    let fix = match error {
        E::Unauthorized { anonymous: true } => format!(
            "add a pull secret for {registry} to spec.template.spec.imagePullSecrets (or to the pod's service account), or "
        ),
        E::Unauthorized { anonymous: false } => {
            format!("fix the credentials for {registry} in the pull secret ({}), or ", secrets.join(", "))
        }
        E::NotFound(_) => "check the image name and tag, or ".into(),
        E::NoPlatform(p) => format!("use an image built for {p}, or "),
        E::BadReference(..) => "fix the image reference, or ".into(),
        E::PlainHttp => format!(
            "if {registry} is meant to be plain HTTP, add it to the operator's plain-HTTP registries (chart value plainHttpRegistries, flag --plain-http-registry), or "
        ),
        E::Timeout(_) | E::Registry(_) => "the operator retries with backoff; or ".into(),
    };
    format!(
        "cannot read the ENTRYPOINT/CMD of image {image} (app container {container:?}, which sets no command) from {registry}: {error}. To fix: {fix}set command (and args) on the app container, so no registry lookup is needed"
    )
}

/// An OS/architecture pair, with Go's names (`linux`, `amd64`, `arm64`) as
/// image indexes and node labels use them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The platform the pods will run on: the template's `kubernetes.io/os` and
/// `kubernetes.io/arch` node selector when it pins them, else the
/// operator's own (`default`), which is the cluster's for the usual
/// single-architecture cluster.
pub fn platform_for(
    node_selector: Option<&std::collections::BTreeMap<String, String>>,
    default: &Platform,
) -> Platform {
    let label = |key: &str| node_selector.and_then(|s| s.get(key)).cloned();
    let architecture = label("kubernetes.io/arch");
    let variant = if architecture.is_some() { None } else { default.variant.clone() };
    Platform {
        os: label("kubernetes.io/os").unwrap_or_else(|| default.os.clone()),
        architecture: architecture.unwrap_or_else(|| default.architecture.clone()),
        variant,
    }
}

/// The operator's own platform, in Go's names.
pub fn own_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform { os: std::env::consts::OS.into(), architecture: architecture.into(), variant: None }
}

/// The entry of an image index for `wanted`: same OS and architecture; of
/// several (ARM variants), the one with the wanted variant, else the first.
/// Entries are `(platform, digest)`; an entry without a platform is skipped
/// (attestations and other artifacts carry none or `unknown/unknown`).
pub fn choose_platform<'a>(entries: &'a [(Option<Platform>, String)], wanted: &Platform) -> Option<&'a str> {
    let matching: Vec<&(Option<Platform>, String)> = entries
        .iter()
        .filter(|(p, _)| p.as_ref().is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture))
        .collect();
    let exact = matching.iter().find(|(p, _)| p.as_ref().is_some_and(|p| p.variant == wanted.variant));
    exact.or(matching.first()).map(|(_, digest)| digest.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn node_image() -> ImageConfig {
        ImageConfig {
            entrypoint: strings(&["docker-entrypoint.sh"]),
            cmd: strings(&["node", "server.js"]),
            working_dir: Some("/app".into()),
        }
    }

    #[test]
    fn neither_command_nor_args_runs_entrypoint_then_cmd() {
        let p = process(None, None, &node_image()).expect("runs");
        assert_eq!((p.command, p.args), (strings(&["docker-entrypoint.sh"]), strings(&["node", "server.js"])));
    }

    #[test]
    fn args_replace_cmd_and_keep_entrypoint() {
        let args = strings(&["npm", "start"]);
        let p = process(None, Some(&args), &node_image()).expect("runs");
        assert_eq!((p.command, p.args), (strings(&["docker-entrypoint.sh"]), args));
    }

    #[test]
    fn command_replaces_entrypoint_and_drops_cmd() {
        let command = strings(&["node", "other.js"]);
        let p = process(Some(&command), None, &node_image()).expect("runs");
        assert_eq!((p.command, p.args), (command.clone(), vec![]));
        let args = strings(&["--port", "80"]);
        let p = process(Some(&command), Some(&args), &node_image()).expect("runs");
        assert_eq!((p.command, p.args), (command, args));
    }

    #[test]
    fn empty_lists_count_as_unset() {
        let p = process(Some(&[]), Some(&[]), &node_image()).expect("runs");
        assert_eq!(p.command, strings(&["docker-entrypoint.sh"]));
        assert_eq!(p.args, strings(&["node", "server.js"]));
    }

    #[test]
    fn cmd_alone_is_the_whole_process() {
        let image = ImageConfig { cmd: strings(&["/app/server"]), ..Default::default() };
        let p = process(None, None, &image).expect("runs");
        assert_eq!((p.command, p.args), (vec![], strings(&["/app/server"])));
    }

    #[test]
    fn an_image_without_entrypoint_or_cmd_has_nothing_to_run() {
        assert_eq!(process(None, None, &ImageConfig::default()), Err(NothingToRun));
        // args alone still run (as the command: Kubernetes runs them so).
        assert!(process(None, Some(&strings(&["/bin/app"])), &ImageConfig::default()).is_ok());
    }

    #[test]
    fn pinning_keeps_the_tag_and_replaces_a_digest() {
        let d = "sha256:abc";
        assert_eq!(pinned("reg:5000/app:1.2", d), "reg:5000/app:1.2@sha256:abc");
        assert_eq!(pinned("reg:5000/app", d), "reg:5000/app@sha256:abc");
        assert_eq!(pinned("app:1@sha256:old", d), "app:1@sha256:abc");
    }

    #[test]
    fn the_pinned_digest_is_found_only_for_the_same_reference() {
        let live = pinned("reg:5000/app:1", "sha256:abc");
        assert_eq!(pinned_digest("reg:5000/app:1", &live), Some("sha256:abc"));
        assert_eq!(pinned_digest("reg:5000/app:2", &live), None);
        assert_eq!(pinned_digest("reg:5000/app", &live), None);
        assert_eq!(pinned_digest("reg:5000/app:1", "reg:5000/app:1"), None);
    }

    fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform { os: os.into(), architecture: arch.into(), variant: variant.map(Into::into) }
    }

    #[test]
    fn the_index_entry_of_the_wanted_platform_is_chosen() {
        let entries = vec![
            (Some(platform("linux", "arm", Some("v6"))), "sha256:armv6".to_string()),
            (Some(platform("linux", "arm", Some("v7"))), "sha256:armv7".to_string()),
            (Some(platform("unknown", "unknown", None)), "sha256:attestation".to_string()),
            (None, "sha256:noplatform".to_string()),
            (Some(platform("windows", "amd64", None)), "sha256:windows".to_string()),
            (Some(platform("linux", "amd64", None)), "sha256:amd64".to_string()),
        ];
        assert_eq!(choose_platform(&entries, &platform("linux", "amd64", None)), Some("sha256:amd64"));
        assert_eq!(choose_platform(&entries, &platform("linux", "arm", Some("v7"))), Some("sha256:armv7"));
        // No variant wanted: the first of that architecture.
        assert_eq!(choose_platform(&entries, &platform("linux", "arm", None)), Some("sha256:armv6"));
        assert_eq!(choose_platform(&entries, &platform("linux", "s390x", None)), None);
    }

    #[test]
    fn the_unavailable_message_says_what_failed_and_how_to_fix_it() {
        use registry::ResolveError as E;
        let m = unavailable_message("app", "r:1/app:2", "r:1", &E::Unauthorized { anonymous: true }, &[]);
        assert!(m.contains("refused access to an anonymous pull"), "{m}");
        assert!(m.contains("add a pull secret for r:1"), "{m}");
        assert!(m.contains("set command"), "{m}");
        let m = unavailable_message("app", "r:1/app:2", "r:1", &E::Unauthorized { anonymous: false }, &["pull".into()]);
        assert!(m.contains("fix the credentials for r:1 in the pull secret (pull)"), "{m}");
        let m = unavailable_message("app", "r:1/nope:2", "r:1", &E::NotFound("manifest unknown".into()), &[]);
        assert!(m.contains("no such image") && m.contains("check the image name and tag"), "{m}");
        let m = unavailable_message("app", "r:1/app:2", "r:1", &E::PlainHttp, &[]);
        assert!(m.contains("answered in plain HTTP") && m.contains("plainHttpRegistries"), "{m}");
        let m = unavailable_message("app", "r:1/app:2", "r:1", &E::Timeout(std::time::Duration::from_secs(10)), &[]);
        assert!(m.contains("did not answer within 10s") && m.contains("retries"), "{m}");
    }

    #[test]
    fn the_node_selector_picks_the_platform_else_the_operator_s() {
        let own = platform("linux", "amd64", None);
        assert_eq!(platform_for(None, &own), own);
        let selector = [("kubernetes.io/arch".to_string(), "arm64".to_string())].into();
        assert_eq!(platform_for(Some(&selector), &own), platform("linux", "arm64", None));
        assert_eq!(own_platform().os, std::env::consts::OS);
    }
}
