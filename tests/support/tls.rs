//! Certificates made by the test, mosquitto TLS listener settings, and a
//! TLS-terminating front (the role of a load balancer, or of AWS IoT Core's
//! port 443) for what mosquitto 2.0.11 cannot do: require an ALPN protocol, or
//! carry WebSockets.
//!
//! ```ignore
//! let pki = Pki::generate();
//! let broker = Mosquitto::start_with_config(&pki.mosquitto_listener(Leaf::Server, ClientCerts::Required)).await;
//! // mqtts://localhost:<port> with MQTT_CA_FILE = pki.path(File::Ca) ...
//! let front = TlsFront::start(broker.addr(), pki.front_config(ClientCerts::Required, &[b"x-amzn-mqtt-ca"])).await;
//! ```
//!
//! Everything is generated with rcgen into a temporary directory, so no
//! openssl is needed and nothing outlives the test.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

/// The PEM files of one test's certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum File {
    /// The test CA's certificate.
    Ca,
    /// Another CA, trusted by nobody.
    RogueCa,
    /// The server's chain for `localhost` and `127.0.0.1`, signed by the CA.
    ServerCert,
    /// Its key.
    ServerKey,
    /// A server certificate for `other.example` only, signed by the CA.
    OtherHostCert,
    /// Its key.
    OtherHostKey,
    /// A client certificate signed by the CA, followed by the CA (a chain).
    ClientCert,
    /// Its key (PKCS#8).
    ClientKey,
    /// A client certificate signed by the rogue CA.
    RogueClientCert,
    /// Its key.
    RogueClientKey,
}

/// Which server certificate a listener presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaf {
    /// For `localhost` and `127.0.0.1`.
    Server,
    /// For `other.example` only.
    OtherHost,
}

/// Whether a listener asks for client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCerts {
    /// It does not ask.
    None,
    /// It refuses a client without a certificate from the test CA.
    Required,
}

/// A CA, a rogue CA, and certificates they signed, as files.
pub(crate) struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Generates every certificate and writes the PEM files.
    ///
    /// # Panics
    ///
    /// If rcgen fails or the files cannot be written.
    pub(crate) fn generate() -> Pki {
        let pki = Pki {
            dir: tempfile::Builder::new()
                .prefix("tower-mqtt-pki-")
                .tempdir()
                .expect("a directory for certificates"),
        };
        let (ca, ca_key) = make_ca("tower-mqtt test CA");
        let (rogue, rogue_key) = make_ca("rogue CA");
        pki.write(File::Ca, &ca.pem());
        pki.write(File::RogueCa, &rogue.pem());

        let leaf = |names: &[&str], purpose, issuer: &rcgen::Certificate, issuer_key| {
            let key = KeyPair::generate().expect("a key");
            let mut params =
                CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                    .expect("certificate names");
            params.distinguished_name = name(names[0]);
            params.extended_key_usages = vec![purpose];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, issuer, issuer_key).expect("sign");
            (cert, key)
        };
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let (cert, key) = leaf(&["localhost", "127.0.0.1"], server.clone(), &ca, &ca_key);
        pki.write(File::ServerCert, &cert.pem());
        pki.write(File::ServerKey, &key.serialize_pem());
        let (cert, key) = leaf(&["other.example"], server, &ca, &ca_key);
        pki.write(File::OtherHostCert, &cert.pem());
        pki.write(File::OtherHostKey, &key.serialize_pem());
        let (cert, key) = leaf(&["device-17"], client.clone(), &ca, &ca_key);
        pki.write(File::ClientCert, &format!("{}{}", cert.pem(), ca.pem()));
        pki.write(File::ClientKey, &key.serialize_pem());
        let (cert, key) = leaf(&["device-17"], client, &rogue, &rogue_key);
        pki.write(File::RogueClientCert, &cert.pem());
        pki.write(File::RogueClientKey, &key.serialize_pem());
        pki
    }

    /// The path of one of the files.
    pub(crate) fn path(&self, file: File) -> PathBuf {
        self.dir.path().join(format!("{file:?}.pem"))
    }

    /// The path as a string, for a variable's value.
    pub(crate) fn var(&self, file: File) -> String {
        self.path(file).display().to_string()
    }

    fn write(&self, file: File, pem: &str) {
        std::fs::write(self.path(file), pem).expect("write a PEM file");
    }

    /// mosquitto settings that make the listener before them a TLS one, for
    /// [`Mosquitto::start_with_config`](super::Mosquitto::start_with_config).
    pub(crate) fn mosquitto_listener(&self, leaf: Leaf, client_certs: ClientCerts) -> String {
        let (cert, key) = match leaf {
            Leaf::Server => (File::ServerCert, File::ServerKey),
            Leaf::OtherHost => (File::OtherHostCert, File::OtherHostKey),
        };
        format!(
            "certfile {}\nkeyfile {}\ncafile {}\nrequire_certificate {}\n",
            self.path(cert).display(),
            self.path(key).display(),
            self.path(File::Ca).display(),
            client_certs == ClientCerts::Required,
        )
    }

    /// A rustls server configuration with the `localhost` certificate, for a
    /// [`TlsFront`]. With `alpn` non-empty, a client must offer one of them.
    pub(crate) fn front_config(&self, client_certs: ClientCerts, alpn: &[&[u8]]) -> ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match client_certs {
            ClientCerts::None => builder.with_no_client_auth(),
            ClientCerts::Required => {
                let mut roots = RootCertStore::empty();
                for cert in certs(&self.path(File::Ca)) {
                    roots.add(cert).expect("the CA");
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = PrivateKeyDer::from_pem_file(self.path(File::ServerKey)).expect("server key");
        let mut config = builder
            .with_single_cert(certs(&self.path(File::ServerCert)), key)
            .expect("server certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn make_ca(common_name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.self_signed(&key).expect("self-sign"), key)
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("a PEM file")
        .collect::<Result<_, _>>()
        .expect("certificates")
}

/// What a [`TlsFront`] saw of one connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct FrontSeen {
    /// The ALPN protocol the handshake agreed on.
    pub(crate) alpn: Option<Vec<u8>>,
    /// Whether the client presented a certificate.
    pub(crate) client_cert: bool,
    /// The first line the client sent after the handshake (the request line of
    /// a WebSocket upgrade), when it is text.
    pub(crate) first_line: Option<String>,
}

/// Terminates TLS on a free loopback port and relays the plain bytes to
/// `upstream`, recording what each accepted handshake agreed on. Dropping it
/// stops accepting and relaying.
pub(crate) struct TlsFront {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<FrontSeen>>>,
    acceptor: JoinHandle<()>,
}

impl TlsFront {
    /// Starts accepting.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub(crate) async fn start(upstream: SocketAddr, config: ServerConfig) -> TlsFront {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind a port for the TLS front");
        let addr = listener.local_addr().expect("its address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let record = seen.clone();
        let acceptor = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (tls, record) = (tls.clone(), record.clone());
                relays.spawn(async move {
                    // A refused handshake ends the connection; that is the point.
                    let _ = relay(client, upstream, tls, record).await;
                });
            }
        });
        TlsFront {
            addr,
            seen,
            acceptor,
        }
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What the accepted handshakes agreed on, in order.
    pub(crate) fn seen(&self) -> Vec<FrontSeen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    record: Arc<Mutex<Vec<FrontSeen>>>,
) -> io::Result<()> {
    let mut client = tls.accept(client).await?;
    let (_, session) = client.get_ref();
    let mut seen = FrontSeen {
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
        client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
        first_line: None,
    };
    let mut upstream = TcpStream::connect(upstream).await?;
    let mut first = vec![0_u8; 4096];
    let n = client.read(&mut first).await?;
    first.truncate(n);
    seen.first_line = std::str::from_utf8(&first)
        .ok()
        .and_then(|text| text.lines().next())
        .map(str::to_owned);
    record
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(seen);
    tokio::io::AsyncWriteExt::write_all(&mut upstream, &first).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
