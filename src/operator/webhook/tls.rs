//! The webhook's TLS: a certificate and key from files (cert-manager's Secret mounted as a
//! volume), reloaded when they change, or a self-signed CA and serving certificate made at
//! start, whose CA the leader writes into its MutatingWebhookConfiguration's `caBundle`.
//!
//! Serving and hot reload are axum-server's (`RustlsConfig::reload_from_pem`); noticing a change
//! is a poll of the files' contents rather than a file-system watch, because a Secret volume
//! is updated by swapping a `..data` symlink, which inotify-based watchers easily miss, and
//! reading two small files every few seconds costs nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::operator::Error;
use crate::operator::lease::Leadership;

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertificateSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Made at start for these DNS names (the webhook Service's).
    SelfSigned {
        dns_names: Vec<String>,
    },
}

/// A self-signed CA and a serving certificate it signed, all PEM.
pub struct SelfSigned {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// rustls needs one process-wide crypto provider; ring, as kube's client uses.
pub fn install_crypto_provider() {
    // Already installed (by a test in the same process, say) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA valid for a year and a serving certificate for `dns_names` signed by it.
pub fn self_signed(dns_names: &[String]) -> Result<SelfSigned, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "portpolicy webhook CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(SelfSigned {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The serving configuration, and the CA to publish when it is self-signed.
pub async fn serving_config(source: &CertificateSource) -> Result<(RustlsConfig, Option<String>), Error> {
    install_crypto_provider();
    match source {
        CertificateSource::Files { cert, key } => {
            let (cert_pem, key_pem) = read_pair(cert, key).await?;
            let config = RustlsConfig::from_pem(cert_pem, key_pem).await.map_err(|e| {
                Error::Config(format!(
                    "cannot use {} and {} as the webhook's certificate and key: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            Ok((config, None))
        }
        CertificateSource::SelfSigned { dns_names } => {
            let made = self_signed(dns_names)
                .map_err(|e| Error::Config(format!("cannot make a self-signed webhook certificate: {e}")))?;
            let config = RustlsConfig::from_pem(made.cert_pem.into_bytes(), made.key_pem.into_bytes())
                .await
                .map_err(|e| Error::Config(format!("cannot use the self-signed webhook certificate: {e}")))?;
            Ok((config, Some(made.ca_pem)))
        }
    }
}

async fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
    };
    Ok((read(cert.to_path_buf()).await?, read(key.to_path_buf()).await?))
}

/// Reloads the certificate and key whenever their contents change. A pair that cannot be
/// read or used (cert-manager writing one file before the other) keeps the one in use.
pub async fn reload_on_change(config: RustlsConfig, cert: PathBuf, key: PathBuf, period: Duration) {
    let mut loaded = read_pair(&cert, &key).await.ok();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = match read_pair(&cert, &key).await {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "cannot read the webhook certificate; serving the one loaded");
                continue;
            }
        };
        if loaded.as_ref() == Some(&current) {
            continue;
        }
        match config.reload_from_pem(current.0.clone(), current.1.clone()).await {
            Ok(()) => {
                tracing::info!(cert = %cert.display(), "reloaded the webhook's serving certificate");
                loaded = Some(current);
            }
            Err(error) => tracing::warn!(%error, cert = %cert.display(),
                "cannot use the changed webhook certificate and key yet; serving the one loaded"),
        }
    }
}

/// Serves `app` over TLS on a listener bound beforehand (so a taken address stops the operator
/// at start, exit status 2).
pub async fn serve(
    listener: std::net::TcpListener,
    config: RustlsConfig,
    app: axum::Router,
) -> std::io::Result<()> {
    axum_server::from_tcp_rustls(listener, config)?
        .serve(app.into_make_service())
        .await
}

pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| Error::Config(format!("cannot serve the webhook on {address}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Config(format!("cannot serve the webhook on {address}: {e}")))?;
    Ok(listener)
}

/// While this replica leads, makes `configuration`'s webhooks trust `ca_pem`: once per term,
/// retried every 2 s until it lands. (A new leader brings its own CA: only the leader answers
/// reviews, so only its CA needs trusting.)
pub async fn publish_ca_bundle(
    client: kube::Client,
    configuration: String,
    ca_pem: String,
    leadership: Leadership,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    loop {
        leadership.leading().await;
        loop {
            if !leadership.is_leading() {
                break;
            }
            match patch_ca_bundle(&api, &configuration, &ca_pem).await {
                Ok(count) => {
                    tracing::info!(%configuration, webhooks = count, "published the webhook's CA in caBundle");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, %configuration, "cannot publish the webhook's CA; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        leadership.lost().await;
    }
}

async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    configuration: &str,
    ca_pem: &str,
) -> Result<usize, kube::Error> {
    let current = api.get(configuration).await?;
    let bundle = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec())).unwrap_or_default();
    let webhooks = current.webhooks.as_deref().unwrap_or_default();
    // The test pins the list as read: a concurrent edit fails the patch instead of writing a
    // CA into the wrong webhook.
    let mut operations = vec![json!({"op": "test", "path": "/metadata/resourceVersion",
        "value": current.metadata.resource_version})];
    for i in 0..webhooks.len() {
        operations.push(
            json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}),
        );
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(operations)).map_err(kube::Error::SerdeError)?;
    api.patch(configuration, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(webhooks.len())
}
