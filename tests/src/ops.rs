//! A node's operations endpoint as a client sees it (`/healthz`,
//! `/readyz`, `/metrics` over plain HTTP/1.1), and free ports to put it on.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free TCP port on localhost (bound, then released).
///
/// # Panics
///
/// If the system has no free port to give.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on `127.0.0.1:port`; returns (status, body), `None` if the
/// endpoint does not answer.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// `/metrics` of the node on `port` once `ready` holds for it (or after
/// `timeout`, as it is then; empty if it never answered).
pub async fn scrape_until(port: u16, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let body = http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if ready(&body) || start.elapsed() > timeout {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sum of `name`'s series in a scrape (0 if it has none).
pub fn metric_total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An unlabelled gauge from the node's `/metrics`, if it has been set.
pub async fn gauge(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::metric_total;

    #[test]
    fn a_total_sums_the_series_of_one_name_only() {
        let body = "# TYPE a counter\na{p=\"0\"} 2\na{p=\"1\"} 3\na_b 7\na 1\n";
        assert_eq!(metric_total(body, "a"), 6.0);
        assert_eq!(metric_total(body, "c"), 0.0);
    }
}
