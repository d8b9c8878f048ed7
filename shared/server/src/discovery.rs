//! Every replica of a service behind one channel. A service URL may list several endpoints
//! (`http://a:1,http://b:2`) and each host may resolve to several addresses (a Kubernetes
//! headless Service resolves to every ready pod). Each address is probed with gRPC health
//! every second; the healthy ones are balanced by tonic's power-of-two-choices
//! balancer (tower), so tasks and Flight partitions spread over the replicas, and a replica
//! that stops answering leaves the set until it answers again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::sync::{mpsc::Sender, watch};
use tonic::transport::{Channel, Endpoint, Uri, channel::Change};

use crate::{Error, Result, TlsOptions};

/// How often each replica's health is probed (and names are resolved again).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call may wait for a healthy replica before failing as unavailable (a balanced
/// channel with no healthy replica holds calls rather than failing them).
pub const REPLICA_WAIT: Duration = Duration::from_secs(15);

/// One `scheme://host:port` of a service URL.
#[derive(Debug, Clone)]
struct Target {
    https: bool,
    host: String,
    port: u16,
    origin: Uri,
}

fn parse_targets(urls: &str) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let bad = |reason: &str| Error::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        targets.push(Target {
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            origin: uri,
        });
    }
    if targets.is_empty() {
        return Err(Error::Url {
            url: urls.to_string(),
            reason: "no endpoint".into(),
        });
    }
    Ok(targets)
}

/// The endpoint of one address of `target`: connected by IP, but speaking to (and checking
/// the certificate of) the host name the URL gave.
fn address_endpoint(target: &Target, addr: SocketAddr, tls: &TlsOptions) -> Result<Endpoint> {
    let scheme = if target.https { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let endpoint =
        crate::configure(Endpoint::from_shared(url.clone()).map_err(|e| Error::Url {
            url: url.clone(),
            reason: e.to_string(),
        })?)
        .origin(target.origin.clone());
    if !target.https {
        return Ok(endpoint);
    }
    endpoint
        .tls_config(tls.client_config()?.domain_name(target.host.clone()))
        .map_err(|e| Error::Url {
            url,
            reason: e.to_string(),
        })
}

/// A channel to another service, balanced over every healthy replica behind `urls`
/// (comma-separated), with the HTTP/2 windows Flight needs and TLS for `https://` URLs. Must be
/// called inside the Tokio runtime: discovery runs as a task for as long as the channel lives.
pub fn channel(urls: &str, tls: &TlsOptions) -> Result<Channel> {
    Ok(channel_and_replicas(urls, tls)?.0)
}

/// The healthy replicas behind a balanced channel, each reachable on its own: for calls that
/// must reach every replica rather than any one.
#[derive(Debug, Clone)]
pub struct Replicas(watch::Receiver<BTreeMap<SocketAddr, Channel>>);

impl Replicas {
    /// A channel to each replica healthy at the last probe, in address order.
    pub fn healthy(&self) -> Vec<(SocketAddr, Channel)> {
        self.0
            .borrow()
            .iter()
            .map(|(addr, channel)| (*addr, channel.clone()))
            .collect()
    }
}

/// [`channel`], and a view of the replicas it balances over.
pub fn channel_and_replicas(urls: &str, tls: &TlsOptions) -> Result<(Channel, Replicas)> {
    let targets = parse_targets(urls)?;
    if tls.enabled() && targets.iter().any(|t| !t.https) {
        tracing::warn!(urls, "TLS is on for this service but a URL is plain http");
    }
    // Checked now so that a bad TLS file fails the start, not every probe.
    if targets.iter().any(|t| t.https) {
        tls.client_config()?;
    }
    let (channel, changes) = Channel::balance_channel(64);
    let (healthy, replicas) = watch::channel(BTreeMap::new());
    tokio::spawn(discover(
        urls.to_string(),
        targets,
        tls.clone(),
        changes,
        healthy,
    ));
    Ok((channel, Replicas(replicas)))
}

struct Replica {
    endpoint: Endpoint,
    probe: Channel,
    healthy: bool,
}

async fn is_serving(probe: Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(probe);
    let check = health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, check).await,
        Ok(Ok(r)) if r.get_ref().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

async fn discover(
    urls: String,
    targets: Vec<Target>,
    tls: TlsOptions,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    healthy: watch::Sender<BTreeMap<SocketAddr, Channel>>,
) {
    let mut replicas: BTreeMap<SocketAddr, Replica> = BTreeMap::new();
    let mut unresolved_logged = BTreeSet::new();
    loop {
        let mut seen = BTreeMap::new();
        for target in &targets {
            match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                Ok(addrs) => {
                    unresolved_logged.remove(&target.host);
                    for addr in addrs {
                        seen.insert(addr, target.clone());
                    }
                }
                Err(e) => {
                    if unresolved_logged.insert(target.host.clone()) {
                        tracing::warn!(host = %target.host, error = %e, "cannot resolve a service host");
                    }
                }
            }
        }
        for (addr, target) in &seen {
            if replicas.contains_key(addr) {
                continue;
            }
            match address_endpoint(target, *addr, &tls) {
                Ok(endpoint) => {
                    let probe = endpoint.clone().connect_lazy();
                    replicas.insert(
                        *addr,
                        Replica {
                            endpoint,
                            probe,
                            healthy: false,
                        },
                    );
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot configure a replica"),
            }
        }
        let gone: Vec<SocketAddr> = replicas
            .keys()
            .filter(|a| !seen.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if replicas.remove(&addr).is_some_and(|r| r.healthy) {
                let _ = changes.send(Change::Remove(addr)).await;
                healthy.send_modify(|h| {
                    h.remove(&addr);
                });
            }
        }
        let probes = replicas
            .iter()
            .map(|(addr, r)| {
                let probe = r.probe.clone();
                async move { (*addr, is_serving(probe).await) }
            })
            .collect::<Vec<_>>();
        for (addr, serving) in futures::future::join_all(probes).await {
            let Some(replica) = replicas.get_mut(&addr) else {
                continue;
            };
            let change = match (replica.healthy, serving) {
                (false, true) => Change::Insert(addr, replica.endpoint.clone()),
                (true, false) => Change::Remove(addr),
                _ => continue,
            };
            replica.healthy = serving;
            tracing::info!(service = %urls, %addr, serving, "replica health changed");
            healthy.send_modify(|h| {
                if serving {
                    h.insert(addr, replica.probe.clone());
                } else {
                    h.remove(&addr);
                }
            });
            if changes.send(change).await.is_err() {
                return; // the channel is gone
            }
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
