//! TLS to Redis: the certificates of `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE` and
//! `REDIS_TLS_KEY_FILE`, checked at start, for every Redis connection (commands, pub/sub,
//! Sentinels). The redis crate speaks TLS through rustls; without a CA file it trusts the
//! system's roots.

use std::path::Path;

use redis::{ClientTlsConfig, TlsCertificates};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::BrokerConfig;

/// Reads and checks the TLS files; `None` when none is set. Errors name the setting.
pub fn certificates(config: &BrokerConfig) -> Result<Option<TlsCertificates>, String> {
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))
    };
    let root_cert = match &config.redis_tls_ca_file {
        Some(path) => {
            let pem = read("REDIS_TLS_CA_FILE", path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("REDIS_TLS_CA_FILE: {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "REDIS_TLS_CA_FILE: {} holds no PEM certificate",
                    path.display()
                ));
            }
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    format!(
                        "REDIS_TLS_CA_FILE: {}: not a CA certificate: {e}",
                        path.display()
                    )
                })?;
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&config.redis_tls_cert_file, &config.redis_tls_key_file) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(
                "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together (a client certificate \
                 and its key)"
                    .into(),
            );
        }
        (Some(cert_path), Some(key_path)) => {
            let client_cert = read("REDIS_TLS_CERT_FILE", cert_path)?;
            let client_key = read("REDIS_TLS_KEY_FILE", key_path)?;
            check_client_pair(&client_cert, cert_path, &client_key, key_path)?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The certificate chain parses, the key parses, and the key belongs to the certificate.
fn check_client_pair(
    cert: &[u8],
    cert_path: &Path,
    key: &[u8],
    key_path: &Path,
) -> Result<(), String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("REDIS_TLS_CERT_FILE: {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "REDIS_TLS_CERT_FILE: {} holds no PEM certificate",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        format!(
            "REDIS_TLS_KEY_FILE: {}: no private key: {e}",
            key_path.display()
        )
    })?;
    install_crypto();
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "REDIS_TLS_KEY_FILE: {} does not fit the certificate in REDIS_TLS_CERT_FILE \
                 ({}): {e}",
                key_path.display(),
                cert_path.display()
            )
        })
}

/// Makes ring rustls' crypto provider for the process (the redis crate picks none).
pub(crate) fn install_crypto() {
    // An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A broker error with TLS failures explained (see [`explain`]).
pub(crate) fn explained(error: crate::BrokerError) -> crate::BrokerError {
    match &error {
        crate::BrokerError::Redis(e) => match explain(e) {
            Some(message) => crate::BrokerError::Tls(message),
            None => error,
        },
        _ => error,
    }
}

/// Turns a TLS failure into a message that says which setting to look at.
pub(crate) fn explain(error: &redis::RedisError) -> Option<String> {
    let text = error.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        "the Redis server's certificate is signed by a CA eventgate does not trust: set \
         REDIS_TLS_CA_FILE to that CA's certificate (PEM)"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the Redis server's certificate is not for the host name eventgate connects to: use a \
         name (or IP) the certificate lists"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "the Redis server requires a client certificate: set REDIS_TLS_CERT_FILE and \
         REDIS_TLS_KEY_FILE"
    } else if text.contains("invalid peer certificate") || text.contains("InvalidCertificate") {
        "the Redis server's certificate was refused (expired, or not for a server)"
    } else if text.contains("CorruptMessage") || text.contains("InvalidContentType") {
        "the Redis server does not speak TLS on that port (rediss:// needs its tls-port)"
    } else {
        return None;
    };
    Some(format!("{hint} ({text})"))
}
