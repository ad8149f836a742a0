//! `mqtts://`: the rustls client configuration, with the system roots and
//! `MQTT_CA_FILE`.

use std::{path::Path, sync::Arc};

use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::{var, BrokerAddr, ConfigError, Tls};

/// The rustls client configuration of a TLS connection: system roots plus the CA file.
pub(super) fn tls_client_config(
    broker: &BrokerAddr,
    tls: &Tls,
) -> Result<ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();

    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "a system root certificate could not be loaded");
    }
    let (_added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "system root certificates rustls cannot use were skipped"
        );
    }

    if let Some(path) = &tls.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(ConfigError::NoTrustAnchors {
            var: var::CA_FILE,
            broker: broker.to_string(),
        });
    }

    // Named rather than left to rustls' process-wide default, which a service
    // may install differently for its own TLS clients.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::Tls {
            var: var::URL,
            value: broker.to_string(),
            reason: error.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

pub(super) fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), ConfigError> {
    let file_invalid = |reason: String| ConfigError::CaFileInvalid {
        var: var::CA_FILE,
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| ConfigError::CaFileUnreadable {
        var: var::CA_FILE,
        path: path.to_owned(),
        source,
    })?;
    let mut count = 0_usize;
    for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
        let certificate =
            certificate.map_err(|error| file_invalid(format!("malformed PEM: {error}")))?;
        roots.add(certificate).map_err(|error| {
            file_invalid(format!(
                "certificate {} is not a usable CA certificate: {error}",
                count + 1
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(file_invalid(
            "no '-----BEGIN CERTIFICATE-----' block found".to_owned(),
        ));
    }
    Ok(())
}
