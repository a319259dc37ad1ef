//! Certificates for TLS tests, made with the `openssl` command: a CA, a Redis server
//! certificate for 127.0.0.1, a client certificate, and the wrong things (another CA, a key that
//! fits no certificate).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A directory of PEM files; removed when dropped.
pub struct Certs {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A P-256 key and a self-signed CA certificate `name.crt`.
fn ca(dir: &Path, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &format!("/CN=eventgate test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A key and a certificate `name.crt` signed by `ca`, with `extensions` (an OpenSSL
/// extension section's lines).
fn leaf(dir: &Path, ca: &str, name: &str, extensions: &str) {
    let (key, csr, crt, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&ext), extensions).expect("extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

impl Certs {
    /// `ca`, `server` (IP 127.0.0.1, no DNS name), `client`, `other-ca`, and `stray.key`.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        ca(path, "ca");
        ca(path, "other-ca");
        leaf(
            path,
            "ca",
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        leaf(path, "ca", "client", "extendedKeyUsage=clientAuth\n");
        openssl(
            path,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "stray.key",
            ],
        );
        Self { dir }
    }

    /// The file `name` (`ca.crt`, `client.key`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The file `name` as a string, for environment variables.
    pub fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// What a test's own Redis connections present: the CA and the client certificate.
    pub fn client_certificates(&self) -> redis::TlsCertificates {
        let read = |name: &str| std::fs::read(self.path(name)).expect("PEM");
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read("client.crt"),
                client_key: read("client.key"),
            }),
            root_cert: Some(read("ca.crt")),
        }
    }
}
