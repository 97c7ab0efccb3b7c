//! The tests' one private PostgreSQL launcher: a cluster of a test's own
//! (initdb in a temporary directory, on a free port), for a test that must
//! restart, stop or otherwise break its server.
//!
//! deploy/services.sh serves the shared servers: the one of
//! `DATABASE_URL` (a local server or its cluster in `.local/pg`) and the
//! logical-decoding cluster in `.local/pg-logical` (`CDC_DATABASE_URL`).
//! Every test gets a database of its own on them ([`crate::TestDb`]) and
//! they run in parallel, including other checkouts' runs, so no test may
//! restart or stop them. A test that needs to is given a `PrivatePg`
//! instead, at the cost of an initdb (about 2 s). Like services.sh, it
//! runs the server's tools as `postgres` when the tests run as root.

use std::path::PathBuf;
use std::process::Stdio;

use uuid::Uuid;

use crate::{free_port, Error, Result};

/// A private PostgreSQL cluster, stopped and removed on drop.
pub struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the server's tools as `postgres` (initdb refuses root).
    as_postgres: bool,
    running: bool,
}

impl PrivatePg {
    /// initdb + start on a free port with fast, unsafe settings (no fsync);
    /// an error says why it cannot be done here (no PostgreSQL binaries, no
    /// `postgres` user to run them as).
    pub fn start() -> Result<PrivatePg> {
        PrivatePg::start_with("")
    }

    /// [`PrivatePg::start`] with `settings` (lines of `postgresql.conf`,
    /// e.g. `wal_level = logical`) added to the test settings.
    pub fn start_with(settings: &str) -> Result<PrivatePg> {
        let bin = bin_dir().ok_or_else(|| {
            Error::Unavailable("no initdb found (pg_config, /usr/lib/postgresql)".into())
        })?;
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let dir = std::env::temp_dir().join(format!(
            "outbox-test-pg-{}",
            &Uuid::new_v4().simple().to_string()[..10]
        ));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut pg = PrivatePg {
            dir,
            bin,
            port: free_port(),
            as_postgres: root,
            running: false,
        };
        if root {
            let owned = std::process::Command::new("chown")
                .arg("postgres")
                .arg(&pg.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !owned {
                return Err(Error::Unavailable(
                    "running as root and cannot chown the data dir to postgres".into(),
                ));
            }
        }
        let data = pg.data();
        let init = ["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8"];
        pg.run("initdb", &[&init[..], &["--no-sync"]].concat())?;
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n\
             {settings}\n",
            pg.port,
            pg.dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(pg.dir.join("data/postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| Error::io("postgresql.conf", e))?;
        pg.run("pg_ctl", &["-D", &data, "-l", &pg.log(), "-w", "start"])?;
        pg.running = true;
        Ok(pg)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection ends at once.
    pub fn restart(&mut self) -> Result<()> {
        let (data, log) = (self.data(), self.log());
        let args = ["-D", &data, "-l", &log, "-m", "fast", "-w", "restart"];
        self.run("pg_ctl", &args)?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: the server goes away as if it crashed
    /// (the data directory stays, for [`PrivatePg::restart`]).
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .map_err(|e| Error::io(tool, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::Failed(format!(
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// The server's log file.
    pub fn log(&self) -> String {
        self.dir.join("server.log").to_string_lossy().into_owned()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server binaries: `pg_config --bindir` if it has initdb, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Option<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}
