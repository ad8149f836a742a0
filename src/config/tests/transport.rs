//! Tests of the transport settings: WebSocket URLs, client certificates,
//! ALPN, credentials from the environment and files, and how connection
//! failures are described.

// The tests reach into every part of the module.
#![allow(clippy::wildcard_imports)]

use std::{io, path::Path, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rumqttc::{ConnectionError, TlsConfiguration, Transport};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, ClientConfig};

use super::env;
use crate::config::{
    connect::{ConnectionAttempts, FailureKind},
    *,
};

// Keys made once with openssl for the formats rcgen does not write; throwaway test keys.
const RSA_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAtLz0oKNcXLOy+UZqVNu6uNaeqzzqeHg/uQUMb4GJFCg2UQPM
SDSKVwWr/G8tVnemJuaHxHnha3milRcmlNL+XylFPfqEtkiGz4ghdyJFMLJ1FLeS
D3xIUpoQoW4OtgMGT72RWHUYsch8lDt13T9+//4Am2XQ8X9nk8Cfw7GW9i65+lRr
CVOsa8upSzIG4rVXRWOx09AsT4zLNsyoqBU4UhET5pTv4xV3Pusp8BmbJ91SxNR6
zrMQep+kUXLxgNhAMDT7Jef3fbFTcUwkybbW9dSnoQp3I1SzeJWFrsnYwAredPds
XaIcgOxtnhDs9iV8OebOtUjzPWthQyW3mOzTKQIDAQABAoIBABgNAPyTYIoRe6KC
RUoPh1RrcufUjlsDnW8whcwcz7H3++ph+AAvxaz42z8XSFA2UczhZnW1xlJ3+DOg
xgiN3z2oj0dFG/3pvs7FDbb9v3lQdhYQq4YWAsXDLK1eqOR9mIxp7Hp58pRN2o4b
L38GoQ7NrSUAsoJAcvcNbfUrn6wYqCCg6GB+fc8jqsi21+EKv43LYnQPl2l+vXYx
dbxbjatjey/GCgb3FcKQnuDxuXHwdQiWPPdEbQ8QurZJ3divjRV2OG7ZxbEo5hpD
BGLIYHQHp09Pxo5rZc9Yfb+uHopMeNuMLwJecaxIANOpCQo39/amToR01C0kDFWc
+y1VUUUCgYEA74TffD0KCwftke8CRAwMhx0FCkmAYDDwhg+1jkSbc7knls1JDvGQ
qXKK0ERNeLcEhmbmPQS8cXVXe2p897LDwh9f9VgUqMRMHli+czfGZ3GkCe8pmSzA
R+SoBgvqSJfXw/ragFdCMij6q4wjmDdDr6Mph9fE2T91ltFY/fGS3EsCgYEAwSyo
IHQy5rTuNYZ3x4nhEW0PmH9rfnl8vqcT71S7MryhyctiE5RnOQLRUoz8pV8XHlpA
25zkjwIPIXIVeBnVCPDxvAE/lIBuLqIa1w/CXx/pevCxwc57o2rhovlTcqxDzS+r
PsnGGNHVXoJ53AhioWPrPa8vP6eXwS2wK2SVvdsCgYBUnSwWR7n0i6hxlW3HfDow
wR+2sqCXWrKdqY8J41LHXvGNZJgan1vrgHtpd7emnYELue48QCASNNHi14uuNYjS
WyMbGTKzLCV30wH00g9VG+BHYiXf5t9GhpCVEkCBxKKEqWnnTOwlrDRhxfANJfjT
Y2CYjLENzk1MKki17VFkYQKBgQCtSkk8a+Dps29p1soG13pu7n4qGEwu9f7g7PLm
JQWVe0BLzUabN+rtasiqnE1ccJRFp0M9f15Np9Q49aWqysmgLr08IYaOyjONY+Be
AwYj3XXO0rMzn+6r54qob6/bVAuyusuNFOa/hyU4liWJLICGNSNnf4sMOGTbaAf8
tUvbNwKBgEvlpMYrVMt5gjj/dWsajD2Iym/Hgpd+PyIX9jXAW4XJc9rrxv/8kpH1
LU8p6clDXvMdRFR834z3RAOdwJm+Uoro+me+z/fKOXOrmcHJSQMFnNouu2yC3ydG
8MkcbdaOIbfEUrFy7NvI66KmXavCWS5m6M7fj1ci/wChiUUhK4ok
-----END RSA PRIVATE KEY-----
";
const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC0vPSgo1xcs7L5
RmpU27q41p6rPOp4eD+5BQxvgYkUKDZRA8xINIpXBav8by1Wd6Ym5ofEeeFreaKV
FyaU0v5fKUU9+oS2SIbPiCF3IkUwsnUUt5IPfEhSmhChbg62AwZPvZFYdRixyHyU
O3XdP37//gCbZdDxf2eTwJ/DsZb2Lrn6VGsJU6xry6lLMgbitVdFY7HT0CxPjMs2
zKioFThSERPmlO/jFXc+6ynwGZsn3VLE1HrOsxB6n6RRcvGA2EAwNPsl5/d9sVNx
TCTJttb11KehCncjVLN4lYWuydjACt5092xdohyA7G2eEOz2JXw55s61SPM9a2FD
JbeY7NMpAgMBAAECggEAGA0A/JNgihF7ooJFSg+HVGty59SOWwOdbzCFzBzPsff7
6mH4AC/FrPjbPxdIUDZRzOFmdbXGUnf4M6DGCI3fPaiPR0Ub/em+zsUNtv2/eVB2
FhCrhhYCxcMsrV6o5H2YjGnsennylE3ajhsvfwahDs2tJQCygkBy9w1t9SufrBio
IKDoYH59zyOqyLbX4Qq/jctidA+XaX69djF1vFuNq2N7L8YKBvcVwpCe4PG5cfB1
CJY890RtDxC6tknd2K+NFXY4btnFsSjmGkMEYshgdAenT0/Gjmtlz1h9v64eikx4
24wvAl5xrEgA06kJCjf39qZOhHTULSQMVZz7LVVRRQKBgQDvhN98PQoLB+2R7wJE
DAyHHQUKSYBgMPCGD7WORJtzuSeWzUkO8ZCpcorQRE14twSGZuY9BLxxdVd7anz3
ssPCH1/1WBSoxEweWL5zN8ZncaQJ7ymZLMBH5KgGC+pIl9fD+tqAV0IyKPqrjCOY
N0OvoymH18TZP3WW0Vj98ZLcSwKBgQDBLKggdDLmtO41hnfHieERbQ+Yf2t+eXy+
pxPvVLsyvKHJy2ITlGc5AtFSjPylXxceWkDbnOSPAg8hchV4GdUI8PG8AT+UgG4u
ohrXD8JfH+l68LHBznujauGi+VNyrEPNL6s+ycYY0dVegnncCGKhY+s9ry8/p5fB
LbArZJW92wKBgFSdLBZHufSLqHGVbcd8OjDBH7ayoJdasp2pjwnjUsde8Y1kmBqf
W+uAe2l3t6adgQu57jxAIBI00eLXi641iNJbIxsZMrMsJXfTAfTSD1Ub4EdiJd/m
30aGkJUSQIHEooSpaedM7CWsNGHF8A0l+NNjYJiMsQ3OTUwqSLXtUWRhAoGBAK1K
STxr4Omzb2nWygbXem7ufioYTC71/uDs8uYlBZV7QEvNRps36u1qyKqcTVxwlEWn
Qz1/Xk2n1Dj1parKyaAuvTwhho7KM41j4F4DBiPddc7SszOf7qvniqhvr9tUC7K6
y40U5r+HJTiWJYksgIY1I2d/iww4ZNtoB/y1S9s3AoGAS+WkxitUy3mCOP91axqM
PYjKb8eCl34/Ihf2NcBbhclz2uvG//ySkfUtTynpyUNe8x1EVHzfjPdEA53Amb5S
iuj6Z77P98o5c6uZwclJAwWc2i67bILfJ0bwyRxt1o4ht8RSsXLs28jroqZdq8JZ
Lmbozt+PVyL/AKGJRSEriiQ=
-----END PRIVATE KEY-----
";
const EC_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFNcHdi1Mes8UaX8MQiYPJWbTByAeSQ0vJFMnE5uOIKDoAoGCCqGSM49
AwEHoUQDQgAEzcICa7beusUCNPF05jUaL+8dNxUD4i3Uwd1MwLV4syq/yvMlVXdj
NWAtva+O6gjRYby+bectACDxpQRRXSGyiQ==
-----END EC PRIVATE KEY-----
";
const EC_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgU1wd2LUx6zxRpfwx
CJg8lZtMHIB5JDS8kUycTm44goOhRANCAATNwgJrtt66xQI08XTmNRov7x03FQPi
LdTB3UzAtXizKr/K8yVVd2M1YC29r47qCNFhvL5t5y0AIPGlBFFdIbKJ
-----END PRIVATE KEY-----
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A CA and a client certificate it signed for `key`, as PEM.
fn client_cert(key: &KeyPair) -> (String, String) {
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let cert = CertificateParams::new(vec!["device-17".to_owned()])
        .unwrap()
        .signed_by(key, &ca, &ca_key)
        .unwrap();
    (cert.pem(), ca.pem())
}

fn rustls_config(config: &Config) -> Arc<ClientConfig> {
    match config.mqtt_options().unwrap().transport() {
        Transport::Tls(TlsConfiguration::Rustls(config)) => config,
        #[cfg(feature = "websocket")]
        Transport::Wss(TlsConfiguration::Rustls(config)) => config,
        _ => panic!("not a rustls transport"),
    }
}

/// A TLS configuration that the test machine can build: a CA file keeps it
/// independent of the system store.
fn tls_base(dir: &Path) -> Config {
    let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    let ca_file = write(dir, "roots.pem", &ca.cert.pem());
    Config::new("mqtts://broker.example")
        .unwrap()
        .with_ca_file(ca_file)
}

#[cfg(feature = "websocket")]
#[test]
fn websocket_urls() {
    for (url, tls, port, path, shown) in [
        ("ws://h", false, 80, "/", "ws://h:80/"),
        ("wss://h", true, 443, "/", "wss://h:443/"),
        (
            "WSS://h:8084/mqtt",
            true,
            8084,
            "/mqtt",
            "wss://h:8084/mqtt",
        ),
        (
            "ws://u:p@h/a/b%20c",
            false,
            80,
            "/a/b%20c",
            "ws://h:80/a/b%20c",
        ),
        (
            "wss://[::1]/mqtt",
            true,
            443,
            "/mqtt",
            "wss://[::1]:443/mqtt",
        ),
    ] {
        let config = Config::new(url).unwrap();
        assert_eq!(config.broker.is_tls(), tls, "{url}");
        assert_eq!(config.broker.port, port, "{url}");
        assert_eq!(config.broker.websocket_path.as_deref(), Some(path), "{url}");
        assert_eq!(config.broker.to_string(), shown, "{url}");
    }
    for (url, expected) in [
        ("ws://h/mqtt?token=x", expect::QUERY),
        ("wss://h/mqtt#x", expect::FRAGMENT),
    ] {
        let error = Config::new(url).unwrap_err();
        assert_eq!(expected_of(&error), expected, "{url}");
    }
    // A path on a TCP URL is still an error.
    assert_eq!(
        expected_of(&Config::new("mqtt://h/mqtt").unwrap_err()),
        expect::PATH
    );
}

#[cfg(feature = "websocket")]
#[test]
fn websocket_options_carry_the_url_without_credentials() {
    let config = Config::new("ws://svc:hunter2@broker:8080/mqtt")
        .unwrap()
        .with_client_id("svc-1")
        .with_keep_alive(std::time::Duration::from_secs(9));
    let options = config.mqtt_options().unwrap();
    assert!(matches!(options.transport(), Transport::Ws));
    assert_eq!(
        options.broker_address(),
        ("ws://broker:8080/mqtt".to_owned(), 8080)
    );
    assert_eq!(options.client_id(), "svc-1");
    assert_eq!(options.keep_alive(), std::time::Duration::from_secs(9));
    let login = options.credentials().unwrap();
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("svc", "hunter2")
    );

    let dir = tempfile::tempdir().unwrap();
    let config = tls_base(dir.path()).with_lookup(env(&[("MQTT_URL", "wss://broker/mqtt")]));
    // The CA file set in code applies to the new TLS URL too.
    let config = config.unwrap();
    assert!(config.broker.tls.as_ref().unwrap().ca_file.is_some());
    rustls_config(&config);
}

#[cfg(not(feature = "websocket"))]
#[test]
fn websocket_urls_need_the_feature() {
    let error = Config::new("wss://h/mqtt").unwrap_err();
    assert_eq!(expected_of(&error), expect::WEBSOCKET_FEATURE);
}

fn expected_of(error: &ConfigError) -> &'static str {
    match error {
        ConfigError::Invalid { expected, .. }
        | ConfigError::Missing { expected, .. }
        | ConfigError::Conflict { expected, .. }
        | ConfigError::FileUnreadable { expected, .. }
        | ConfigError::FileInvalid { expected, .. } => expected,
        other => panic!("no expected form in {other:?}"),
    }
}

#[test]
fn client_certificate_in_every_key_format() {
    let dir = tempfile::tempdir().unwrap();
    let ec = KeyPair::generate().unwrap();
    let rsa = KeyPair::from_pem(RSA_PKCS8).unwrap();
    let sec1 = KeyPair::from_pem(EC_PKCS8).unwrap();
    for (name, key, key_pem) in [
        ("pkcs8", &ec, ec.serialize_pem()),
        ("pkcs1", &rsa, RSA_PKCS1.to_owned()),
        ("sec1", &sec1, EC_SEC1.to_owned()),
    ] {
        let (cert, ca) = client_cert(key);
        // A chain of several certificates: the client's first, then its issuer.
        let cert_file = write(dir.path(), &format!("{name}.crt"), &format!("{cert}{ca}"));
        let key_file = write(dir.path(), &format!("{name}.key"), &key_pem);
        let config = tls_base(dir.path()).with_client_auth(&cert_file, &key_file);
        let tls = rustls_config(&config);
        assert!(tls.client_auth_cert_resolver.has_certs(), "{name}");

        // The same through the variables.
        let config = Config::from_lookup(env(&[
            ("MQTT_URL", "mqtts://broker.example"),
            (
                "MQTT_CA_FILE",
                &dir.path().join("roots.pem").display().to_string(),
            ),
            ("MQTT_CLIENT_CERT_FILE", &cert_file),
            ("MQTT_CLIENT_KEY_FILE", &key_file),
        ]))
        .unwrap();
        let auth = config
            .broker
            .tls
            .as_ref()
            .unwrap()
            .client_auth
            .clone()
            .unwrap();
        assert_eq!(auth, ClientAuth::new(&cert_file, &key_file));
        assert!(rustls_config(&config).client_auth_cert_resolver.has_certs());
    }
}

#[test]
fn client_certificate_errors_name_the_variable_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let (cert, _) = client_cert(&key);
    let cert_file = write(dir.path(), "client.crt", &cert);
    let key_file = write(dir.path(), "client.key", &key.serialize_pem());
    let other_key = write(
        dir.path(),
        "other.key",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let missing = dir.path().join("missing.pem").display().to_string();
    let der = dir.path().join("client.der");
    std::fs::write(&der, [0x30_u8, 0x82, 0x01, 0x00]).unwrap();
    let der = der.display().to_string();
    let encrypted = write(
        dir.path(),
        "encrypted.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );

    let error_of = |cert: &str, key: &str| {
        tls_base(dir.path())
            .with_client_auth(cert, key)
            .mqtt_options()
            .unwrap_err()
    };
    for (cert, key, var, text) in [
        (
            &missing,
            &key_file,
            "MQTT_CLIENT_CERT_FILE",
            "cannot be read",
        ),
        (
            &cert_file,
            &missing,
            "MQTT_CLIENT_KEY_FILE",
            "cannot be read",
        ),
        (&der, &key_file, "MQTT_CLIENT_CERT_FILE", "not PEM"),
        (&cert_file, &der, "MQTT_CLIENT_KEY_FILE", "not PEM"),
        (
            &key_file,
            &key_file,
            "MQTT_CLIENT_CERT_FILE",
            "no '-----BEGIN CERTIFICATE-----'",
        ),
        (
            &cert_file,
            &cert_file,
            "MQTT_CLIENT_KEY_FILE",
            "no private key found",
        ),
        (&cert_file, &encrypted, "MQTT_CLIENT_KEY_FILE", "encrypted"),
        (
            &cert_file,
            &other_key,
            "MQTT_CLIENT_KEY_FILE",
            "does not match",
        ),
    ] {
        let error = error_of(cert, key);
        let message = error.to_string();
        assert_eq!(error.var(), var, "{message}");
        assert!(message.contains(text), "{message}");
        let file = if var == "MQTT_CLIENT_CERT_FILE" {
            cert
        } else {
            key
        };
        assert!(message.contains(file.as_str()), "{message}");
        // A key's content never appears in an error.
        assert!(!message.contains("MIG"), "{message}");
    }
    let message = error_of(&cert_file, &other_key).to_string();
    assert!(
        message.contains(&cert_file),
        "the mismatch names both files: {message}"
    );

    // One without the other, in the environment.
    for (set, missing) in [
        ("MQTT_CLIENT_CERT_FILE", "MQTT_CLIENT_KEY_FILE"),
        ("MQTT_CLIENT_KEY_FILE", "MQTT_CLIENT_CERT_FILE"),
    ] {
        let error =
            Config::from_lookup(env(&[("MQTT_URL", "mqtts://h"), (set, "/x.pem")])).unwrap_err();
        assert!(matches!(error, ConfigError::Missing { .. }), "{error:?}");
        assert_eq!(error.var(), missing);
    }
}

#[test]
fn alpn_from_the_environment_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let roots = tls_base(dir.path());
    let ca_file = roots.broker.tls.as_ref().unwrap().ca_file.clone().unwrap();
    let config = Config::from_lookup(env(&[
        (
            "MQTT_URL",
            "mqtts://a1b2-ats.iot.eu-west-1.amazonaws.com:443",
        ),
        ("MQTT_CA_FILE", &ca_file.display().to_string()),
        ("MQTT_TLS_ALPN", " x-amzn-mqtt-ca , mqtt"),
    ]))
    .unwrap();
    assert_eq!(
        config.broker.tls.as_ref().unwrap().alpn,
        ["x-amzn-mqtt-ca", "mqtt"]
    );
    assert_eq!(
        rustls_config(&config).alpn_protocols,
        [b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()]
    );
    let config = roots.with_alpn(["x-amzn-mqtt-ca"]);
    assert_eq!(
        rustls_config(&config).alpn_protocols,
        [b"x-amzn-mqtt-ca".to_vec()]
    );

    for raw in ["a,,b", "a b", ","] {
        let error = Config::from_lookup(env(&[("MQTT_URL", "mqtts://h"), ("MQTT_TLS_ALPN", raw)]))
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_TLS_ALPN", "{raw}");
        assert_eq!(expected_of(&error), expect::ALPN, "{raw}");
    }
}

#[test]
fn tls_variables_on_a_plain_url_are_ignored() {
    let config = Config::from_lookup(env(&[
        ("MQTT_URL", "mqtt://h"),
        ("MQTT_CLIENT_CERT_FILE", "/nonexistent.crt"),
        ("MQTT_CLIENT_KEY_FILE", "/nonexistent.key"),
        ("MQTT_TLS_ALPN", "x"),
    ]))
    .unwrap();
    assert!(config.broker.tls.is_none());
    assert!(config.mqtt_options().is_ok());
    let config = config.with_client_auth("/a", "/b").with_alpn(["x"]);
    assert!(config.broker.tls.is_none());
}

#[test]
fn a_complete_rustls_config_is_used_as_it_is() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut custom = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    custom.alpn_protocols = vec![b"custom".to_vec()];
    let custom = Arc::new(custom);
    let config = Config::new("mqtts://h")
        .unwrap()
        .with_rustls_config(custom.clone());
    assert!(Arc::ptr_eq(&rustls_config(&config), &custom));
    assert!(format!("{config:?}").contains("given in code"));

    // Settings it would ignore are an error, not a surprise.
    let error = config
        .clone()
        .with_lookup(env(&[("MQTT_CA_FILE", "/etc/ca.pem")]))
        .unwrap_err();
    assert_eq!(error.var(), "MQTT_CA_FILE");
    assert_eq!(expected_of(&error), expect::CUSTOM_TLS);
    let error = config.with_alpn(["x"]).validate().unwrap_err();
    assert_eq!(error.var(), "MQTT_TLS_ALPN");
}

fn login(config: &Config) -> (String, String) {
    let options = config.mqtt_options().unwrap();
    let login = options.credentials().unwrap();
    (login.username, login.password)
}

fn pair(user: &str, password: &str) -> (String, String) {
    (user.to_owned(), password.to_owned())
}

#[test]
fn credentials_from_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "password", "from-file\n");

    let config = Config::from_lookup(env(&[
        ("MQTT_URL", "mqtts://broker"),
        ("MQTT_USERNAME", "svc"),
        ("MQTT_PASSWORD", " spaced secret "),
    ]))
    .unwrap();
    assert_eq!(login(&config), pair("svc", " spaced secret "));

    // A user in the URL, the password from a file.
    let config = Config::from_lookup(env(&[
        ("MQTT_URL", "mqtt://svc@broker"),
        ("MQTT_PASSWORD_FILE", &file),
    ]))
    .unwrap();
    assert!(matches!(
        config.password_source,
        Some(PasswordSource::File(_))
    ));
    assert_eq!(login(&config), pair("svc", "from-file"));

    // The environment replaces what code set.
    let config = Config::new("mqtt://code:code-pw@broker")
        .unwrap()
        .with_lookup(env(&[
            ("MQTT_USERNAME", "env"),
            ("MQTT_PASSWORD_FILE", &file),
        ]))
        .unwrap();
    assert_eq!(login(&config), pair("env", "from-file"));
    let config = Config::new("mqtt://broker")
        .unwrap()
        .with_credentials(Credentials::new("code", None))
        .with_password_fn(|| Ok(Password::new("from-fn")))
        .with_lookup(env(&[("MQTT_PASSWORD", "from-env")]))
        .unwrap();
    assert!(config.password_source.is_none());
    assert_eq!(login(&config), pair("code", "from-env"));
    let config = Config::new("mqtt://broker")
        .unwrap()
        .with_credentials(Credentials::new("code", None))
        .with_password_fn(|| Ok(Password::new("from-fn")))
        .with_lookup(env(&[("MQTT_URL", "mqtt://url:url-pw@broker")]))
        .unwrap();
    assert_eq!(login(&config), pair("url", "url-pw"));
}

#[test]
fn credentials_in_two_places_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "password", "hunter2");
    for (vars, var, other) in [
        (
            vec![("MQTT_URL", "mqtt://u@h"), ("MQTT_USERNAME", "v")],
            "MQTT_USERNAME",
            "MQTT_URL",
        ),
        (
            vec![
                ("MQTT_URL", "mqtt://u:hunter2@h"),
                ("MQTT_PASSWORD", "hunter2"),
            ],
            "MQTT_PASSWORD",
            "MQTT_URL",
        ),
        (
            vec![
                ("MQTT_URL", "mqtt://u:hunter2@h"),
                ("MQTT_PASSWORD_FILE", &file),
            ],
            "MQTT_PASSWORD_FILE",
            "MQTT_URL",
        ),
        (
            vec![
                ("MQTT_URL", "mqtt://h"),
                ("MQTT_USERNAME", "u"),
                ("MQTT_PASSWORD", "hunter2"),
                ("MQTT_PASSWORD_FILE", &file),
            ],
            "MQTT_PASSWORD",
            "MQTT_PASSWORD_FILE",
        ),
    ] {
        let error = Config::from_lookup(env(&vars)).unwrap_err();
        let ConfigError::Conflict {
            var: a,
            other_var: b,
            ..
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!((*a, *b), (var, other));
        let text = format!("{error} {error:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    // A password needs a user name.
    for vars in [
        vec![("MQTT_URL", "mqtt://h"), ("MQTT_PASSWORD", "hunter2")],
        vec![("MQTT_URL", "mqtt://h"), ("MQTT_PASSWORD_FILE", &file)],
    ] {
        let error = Config::from_lookup(env(&vars)).unwrap_err();
        assert_eq!(expected_of(&error), expect::USER_FOR_PASSWORD, "{error}");
        assert!(!error.to_string().contains("hunter2"));
    }
    let error = Config::new("mqtt://h")
        .unwrap()
        .with_password_fn(|| Ok(Password::new("x")))
        .validate()
        .unwrap_err();
    assert_eq!(expected_of(&error), expect::USER_FOR_PASSWORD);
}

#[test]
fn password_file_is_read_at_every_connect() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "password", "first\r\n");
    let config = Config::new("mqtt://svc@127.0.0.1:1")
        .unwrap()
        .with_password_file(&file);
    assert_eq!(login(&config), pair("svc", "first"));

    let (_client, mut eventloop) = rumqttc::AsyncClient::new(config.mqtt_options().unwrap(), 1);
    let mut attempts = config.connection_attempts();
    write(dir.path(), "password", "second\n\n");
    attempts
        .prepare(|user, password| {
            eventloop.mqtt_options.set_credentials(user, password);
        })
        .unwrap();
    let login = eventloop.mqtt_options.credentials().unwrap();
    assert_eq!(login.password, "second\n", "only one line break is dropped");

    for (content, reason) in [
        (None, "No such file"),
        (Some(""), "empty"),
        (Some("\n"), "empty"),
    ] {
        match content {
            None => std::fs::remove_file(&file).unwrap(),
            Some(text) => drop(write(dir.path(), "password", text)),
        }
        let message = attempts
            .prepare(|user, password| {
                eventloop.mqtt_options.set_credentials(user, password);
            })
            .unwrap_err();
        assert!(message.contains("MQTT_PASSWORD_FILE"), "{message}");
        assert!(message.contains(&file), "{message}");
        assert!(message.contains(reason), "{message}");
        assert!(
            message.contains("mqtt://127.0.0.1:1"),
            "names the broker: {message}"
        );
    }
    // The first read is part of the configuration: a missing file stops the start.
    let error = config.mqtt_options().unwrap_err();
    assert_eq!(error.var(), "MQTT_PASSWORD_FILE");
}

#[test]
fn password_fn_is_called_at_every_connect() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let config = Config::new("mqtt://device@127.0.0.1:1")
        .unwrap()
        .with_password_fn(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= 2 {
                return Err("the signing key is unavailable".into());
            }
            Ok(Password::new(format!("token-{n}")))
        });
    assert!(format!("{config:?}").contains("Fn(..)"));
    assert_eq!(login(&config), pair("device", "token-0"));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(config.mqtt_options().unwrap(), 1);
    let mut attempts = config.connection_attempts();
    attempts
        .prepare(|user, password| {
            eventloop.mqtt_options.set_credentials(user, password);
        })
        .unwrap_err(); // call 3 fails
    let message = attempts
        .prepare(|user, password| {
            eventloop.mqtt_options.set_credentials(user, password);
        })
        .unwrap_err();
    assert!(
        message.contains("the signing key is unavailable"),
        "{message}"
    );
    assert!(!message.contains("token-"), "{message}");
}

fn attempts() -> ConnectionAttempts {
    Config::new("mqtts://broker.example:8883")
        .unwrap()
        .connection_attempts()
}

/// The reason `attempts` gives for a failure of rumqttc's MQTT 3.1.1 client.
fn fail(attempts: &mut ConnectionAttempts, error: &ConnectionError) -> String {
    attempts.failed(error, FailureKind::of_v4(error))
}

fn tls_io(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[test]
fn tls_failures_carry_the_rustls_reason_and_the_broker() {
    let cases = [
        (
            // How rumqttc reports a handshake that rejected the broker's certificate.
            ConnectionError::Tls(rumqttc::TlsError::Io(tls_io(
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            ))),
            "UnknownIssuer",
            "MQTT_CA_FILE",
        ),
        (
            ConnectionError::Tls(rumqttc::TlsError::Io(tls_io(
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            ))),
            "NotValidForName",
            "host name",
        ),
        (
            // A client certificate refused after the handshake, on the first read.
            ConnectionError::Io(tls_io(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired,
            ))),
            "CertificateRequired",
            "MQTT_CLIENT_CERT_FILE",
        ),
        (
            ConnectionError::Io(tls_io(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA,
            ))),
            "UnknownCA",
            "refused the client certificate",
        ),
        (
            ConnectionError::Io(tls_io(rustls::Error::AlertReceived(
                AlertDescription::NoApplicationProtocol,
            ))),
            "NoApplicationProtocol",
            "MQTT_TLS_ALPN",
        ),
    ];
    for (error, reason, hint) in cases {
        let message = fail(&mut attempts(), &error);
        assert!(
            message.starts_with("TLS with mqtts://broker.example:8883 failed: "),
            "{message}"
        );
        assert!(message.contains(reason), "{message}");
        assert!(message.contains(hint), "{message}");
    }
    // Anything else keeps rumqttc's words.
    let refused = ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(fail(&mut attempts(), &refused), refused.to_string());
}

#[test]
fn lasting_failures_are_logged_at_error_once_until_they_change() {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let unknown_ca = || {
        ConnectionError::Tls(rumqttc::TlsError::Io(tls_io(
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        )))
    };
    let refused = || ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
    tracing::subscriber::with_default(subscriber, || {
        let mut attempts = attempts();
        fail(&mut attempts, &unknown_ca());
        fail(&mut attempts, &unknown_ca());
        fail(&mut attempts, &refused()); // not at ERROR: a retry may fix it
        fail(&mut attempts, &unknown_ca()); // changed
        attempts.connected();
        fail(&mut attempts, &unknown_ca()); // news again after a connection
    });
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 3, "{text}");
    assert!(errors
        .iter()
        .all(|l| l.contains("broker=mqtts://broker.example:8883") && l.contains("UnknownIssuer")));
}
