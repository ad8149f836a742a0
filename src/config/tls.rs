//! `mqtts://` and `wss://`: the rustls client configuration, with the system
//! roots, `MQTT_CA_FILE`, a client certificate and ALPN.
//!
//! One crypto provider is compiled in, ring (see Cargo.toml); every
//! configuration built here names it, so nothing depends on a process-wide
//! default being installed.

use std::{fmt, path::Path, path::PathBuf, sync::Arc};

use rustls_pemfile::Item;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use super::{env::Vars, expect, invalid, var, BrokerAddr, Config, ConfigError};

/// TLS settings of a `mqtts://` or `wss://` connection.
///
/// The system's root certificates are always trusted; `ca_file` adds the certificates
/// of a PEM file (`MQTT_CA_FILE`), such as a private CA's. `client_auth` presents a
/// client certificate (mTLS), `alpn` offers application protocols. A complete
/// [`rustls::ClientConfig`] given with [`Config::with_rustls_config`] replaces all
/// of them.
///
/// ```
/// use tower_mqtt::config::Config;
///
/// let config = Config::new("mqtts://broker.example")?.with_alpn(["x-amzn-mqtt-ca"]);
/// let tls = config.broker.tls.as_ref().expect("mqtts:// is TLS");
/// assert!(tls.ca_file.is_none() && tls.client_auth.is_none());
/// assert_eq!(tls.alpn, ["x-amzn-mqtt-ca"]);
/// # Ok::<(), tower_mqtt::config::ConfigError>(())
/// ```
///
/// [`Config::with_rustls_config`]: super::Config::with_rustls_config
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Tls {
    /// PEM file of CA certificates trusted besides the system roots (`MQTT_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// The client certificate and its key (`MQTT_CLIENT_CERT_FILE`,
    /// `MQTT_CLIENT_KEY_FILE`), for brokers that require one.
    pub client_auth: Option<ClientAuth>,
    /// Application protocols offered in the handshake, most preferred first
    /// (`MQTT_TLS_ALPN`), such as `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
    /// A complete client configuration, used as it is.
    pub client_config: Option<Arc<ClientConfig>>,
}

impl Tls {
    /// TLS that trusts the system roots and, if given, the certificates in `ca_file`.
    pub fn new(ca_file: Option<PathBuf>) -> Self {
        Tls {
            ca_file,
            ..Tls::default()
        }
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        let same_config = match (&self.client_config, &other.client_config) {
            (None, None) => true,
            // rustls configurations cannot be compared; the same one is equal.
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.ca_file == other.ca_file
            && self.client_auth == other.client_auth
            && self.alpn == other.alpn
            && same_config
    }
}

impl Eq for Tls {}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file)
            .field("client_auth", &self.client_auth)
            .field("alpn", &self.alpn)
            .field(
                "client_config",
                &self.client_config.as_ref().map(|_| "given in code"),
            )
            .finish()
    }
}

/// A client certificate chain and its private key, as PEM files.
///
/// The chain starts with the client's own certificate; intermediates may follow. The
/// key may be PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`) or
/// SEC1 EC (`BEGIN EC PRIVATE KEY`), unencrypted. Both may be in one file. The files
/// are read when the connection is configured, so a bad one is reported before
/// anything connects.
///
/// ```
/// use tower_mqtt::config::ClientAuth;
///
/// let auth = ClientAuth::new("/run/secrets/device.crt", "/run/secrets/device.key");
/// assert_eq!(auth.cert_file.to_str(), Some("/run/secrets/device.crt"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientAuth {
    /// PEM file of the certificate chain (`MQTT_CLIENT_CERT_FILE`).
    pub cert_file: PathBuf,
    /// PEM file of the private key (`MQTT_CLIENT_KEY_FILE`).
    pub key_file: PathBuf,
}

impl ClientAuth {
    /// A client certificate chain and its key, from two PEM files (or one, twice).
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        ClientAuth {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        }
    }
}

/// The crypto provider of every configuration this crate builds.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration of a TLS connection.
pub(super) fn tls_client_config(
    broker: &BrokerAddr,
    tls: &Tls,
) -> Result<Arc<ClientConfig>, ConfigError> {
    if let Some(config) = &tls.client_config {
        return Ok(config.clone());
    }
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

    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::Tls {
            var: var::URL,
            value: broker.to_string(),
            reason: error.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let chain = read_cert_chain(&auth.cert_file)?;
            let key = read_key(&auth.key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| client_auth_error(auth, &error))?
        }
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// What rustls found wrong with a certificate and key that both parsed.
fn client_auth_error(auth: &ClientAuth, error: &rustls::Error) -> ConfigError {
    match error {
        rustls::Error::InconsistentKeys(_) => ConfigError::Conflict {
            var: var::CLIENT_KEY_FILE,
            value: auth.key_file.display().to_string(),
            other_var: var::CLIENT_CERT_FILE,
            other_value: auth.cert_file.display().to_string(),
            expected: expect::KEY_MATCHES_CERT,
        },
        // An algorithm or encoding ring cannot use: the key's fault.
        error => ConfigError::FileInvalid {
            var: var::CLIENT_KEY_FILE,
            path: auth.key_file.clone(),
            reason: format!("the key cannot be used: {error}"),
            expected: expect::KEY_FILE,
        },
    }
}

fn read_pem(
    var: &'static str,
    path: &Path,
    expected: &'static str,
) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::FileUnreadable {
        var,
        path: path.to_owned(),
        source,
        expected,
    })?;
    if !pem.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(ConfigError::FileInvalid {
            var,
            path: path.to_owned(),
            reason: "not PEM: no '-----BEGIN' line (a DER file can be converted with \
                     `openssl x509 -inform der`)"
                .to_owned(),
            expected,
        });
    }
    Ok(pem)
}

/// The client's certificate chain, in the order of the file.
fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let invalid = |reason: String| ConfigError::FileInvalid {
        var: var::CLIENT_CERT_FILE,
        path: path.to_owned(),
        reason,
        expected: expect::CERT_FILE,
    };
    let pem = read_pem(var::CLIENT_CERT_FILE, path, expect::CERT_FILE)?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("malformed PEM: {error}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "no '-----BEGIN CERTIFICATE-----' block found".to_owned(),
        ));
    }
    Ok(chain)
}

/// The first private key of the file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let invalid = |reason: String| ConfigError::FileInvalid {
        var: var::CLIENT_KEY_FILE,
        path: path.to_owned(),
        reason,
        expected: expect::KEY_FILE,
    };
    let pem = read_pem(var::CLIENT_KEY_FILE, path, expect::KEY_FILE)?;
    for item in rustls_pemfile::read_all(&mut pem.as_slice()) {
        // The error says where the PEM is malformed, never what the key holds.
        match item.map_err(|error| invalid(format!("malformed PEM: {error}")))? {
            Item::Pkcs8Key(key) => return Ok(key.into()),
            Item::Pkcs1Key(key) => return Ok(key.into()),
            Item::Sec1Key(key) => return Ok(key.into()),
            _ => {}
        }
    }
    let encrypted = pem
        .windows(b"ENCRYPTED PRIVATE KEY".len())
        .any(|w| w == b"ENCRYPTED PRIVATE KEY")
        || pem
            .windows(b"Proc-Type: 4,ENCRYPTED".len())
            .any(|w| w == b"Proc-Type: 4,ENCRYPTED");
    Err(invalid(if encrypted {
        "the private key is encrypted; decrypt it first (`openssl pkey -in KEY -out PLAIN`)"
            .to_owned()
    } else {
        "no private key found".to_owned()
    }))
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

/// Parses `MQTT_TLS_ALPN`: protocol ids separated by commas.
pub(super) fn parse_alpn(raw: &str) -> Option<Vec<String>> {
    raw.split(',')
        .map(str::trim)
        .map(|id| {
            // ALPN ids are 1 to 255 bytes; the registered ones are printable ASCII.
            let ok = (1..=255).contains(&id.len()) && id.chars().all(|c| c.is_ascii_graphic());
            ok.then(|| id.to_owned())
        })
        .collect()
}

impl Config {
    /// Trusts the CA certificates of the PEM file at `path` besides the system
    /// roots (`MQTT_CA_FILE`).
    ///
    /// Like every TLS setting it applies to `mqtts://` and `wss://` URLs; on a plain
    /// one it is ignored with a warning, as the variable is.
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtts://broker.internal")?
    ///     .with_ca_file("/etc/mqtt/ca.pem");
    /// assert!(config.broker.tls.unwrap().ca_file.is_some());
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        if let Some(tls) = self.tls_or_warn(var::CA_FILE) {
            tls.ca_file = Some(path);
        }
        self
    }

    /// Presents the client certificate chain of the PEM file `cert_file`, with the
    /// private key of `key_file`, to brokers that require one (mTLS):
    /// `MQTT_CLIENT_CERT_FILE` and `MQTT_CLIENT_KEY_FILE`. See [`ClientAuth`] for
    /// the formats. The files are read when the connection is configured
    /// (by [`Client::new`](crate::Client::new) and [`serve`](crate::serve)), where a missing file, a file that is not PEM, one
    /// without a certificate or a key, or a key that does not belong to the
    /// certificate is an error naming the variable and the file.
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtts://a1b2c3-ats.iot.eu-west-1.amazonaws.com")?
    ///     .with_client_auth("/run/secrets/device.crt", "/run/secrets/device.key");
    /// assert!(config.broker.tls.unwrap().client_auth.is_some());
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_client_auth(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        let auth = ClientAuth::new(cert_file, key_file);
        if let Some(tls) = self.tls_or_warn(var::CLIENT_CERT_FILE) {
            tls.client_auth = Some(auth);
        }
        self
    }

    /// Offers these application protocols in the TLS handshake, most preferred
    /// first (`MQTT_TLS_ALPN`). AWS IoT Core takes MQTT with a client certificate
    /// on port 443 only with `x-amzn-mqtt-ca`.
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtts://a1b2c3-ats.iot.eu-west-1.amazonaws.com:443")?
    ///     .with_alpn(["x-amzn-mqtt-ca"]);
    /// assert_eq!(config.broker.tls.unwrap().alpn, ["x-amzn-mqtt-ca"]);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_alpn<I, S>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let protocols = protocols.into_iter().map(Into::into).collect();
        if let Some(tls) = self.tls_or_warn(var::TLS_ALPN) {
            tls.alpn = protocols;
        }
        self
    }

    /// Uses `client_config` as it is for `mqtts://` and `wss://`: for what the
    /// variables do not cover, such as a hardware-backed key, a custom certificate
    /// verifier or pinned protocol versions.
    ///
    /// [`rustls::ClientConfig`] is the standard type for this, re-exported as
    /// [`config::rustls`](crate::config::rustls) so that its version always
    /// matches. The system roots, `MQTT_CA_FILE`, the client certificate and ALPN
    /// are then not applied: setting any of them as well is an error from
    /// [`validate`](Self::validate).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_mqtt::config::{rustls, Config};
    ///
    /// let provider = Arc::new(rustls::crypto::ring::default_provider());
    /// let mut roots = rustls::RootCertStore::empty();
    /// # let ca = rcgen::generate_simple_self_signed(["ca.internal".to_owned()]).unwrap().cert.der().clone();
    /// roots.add(ca)?; // e.g. from your own store
    /// let tls = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_protocol_versions(&[&rustls::version::TLS13])?
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    /// let config = Config::new("mqtts://broker.internal")?.with_rustls_config(tls);
    /// config.validate()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn with_rustls_config(mut self, client_config: impl Into<Arc<ClientConfig>>) -> Self {
        let client_config = client_config.into();
        if let Some(tls) = self.tls_or_warn("a rustls ClientConfig") {
            tls.client_config = Some(client_config);
        }
        self
    }

    fn tls_or_warn(&mut self, setting: &str) -> Option<&mut Tls> {
        if self.broker.tls.is_none() {
            tracing::warn!(
                setting,
                broker = %self.broker,
                "a TLS setting is ignored: the broker URL does not use TLS (mqtts:// or wss://)"
            );
        }
        self.broker.tls.as_mut()
    }

    /// A complete rustls configuration leaves nothing for the other settings to do.
    pub(super) fn validate_tls(&self) -> Result<(), ConfigError> {
        let Some(tls) = &self.broker.tls else {
            return Ok(());
        };
        if tls.client_config.is_none() {
            return Ok(());
        }
        let unused = if let Some(path) = &tls.ca_file {
            Some((var::CA_FILE, path.display().to_string()))
        } else if let Some(auth) = &tls.client_auth {
            Some((var::CLIENT_CERT_FILE, auth.cert_file.display().to_string()))
        } else if !tls.alpn.is_empty() {
            Some((var::TLS_ALPN, tls.alpn.join(",")))
        } else {
            None
        };
        match unused {
            Some((var, value)) => Err(invalid(var, value, expect::CUSTOM_TLS)),
            None => Ok(()),
        }
    }
}

/// Puts `MQTT_CA_FILE`, `MQTT_CLIENT_CERT_FILE`, `MQTT_CLIENT_KEY_FILE` and
/// `MQTT_TLS_ALPN` on `config`.
pub(super) fn apply_tls<F: Fn(&str) -> Option<String>>(
    config: &mut Config,
    vars: &Vars<F>,
) -> Result<(), ConfigError> {
    let ca_file = vars.get(var::CA_FILE);
    let cert_file = vars.get(var::CLIENT_CERT_FILE);
    let key_file = vars.get(var::CLIENT_KEY_FILE);
    let client_auth = match (cert_file, key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ClientAuth::new(cert, key)),
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                var: var::CLIENT_KEY_FILE,
                expected: expect::KEY_WITH_CERT,
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                var: var::CLIENT_CERT_FILE,
                expected: expect::CERT_WITH_KEY,
            })
        }
    };
    let alpn = vars.parse(var::TLS_ALPN, expect::ALPN, parse_alpn)?;

    let Some(tls) = &mut config.broker.tls else {
        for (name, set) in [
            (var::CA_FILE, ca_file.is_some()),
            (var::CLIENT_CERT_FILE, client_auth.is_some()),
            (var::TLS_ALPN, alpn.is_some()),
        ] {
            if set {
                tracing::warn!(
                    var = name,
                    broker = %config.broker,
                    "a TLS variable is ignored: MQTT_URL does not use TLS (mqtts:// or wss://)"
                );
            }
        }
        return Ok(());
    };
    if let Some(path) = ca_file {
        tls.ca_file = Some(PathBuf::from(path));
    }
    if client_auth.is_some() {
        tls.client_auth = client_auth;
    }
    if let Some(alpn) = alpn {
        tls.alpn = alpn;
    }
    Ok(())
}
