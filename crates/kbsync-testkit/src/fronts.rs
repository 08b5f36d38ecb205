//! TLS-terminating fronts for the test PostgreSQL, whose PyPI build has no OpenSSL: a
//! test CA and its certificates (made per test), PgBouncer (Debian's `pgbouncer`, which
//! speaks TLS to clients) in session or transaction mode, and a small front of our own
//! that answers PostgreSQL's SSLRequest and carries any connection — replication ones
//! included, which PgBouncer cannot — over TLS to the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::repo::repo_root;

/// A directory the test's PostgreSQL user can read (PgBouncer runs as that user when
/// the tests run as root), removed when dropped.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(kind: &str) -> Self {
        let dir = repo_root()
            .join(".kbsync/test-fronts")
            .join(format!("{kind}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a directory for the front");
        Self(dir)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A certificate authority made for one test, and a server certificate it signed.
pub struct TestCa {
    dir: SharedDir,
}

impl TestCa {
    /// A CA named `name`, and a certificate it signed for the server names `hosts`.
    pub fn new(name: &str, hosts: &[&str]) -> Self {
        let dir = SharedDir::new("ca");
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, name.to_owned());
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("a server key");
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let server_params = CertificateParams::new(names).expect("server params");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("the server certificate");
        for (file, text) in [
            ("ca.crt", ca_cert.pem()),
            ("server.crt", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
        ] {
            std::fs::write(dir.0.join(file), text).expect("writing a certificate");
        }
        Self { dir }
    }

    /// The CA's certificate (what `sslrootcert` names).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.0.join("ca.crt")
    }

    fn server_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.0.join("server.crt"), self.dir.0.join("server.key"))
    }

    /// rustls's server configuration with this CA's server certificate.
    fn server_config(&self) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = self.server_files();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .expect("the server certificate file")
            .collect::<Result<_, _>>()
            .expect("the server certificate");
        let key = PrivateKeyDer::from_pem_file(&key).expect("the server key");
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the server's TLS configuration")
    }
}

/// How PgBouncer hands server connections to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

/// PgBouncer with TLS required of clients and SCRAM passwords, in front of the test
/// server at `upstream`; stopped when dropped.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: SharedDir,
}

/// Debian's PgBouncer; a test that lacks it fails with the command that installs it.
fn pgbouncer_binary() -> PathBuf {
    for candidate in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "pgbouncer is not installed: these tests run it as the TLS front of the test server. Install it with `apt-get install pgbouncer` (`just test` does as root)"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PgBouncer {
    /// `users`: (role, password) pairs PgBouncer accepts, each passed on to the server
    /// as that role (the test server trusts local connections).
    pub fn start(upstream_port: u16, ca: &TestCa, mode: PoolMode, users: &[(&str, &str)]) -> Self {
        let binary = pgbouncer_binary();
        let dir = SharedDir::new("pgbouncer");
        let port = free_port();
        let (cert, key) = ca.server_files();
        let userlist: String = users
            .iter()
            .map(|(user, password)| format!("\"{user}\" \"{password}\"\n"))
            .collect();
        std::fs::write(dir.0.join("userlist.txt"), userlist).expect("userlist.txt");
        let pool_mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]
* = host=127.0.0.1 port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {dir}/userlist.txt
pool_mode = {pool_mode}
max_client_conn = 200
default_pool_size = 40
ignore_startup_parameters = extra_float_digits,options
client_tls_sslmode = require
client_tls_cert_file = {cert}
client_tls_key_file = {key}
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
",
            dir = dir.0.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let ini_path = dir.0.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).expect("pgbouncer.ini");
        // PgBouncer refuses to run as root: as root, run it as the test server's user.
        let mut command = if is_root() {
            let owner = std::env::var("KBSYNC_PG_USER").unwrap_or_else(|_| "kbsyncpg".into());
            for file in [&dir.0, &ca.dir.0] {
                let status = Command::new("chown")
                    .args(["-R", &owner])
                    .arg(file)
                    .status()
                    .expect("chown");
                assert!(status.success(), "chown {}", file.display());
            }
            let mut c = Command::new("runuser");
            c.args(["-u", &owner, "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        let child = command
            .arg(&ini_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting pgbouncer");
        wait_for_port(port, || {
            std::fs::read_to_string(dir.0.join("pgbouncer.log")).unwrap_or_default()
        });
        Self { child, port, dir }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // As root the child is `runuser`, and killing it leaves PgBouncer running (one
        // left behind by every test that used one): stop PgBouncer itself, by its pid.
        let pidfile = self.dir.0.join("pgbouncer.pid");
        match std::fs::read_to_string(&pidfile) {
            Ok(pid) => match Command::new("kill").arg(pid.trim()).status() {
                Ok(status) if status.success() => {}
                Ok(status) => eprintln!("warning: kill {} of pgbouncer: {status}", pid.trim()),
                Err(e) => eprintln!("warning: could not run kill for pgbouncer: {e}"),
            },
            Err(e) => eprintln!(
                "warning: {}: {e}; pgbouncer may still run",
                pidfile.display()
            ),
        }
        if let Err(e) = self.child.kill() {
            eprintln!("warning: could not stop pgbouncer: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("warning: pgbouncer did not exit: {e}");
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn wait_for_port(port: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the front did not listen on port {port} within 30 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PostgreSQL's SSLRequest code.
const SSL_REQUEST: i32 = 80_877_103;

/// Our own TLS front: each client's SSLRequest is answered `S`, the TLS handshake done
/// with the test CA's certificate, and the decrypted bytes carried to the server as they
/// are, so any connection (replication ones too) reaches it over TLS. A client that does
/// not ask for TLS is refused, as a server with `hostssl` only refuses it. Stops with
/// the test's runtime.
pub struct TlsFront {
    pub port: u16,
}

impl TlsFront {
    pub async fn start(upstream_port: u16, ca: &TestCa) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the TLS front");
        let port = listener.local_addr().expect("its address").port();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(e) = carry(client, acceptor, upstream_port).await {
                        eprintln!("TLS front: a connection ended: {e}");
                    }
                });
            }
        });
        Self { port }
    }
}

async fn carry(
    mut client: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream_port: u16,
) -> std::io::Result<()> {
    let mut request = [0u8; 8];
    client.read_exact(&mut request).await?;
    let code = i32::from_be_bytes([request[4], request[5], request[6], request[7]]);
    if code != SSL_REQUEST {
        // A plain startup: refuse it with an error message, as `hostssl` would.
        let text = b"SFATAL\0C28000\0Mno pg_hba.conf entry: the test TLS front accepts only TLS (no encryption)\0\0";
        let mut message = vec![b'E'];
        message.extend_from_slice(&((text.len() + 4) as i32).to_be_bytes());
        message.extend_from_slice(text);
        return client.write_all(&message).await;
    }
    client.write_all(b"S").await?;
    let mut tls = acceptor.accept(client).await?;
    let mut server = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], upstream_port))).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}
