//! TLS for every connection kbsync makes, with libpq's meaning of `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` (in the URL, or `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGSSLCERT`, `PGSSLKEY`), on rustls: tokio-postgres negotiates TLS, this module decides
//! what a server's certificate must prove.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::db::connection_defaults::Environment;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries a plain connection first; kbsync (through tokio-postgres) tries TLS
    /// first, as `prefer`: the same servers are reached, over TLS where they offer it.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// Whose certificates a server's must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// The CA certificates in this PEM file.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// What TLS a connection uses and what the server must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_certs: Option<RootCerts>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The URL parameters this module owns (tokio-postgres knows only three sslmodes).
const TLS_PARAMETERS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Take the TLS parameters out of `url` (a URL or a `key=value` string); what it does
/// not say comes from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, then from
/// libpq's files (`~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`). Returns
/// the URL without them.
pub fn take_from_url(url: &str, env: &Environment) -> Result<(String, TlsSettings), String> {
    let (rest, mut found) = split_parameters(url)?;
    let mut get = |name: &str, variable: &str| {
        found
            .iter()
            .position(|(k, _)| k == name)
            .map(|i| found.swap_remove(i).1)
            .or_else(|| env.var(variable).map(str::to_owned))
    };
    let mode_given = get("sslmode", "PGSSLMODE");
    let root = get("sslrootcert", "PGSSLROOTCERT");
    let cert = get("sslcert", "PGSSLCERT");
    let key = get("sslkey", "PGSSLKEY");
    let libpq_file = |name: &str| {
        env.home()
            .map(|home| home.join(".postgresql").join(name))
            .filter(|path| path.exists())
    };
    let root_certs = match root.as_deref() {
        Some("system") => Some(RootCerts::System),
        Some(path) => Some(RootCerts::File(PathBuf::from(path))),
        None => libpq_file("root.crt").map(RootCerts::File),
    };
    let mode = match (mode_given.as_deref(), &root_certs) {
        (Some(mode), _) => mode.parse()?,
        // libpq: sslrootcert=system without an sslmode means verify-full.
        (None, Some(RootCerts::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
    };
    if root_certs == Some(RootCerts::System) && mode != SslMode::VerifyFull {
        return Err(
            "sslrootcert=system needs sslmode=verify-full (as libpq: the system's roots vouch for any host name they signed)"
                .to_owned(),
        );
    }
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_certs.is_none() {
        return Err(format!(
            "sslmode={} needs the CA that signed the server's certificate: set sslrootcert to its PEM file (or sslrootcert=system for the platform's roots), or put it at ~/.postgresql/root.crt",
            if mode == SslMode::VerifyCa {
                "verify-ca"
            } else {
                "verify-full"
            }
        ));
    }
    let client_cert = cert
        .map(PathBuf::from)
        .or_else(|| libpq_file("postgresql.crt"));
    let client_key = key.map(PathBuf::from).or_else(|| {
        client_cert
            .as_ref()
            .and_then(|_| libpq_file("postgresql.key"))
    });
    if client_cert.is_some() != client_key.is_some() {
        return Err(
            "sslcert and sslkey go together: a client certificate needs its key".to_owned(),
        );
    }
    Ok((
        rest,
        TlsSettings {
            mode,
            root_certs,
            client_cert,
            client_key,
        },
    ))
}

/// `url` without the TLS parameters, and those parameters.
fn split_parameters(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if is_url {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), Vec::new()));
        };
        let mut kept = Vec::new();
        let mut found = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_PARAMETERS.contains(&key) {
                let value = percent_decode(value)?;
                found.push((key.to_owned(), value));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    // key=value words (values with spaces in quotes are not used for these four).
    let mut kept = Vec::new();
    let mut found = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some((key, value)) if TLS_PARAMETERS.contains(&key) => {
                found.push((key.to_owned(), value.trim_matches('\'').to_owned()));
            }
            _ => kept.push(word),
        }
    }
    Ok((kept.join(" "), found))
}

fn percent_decode(value: &str) -> Result<String, String> {
    url::form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| format!("cannot decode the URL parameter value {value:?}"))
}

impl TlsSettings {
    /// What tokio-postgres negotiates: it asks for TLS, this module verifies.
    pub fn postgres_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Allow | SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The rustls client configuration for this mode: with `verify-full` the chain and
    /// the host name are checked, with `verify-ca` the chain, and with `prefer` and
    /// `require` the chain only when root certificates are given (libpq does the same
    /// with a root.crt), else nothing (encryption without authentication).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.root_certs, self.mode) {
            (Some(roots), SslMode::VerifyFull) => web_pki(roots, &provider)?,
            (Some(roots), _) => Arc::new(ChainOnly(web_pki(roots, &provider)?)),
            (None, _) => Arc::new(Unverified(provider.clone())),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert, "sslcert")?, read_key(key)?)
                .map_err(|e| format!("sslcert {} / sslkey {}: {e}", cert.display(), key.display())),
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    /// The tokio-postgres connector for this mode.
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.client_config()?,
        ))
    }
}

fn web_pki(
    roots: &RootCerts,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!(
                    "sslrootcert=system: no trusted root certificates found on this system ({:?}); install the ca-certificates package or name a PEM file",
                    found.errors
                ));
            }
            store.add_parsable_certificates(found.certs);
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| format!("TLS verifier: {e}"))
}

fn read_certs(path: &Path, parameter: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{parameter} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{parameter} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{parameter} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    // The key's bytes never reach a message: only its path does.
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("sslkey {}: {e}", path.display()))
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require` without root certificates: encrypted, the server's certificate
/// taken as it is (libpq does the same); the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str, vars: &[(&str, &str)]) -> Result<(String, TlsSettings), String> {
        take_from_url(url, &Environment::of(vars, None, Some("u")))
    }

    #[test]
    fn the_url_parameters_and_the_variables_say_what_tls_is_used() {
        let (rest, tls) = taken(
            "postgres://app@db:5432/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            &[],
        )
        .expect("parses");
        assert_eq!(rest, "postgres://app@db:5432/shop?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_certs, Some(RootCerts::File("/etc/ca.pem".into())));

        let (rest, tls) = taken(
            "postgres://app@db/shop",
            &[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", "/ca.pem")],
        )
        .expect("parses");
        assert_eq!(rest, "postgres://app@db/shop");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        // The URL wins over the variable.
        let (_, tls) = taken(
            "postgres://db/shop?sslmode=disable",
            &[("PGSSLMODE", "require")],
        )
        .expect("parses");
        assert_eq!(tls.mode, SslMode::Disable);
        // libpq's default.
        assert_eq!(
            taken("postgres://db/shop", &[]).expect("parses").1.mode,
            SslMode::Prefer
        );
        // key=value strings too.
        let (rest, tls) = taken("host=db dbname=shop sslmode=require", &[]).expect("parses");
        assert_eq!(rest, "host=db dbname=shop");
        assert_eq!(tls.mode, SslMode::Require);
    }

    #[test]
    fn what_cannot_verify_is_refused_with_what_to_set() {
        let err = taken("postgres://db/shop?sslmode=verify-full", &[]).expect_err("no CA");
        assert!(err.contains("sslrootcert"), "{err}");
        let err = taken("postgres://db/shop?sslmode=verify-everything", &[]).expect_err("bad mode");
        assert!(err.contains("verify-full"), "{err}");
        let err = taken("postgres://db/shop?sslrootcert=system&sslmode=require", &[])
            .expect_err("system roots need verify-full");
        assert!(err.contains("verify-full"), "{err}");
        let (_, tls) = taken("postgres://db/shop?sslrootcert=system", &[]).expect("parses");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        let err =
            taken("postgres://db/shop?sslcert=/c.pem", &[]).expect_err("a cert without its key");
        assert!(err.contains("sslkey"), "{err}");
    }
}
