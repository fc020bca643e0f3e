//! Reading an image's config from its registry (the I/O half of
//! [`super`]): the tag's digest, the manifest for the wanted platform, the
//! config blob. Configs are cached by digest (content never changes under
//! a digest); every lookup is bounded in time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use thiserror::Error;

use super::credentials::Credentials;
use super::{ImageConfig, Platform, ResolvedImage, choose_platform, pinned};

/// How long one resolution may take, all requests included.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Configs kept at most; the cache is emptied when it is full (a config is
/// a few hundred bytes, and a cluster runs far fewer distinct images).
const CACHE_ENTRIES: usize = 4096;

/// Why an image's config could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("{0:?} is not a valid image reference: {1}")]
    BadReference(String, String),
    #[error("the registry refused access{}", if *.anonymous { " to an anonymous pull" } else { " with the pull secret's credentials" })]
    Unauthorized { anonymous: bool },
    #[error("the registry has no such image ({0})")]
    NotFound(String),
    #[error("the image index has no entry for {0}")]
    NoPlatform(Platform),
    #[error("the registry did not answer within {0:?}")]
    Timeout(Duration),
    /// A TLS handshake got a plain-HTTP answer.
    #[error(
        "the registry answered in plain HTTP, and the operator speaks HTTPS to every registry not listed as plain HTTP"
    )]
    PlainHttp,
    #[error("{0}")]
    Registry(String),
}

/// Reads image configs from registries.
pub struct Resolver {
    /// Registries (`host:port`) spoken to over plain HTTP.
    plain_http: Vec<String>,
    timeout: Duration,
    cache: Mutex<HashMap<(String, Platform), ImageConfig>>,
}

impl Resolver {
    pub fn new(plain_http: Vec<String>, timeout: Duration) -> Resolver {
        // reqwest is built without a default TLS provider: use ring, as kube
        // does. An error means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Resolver { plain_http, timeout, cache: Mutex::default() }
    }

    /// The registry host of `image` as its pull secrets name it.
    pub fn registry_of(image: &str) -> Result<String, ResolveError> {
        let reference = parse(image)?;
        Ok(reference.resolve_registry().to_string())
    }

    /// Resolves `image` for `platform`: its digest (`known_digest` when the
    /// caller already resolved this reference for the same spec, else what
    /// the tag points to now) and its config.
    pub async fn resolve(
        &self,
        image: &str,
        known_digest: Option<&str>,
        credentials: Option<&Credentials>,
        platform: &Platform,
    ) -> Result<ResolvedImage, ResolveError> {
        tokio::time::timeout(self.timeout, self.resolve_unbounded(image, known_digest, credentials, platform))
            .await
            .unwrap_or(Err(ResolveError::Timeout(self.timeout)))
    }

    async fn resolve_unbounded(
        &self,
        image: &str,
        known_digest: Option<&str>,
        credentials: Option<&Credentials>,
        platform: &Platform,
    ) -> Result<ResolvedImage, ResolveError> {
        let reference = parse(image)?;
        // try_from, not new: new falls back to a default client (HTTPS
        // everywhere) with only a log line when the config cannot be built.
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.plain_http.clone()),
            connect_timeout: Some(self.timeout),
            read_timeout: Some(self.timeout),
            ..Default::default()
        })
        .map_err(|e| ResolveError::Registry(format!("cannot build the registry client: {e}")))?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let anonymous = credentials.is_none();
        let failed = |e| classify(e, anonymous);
        let digest = match known_digest.or(reference.digest()) {
            Some(d) => d.to_string(),
            None => client.fetch_manifest_digest(&reference, &auth).await.map_err(failed)?,
        };
        let key = (digest.clone(), platform.clone());
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        let config = match cached {
            Some(config) => config,
            None => {
                let config = self.fetch_config(&client, &reference, &auth, &digest, platform).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, config.clone());
                config
            }
        };
        Ok(ResolvedImage { pinned: pinned(image, &digest), digest, config })
    }

    async fn fetch_config(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        digest: &str,
        platform: &Platform,
    ) -> Result<ImageConfig, ResolveError> {
        let anonymous = matches!(auth, RegistryAuth::Anonymous);
        let by_digest = reference.clone_with_digest(digest.to_string());
        let (manifest, _) = client.pull_manifest(&by_digest, auth).await.map_err(|e| classify(e, anonymous))?;
        let manifest = match manifest {
            OciManifest::Image(manifest) => manifest,
            OciManifest::ImageIndex(index) => {
                let entries: Vec<(Option<Platform>, String)> = index
                    .manifests
                    .iter()
                    .map(|m| {
                        let platform = m.platform.as_ref().map(|p| Platform {
                            os: p.os.to_string(),
                            architecture: p.architecture.to_string(),
                            variant: p.variant.clone(),
                        });
                        (platform, m.digest.clone())
                    })
                    .collect();
                let chosen =
                    choose_platform(&entries, platform).ok_or_else(|| ResolveError::NoPlatform(platform.clone()))?;
                let by_platform = reference.clone_with_digest(chosen.to_string());
                match client.pull_manifest(&by_platform, auth).await.map_err(|e| classify(e, anonymous))? {
                    (OciManifest::Image(manifest), _) => manifest,
                    (OciManifest::ImageIndex(_), _) => {
                        return Err(ResolveError::Registry(format!("the index entry {chosen} is another index")));
                    }
                }
            }
        };
        let mut blob = Vec::new();
        client.pull_blob(&by_digest, &manifest.config, &mut blob).await.map_err(|e| classify(e, anonymous))?;
        config_of(&blob)
    }
}

fn parse(image: &str) -> Result<Reference, ResolveError> {
    image.parse().map_err(|e: oci_client::ParseError| ResolveError::BadReference(image.into(), e.to_string()))
}

/// The image config's JSON, as far as the operator reads it.
#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

/// ENTRYPOINT, CMD and WORKDIR of an image config blob.
fn config_of(blob: &[u8]) -> Result<ImageConfig, ResolveError> {
    let json: ConfigJson = serde_json::from_slice(blob)
        .map_err(|e| ResolveError::Registry(format!("the image config is not valid JSON: {e}")))?;
    let config = json.config.unwrap_or(ContainerConfig { entrypoint: None, cmd: None, working_dir: None });
    Ok(ImageConfig {
        entrypoint: config.entrypoint.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
        working_dir: config.working_dir.filter(|w| !w.is_empty()),
    })
}

/// What went wrong, in the terms a fix is chosen by.
fn classify(e: OciDistributionError, anonymous: bool) -> ResolveError {
    use OciDistributionError as E;
    match e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => ResolveError::Unauthorized { anonymous },
        E::ImageManifestNotFoundError(what) => ResolveError::NotFound(what),
        E::ServerError { code: 401 | 403, .. } => ResolveError::Unauthorized { anonymous },
        E::ServerError { code: 404, url, .. } => ResolveError::NotFound(url),
        E::RegistryError { envelope, url } => {
            let codes = || envelope.errors.iter().map(|e| &e.code);
            if codes().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                ResolveError::Unauthorized { anonymous }
            } else if codes().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                let messages: Vec<&str> = envelope.errors.iter().map(|e| e.message.as_str()).collect();
                ResolveError::NotFound(format!("{}: {url}", messages.join("; ")))
            } else {
                ResolveError::Registry(format!("{}", E::RegistryError { envelope, url }))
            }
        }
        E::RequestError(e) if plain_http_answer(&e) => ResolveError::PlainHttp,
        E::RequestError(e) => ResolveError::Registry(format!("request failed: {}", error_chain(&e))),
        e => ResolveError::Registry(e.to_string()),
    }
}

/// True when a TLS handshake failed because the peer answered something
/// that is not TLS at all: rustls reads the first bytes of an HTTP
/// response as a record of an invalid content type.
fn plain_http_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    let not_tls = |e: &(dyn std::error::Error + 'static)| {
        matches!(
            e.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
        )
    };
    let mut next = Some(e);
    while let Some(e) = next {
        // io::Error's source() skips the error it wraps: look inside.
        let wrapped = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if not_tls(e) || wrapped.is_some_and(|w| not_tls(w) || plain_http_answer(w)) {
            return true;
        }
        next = e.source();
    }
    false
}

/// An error with its sources ("connection refused" is in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_blob_gives_entrypoint_cmd_and_workdir() {
        let blob = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/e.sh"],"Cmd":["node","s.js"],"WorkingDir":"/app"},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = config_of(blob).expect("parses");
        assert_eq!(config.entrypoint, ["/e.sh"]);
        assert_eq!(config.cmd, ["node", "s.js"]);
        assert_eq!(config.working_dir.as_deref(), Some("/app"));
        // An image without a config section runs nothing by itself.
        assert_eq!(config_of(br#"{"architecture":"amd64"}"#).expect("parses"), ImageConfig::default());
        assert!(config_of(b"<html>").is_err());
    }

    #[test]
    fn registry_errors_are_classified_for_their_fix() {
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert_eq!(classify(unauthorized, true), ResolveError::Unauthorized { anonymous: true });
        let missing = OciDistributionError::ServerError { code: 404, url: "u".into(), message: String::new() };
        assert!(matches!(classify(missing, true), ResolveError::NotFound(_)));
        let envelope: oci_client::errors::OciEnvelope =
            serde_json::from_str(r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#)
                .expect("envelope");
        let unknown = OciDistributionError::RegistryError { envelope, url: "u".into() };
        assert!(matches!(classify(unknown, false), ResolveError::NotFound(m) if m.contains("manifest unknown")));
    }

    /// A registry served over plain HTTP that the operator was not told
    /// about: the message must say so, not "corrupt message".
    #[tokio::test]
    async fn a_plain_http_registry_spoken_to_over_https_is_named_as_such() {
        use hyper::server::conn::http1;
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let registry = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("{}")))
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), answer));
            }
        });
        let platform = super::super::own_platform();
        let resolver = Resolver::new(Vec::new(), Duration::from_secs(5));
        let refused = resolver.resolve(&format!("{registry}/app:1"), None, None, &platform).await;
        assert_eq!(refused, Err(ResolveError::PlainHttp));
    }

    #[test]
    fn references_are_parsed_with_docker_hub_defaults() {
        assert_eq!(Resolver::registry_of("10.201.0.1:5000/clustered/app:dev").expect("ok"), "10.201.0.1:5000");
        assert_eq!(Resolver::registry_of("node:22").expect("ok"), "index.docker.io");
        assert!(matches!(Resolver::registry_of("UPPER/Case"), Err(ResolveError::BadReference(..))));
    }
}
