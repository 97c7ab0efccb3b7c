//! A tansu broker of a test's own, in memory, on a free port: tests that
//! stop, freeze or restart the broker must not touch the one other tests
//! share (`KAFKA_BROKERS`). tansu is what `deploy/services.sh` installs;
//! `TANSU` names another binary.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, Error, Result};

/// How long tansu may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A private in-memory tansu, killed on drop. Its data goes with it: a
/// restart comes back empty, as a broker that lost its disk would.
pub struct PrivateBroker {
    /// The port it listens on.
    port: u16,
    /// The port it tells clients to connect to.
    advertised: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts it on a free port and waits until it accepts connections.
    /// Blocks: call it inside `block_in_place` on a multi-threaded runtime.
    pub fn start() -> Result<PrivateBroker> {
        let port = free_port();
        PrivateBroker::start_behind(port, port)
    }

    /// Starts it on `port`, advertising `advertised` to clients: the port
    /// of a proxy or router in front of it, so that every connection of
    /// every client goes through that (librdkafka connects to the
    /// advertised address from the metadata). Blocks like
    /// [`PrivateBroker::start`].
    pub fn start_behind(port: u16, advertised: u16) -> Result<PrivateBroker> {
        let mut b = PrivateBroker {
            port,
            advertised,
            child: None,
        };
        b.restart()?;
        Ok(b)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What clients use as `bootstrap.servers`: the advertised address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// The broker's process id while it runs (to freeze it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts it (again, empty) on its port and waits until it accepts
    /// connections.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = Some(spawn_tansu(self.port, self.advertised)?);
        Ok(())
    }

    /// Kills it (its data is lost); [`PrivateBroker::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tansu binary: `TANSU`, else `~/.cargo/bin/tansu` (where
/// `deploy/services.sh` installs it), else `tansu` on the `PATH`.
pub fn tansu_binary() -> String {
    if let Ok(path) = std::env::var("TANSU") {
        return path;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = format!("{home}/.cargo/bin/tansu");
    if std::path::Path::new(&cargo_bin).exists() {
        cargo_bin
    } else {
        "tansu".into()
    }
}

/// Starts an in-memory tansu broker listening on `listen_port` and
/// advertising `advertised_port` to clients (a proxy's, say), and waits
/// until it accepts connections; after 20 s it is killed and this fails.
pub fn spawn_tansu(listen_port: u16, advertised_port: u16) -> Result<Child> {
    let listen = format!("tcp://127.0.0.1:{listen_port}");
    let advertised = format!("tcp://127.0.0.1:{advertised_port}");
    let binary = tansu_binary();
    let mut child = Command::new(&binary)
        .args(["broker", "--listener-url", &listen])
        .args(["--advertised-listener-url", &advertised])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io(format!("{binary} (deploy/services.sh installs it)"), e))?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Failed(format!("tansu exited at start ({status})")));
        }
        if start.elapsed() >= START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Failed(format!(
                "tansu did not accept connections on port {listen_port} within {START_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}
