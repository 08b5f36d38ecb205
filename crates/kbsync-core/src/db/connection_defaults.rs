//! libpq's defaults for what a connection string leaves out — the `PG*` environment
//! variables, the password file and the local socket — so that kbsync connects wherever
//! psql does with the same settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokio_postgres::config::{Config, Host};

/// The variables that, set without any URL, mean "connect as libpq would".
pub const LIBPQ_VARIABLES: &[&str] = &["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"];

/// Where libpq looks for the server's socket when no host is given: Debian's and
/// PostgreSQL's own default socket directories.
const DEFAULT_SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/tmp"];

/// The environment that defaults are read from: the process's, or a test's own.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
    /// The operating system's name for the user running this process.
    login: Option<String>,
}

impl Environment {
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
            home: std::env::var_os("HOME").map(PathBuf::from),
            // As libpq and tokio-postgres do. None when the system has no name for us: not
            // hidden, `apply` then refuses with "no user name" unless PGUSER or the URL says.
            login: whoami::username().ok(),
        }
    }

    /// An environment of exactly these variables, `login` the user's name (for tests).
    pub fn of(vars: &[(&str, &str)], home: Option<&Path>, login: Option<&str>) -> Self {
        Self {
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            home: home.map(Path::to_owned),
            login: login.map(str::to_owned),
        }
    }

    /// The home directory (libpq's files live under it).
    pub fn home(&self) -> Option<&Path> {
        self.home.as_deref()
    }

    /// A variable's value; an empty one counts as unset, as for libpq.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Any libpq connection variable is set.
    pub fn has_libpq_variables(&self) -> bool {
        LIBPQ_VARIABLES.iter().any(|v| self.var(v).is_some())
    }
}

/// `url` (a URL or a `key=value` string) with `PGPORT` on a URL host that names no
/// port: tokio-postgres would give such a host 5432, libpq gives it `PGPORT`. Parse the
/// result, then `apply` the rest of the environment.
pub fn with_port_from_environment(url: &str, env: &Environment) -> Result<String, String> {
    let Some(port) = env.var("PGPORT") else {
        return Ok(url.to_owned());
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("PGPORT={port:?} is not a port number"))?;
    match url::Url::parse(url) {
        Ok(mut parsed)
            if matches!(parsed.scheme(), "postgres" | "postgresql")
                && parsed.host_str().is_some_and(|h| !h.is_empty())
                && parsed.port().is_none() =>
        {
            parsed
                .set_port(Some(port))
                .map_err(|()| "cannot apply PGPORT to this URL's host".to_owned())?;
            Ok(parsed.to_string())
        }
        _ => Ok(url.to_owned()),
    }
}

/// Fill in what `config` leaves out as libpq does: host (`PGHOST`, else the local
/// socket), port (`PGPORT`), user (`PGUSER`, else the login name), database
/// (`PGDATABASE`), password (`PGPASSWORD`, else the password file `PGPASSFILE` or
/// `~/.pgpass`). What the URL says always wins. Returns warnings to log (a password file
/// libpq too would ignore).
pub fn apply(config: &mut Config, env: &Environment) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    if config.get_ports().is_empty()
        && let Some(port) = env.var("PGPORT")
    {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("PGPORT={port:?} is not a port number"))?;
        config.port(port);
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    if config.get_hosts().is_empty() {
        match env.var("PGHOST") {
            Some(hosts) => {
                for host in hosts.split(',') {
                    config.host(host.trim());
                }
            }
            None => {
                let socket_dir = DEFAULT_SOCKET_DIRS
                    .iter()
                    .find(|dir| Path::new(dir).join(format!(".s.PGSQL.{port}")).exists())
                    .unwrap_or(&DEFAULT_SOCKET_DIRS[0]);
                config.host_path(socket_dir);
            }
        }
    }
    if config.get_user().is_none() {
        let user = env.var("PGUSER").or(env.login.as_deref()).ok_or(
            "no user name: put it in the URL (postgres://USER@host/db) or set PGUSER".to_owned(),
        )?;
        config.user(user);
    }
    if config.get_dbname().is_none()
        && let Some(db) = env.var("PGDATABASE")
    {
        config.dbname(db);
    }
    if config.get_password().is_none() {
        if let Some(password) = env.var("PGPASSWORD") {
            config.password(password);
        } else if let Some(file) = env
            .var("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env.home.as_ref().map(|h| h.join(".pgpass")))
        {
            let (found, warning) = password_from_file(&file, config, port);
            warnings.extend(warning);
            if let Some(password) = found {
                config.password(password);
            }
        }
    }
    Ok(warnings)
}

/// The password the password file gives this connection, and a warning when the file
/// is there but unusable.
fn password_from_file(file: &Path, config: &Config, port: u16) -> (Option<String>, Option<String>) {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, None),
        Err(e) => {
            return (
                None,
                Some(format!(
                    "password file {} is not readable: {e}",
                    file.display()
                )),
            );
        }
    };
    if let Some(problem) = too_open(file) {
        return (None, Some(problem));
    }
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(dir)) if DEFAULT_SOCKET_DIRS.iter().any(|d| Path::new(d) == dir) => {
            "localhost".to_owned()
        }
        Some(Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_owned(),
    };
    // `apply` has set the user before it looks for a password (it refuses without one).
    let user = config.get_user().unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or(user);
    let wanted = [host.as_str(), &port.to_string(), dbname, user];
    (find_password(&text, &wanted), None)
}

/// libpq ignores a password file that its group or others may read.
#[cfg(unix)]
fn too_open(file: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(file) {
        Ok(metadata) => metadata.permissions().mode(),
        Err(e) => {
            return Some(format!(
                "password file {} is ignored: its permissions cannot be read: {e}",
                file.display()
            ));
        }
    };
    (mode & 0o077 != 0).then(|| {
        format!(
            "password file {} is ignored: it has group or world access; chmod 0600 it (libpq ignores it too)",
            file.display()
        )
    })
}

#[cfg(not(unix))]
fn too_open(_: &Path) -> Option<String> {
    None
}

/// The first line `host:port:database:user:password` whose first four fields match
/// (`*` matches anything; `\:` and `\\` escape).
fn find_password(text: &str, wanted: &[&str; 4]) -> Option<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_fields(line);
            if fields.len() < 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want);
            // Colons in the password field need not be escaped.
            matches.then(|| fields[4..].join(":"))
        })
}

fn split_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// `user@host:port/database`, for messages: where a connection went, never a password.
pub fn describe_target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(dir)) => dir.display().to_string(),
        None => "?".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(url: &str, env: &Environment) -> Result<(Config, Vec<String>), String> {
        let url = with_port_from_environment(url, env)?;
        let mut config: Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| e.to_string())?;
        let warnings = apply(&mut config, env)?;
        Ok((config, warnings))
    }

    fn resolved(url: &str, env: &Environment) -> Result<Config, String> {
        resolve(url, env).map(|(config, _)| config)
    }

    #[test]
    fn the_url_wins_and_the_environment_fills_the_rest() {
        let env = Environment::of(
            &[
                ("PGHOST", "db.internal"),
                ("PGPORT", "6543"),
                ("PGUSER", "envuser"),
                ("PGDATABASE", "envdb"),
                ("PGPASSWORD", "envpw"),
            ],
            None,
            None,
        );
        let config = resolved("postgres://app@db.example.com/shop", &env).expect("resolves");
        assert_eq!(describe_target(&config), "app@db.example.com:6543/shop");
        assert_eq!(config.get_password(), Some(&b"envpw"[..]));
        let config = resolved("postgres://app@db.example.com:7000/shop", &env).expect("resolves");
        assert_eq!(describe_target(&config), "app@db.example.com:7000/shop");

        let bare = resolved("postgresql://", &env).expect("resolves");
        assert_eq!(describe_target(&bare), "envuser@db.internal:6543/envdb");
    }

    #[test]
    fn no_host_means_the_local_socket_and_the_login_name() {
        let env = Environment::of(&[], None, Some("alice"));
        let config = resolved("postgres:///shop", &env).expect("resolves");
        assert!(matches!(config.get_hosts().first(), Some(Host::Unix(_))));
        assert_eq!(config.get_user(), Some("alice"));
        assert!(resolved("postgres:///shop", &Environment::default()).is_err());
        let bad_port = Environment::of(&[("PGPORT", "x")], None, Some("a"));
        let err = resolved("postgres:///shop", &bad_port).expect_err("bad port");
        assert!(err.contains("PGPORT"), "{err}");
    }

    #[test]
    fn the_password_file_matches_like_libpq() {
        let text = "# comment\n\
                    other:5432:*:app:wrong\n\
                    db\\:1:5432:shop:app:escaped\n\
                    *:5432:shop:app:pa:ss\n";
        assert_eq!(
            find_password(text, &["db.example.com", "5432", "shop", "app"]).as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            find_password(text, &["db:1", "5432", "shop", "app"]).as_deref(),
            Some("escaped")
        );
        assert_eq!(find_password(text, &["x", "5433", "shop", "app"]), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_password_file_others_can_read_is_ignored_with_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "*:*:*:*:secret\n").expect("write");
        let path = file.to_str().expect("utf-8 path");
        let env = Environment::of(&[("PGPASSFILE", path)], None, None);

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let (config, warnings) = resolve("postgres://app@db/shop", &env).expect("resolves");
        assert_eq!(config.get_password(), None);
        assert!(warnings[0].contains("chmod 0600"), "{warnings:?}");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (config, warnings) = resolve("postgres://app@db/shop", &env).expect("resolves");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.get_password(), Some(&b"secret"[..]));
    }
}
