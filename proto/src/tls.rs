//! Mutual TLS for every Avalon connection, and who is on the other end.
//!
//! Every process has one keyfile (made by `avalonctl auth add NAME`): its
//! private key, its certificate and the cluster CA's certificate, in PEM.
//! The identity is in the certificate, as the SAN URI `avalon://CLUSTER/NAME`
//! (`mds.1`, `osd.3`, `client.alice`, `client.admin`). Servers require a
//! client certificate signed by the cluster CA ([`ServerTls`]); clients
//! require the server to be an MDS or an OSD of that CA: MDS certificates
//! carry the DNS name [`MDS_SERVER_NAME`], OSD certificates [`OSD_SERVER_NAME`]
//! ([`ClientTls`]). Connections stay open for many requests, so the
//! handshake is paid once per connection, not per request.
//!
//! Plaintext ([`ClientTls::plaintext`], [`ServerTls::plaintext`]) only
//! exists for an explicit `insecure = true`; servers then do no role checks.

use crate::tls_records::{RecordStream, READY};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// DNS name in every MDS certificate; clients dialing an MDS require it.
pub const MDS_SERVER_NAME: &str = "mds.avalon";
/// DNS name in every OSD certificate; clients dialing an OSD require it.
pub const OSD_SERVER_NAME: &str = "osd.avalon";
/// ALPN of gRPC connections.
pub const ALPN_GRPC: &[u8] = b"h2";
/// ALPN of OSD data-port connections (they share the gRPC port) whose
/// records rustls handles: what peers before [`ALPN_DATA_RECORDS`] speak.
pub const ALPN_DATA: &[u8] = b"avalon-data/1";
/// ALPN of data-port connections whose records [`crate::tls_records`]
/// handles after the handshake (preferred by both sides).
pub const ALPN_DATA_RECORDS: &[u8] = b"avalon-data/2";
/// Scheme of the identity URI in certificates.
pub const URI_SCHEME: &str = "avalon://";
/// Name of the administrator identity.
pub const ADMIN_NAME: &str = "client.admin";
/// A TLS handshake must be over within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// gRPC connections ping their peer after this long without a frame...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and are closed when the answer does not come within this long.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures loading a keyfile or building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The keyfile could not be read.
    #[error("reading keyfile {path}: {source}")]
    Read {
        /// The keyfile.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The keyfile lacks a part or has an unreadable one.
    #[error("keyfile {path}: {what}")]
    Keyfile {
        /// The keyfile.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the key or certificates.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Who a peer is, from its certificate: `avalon://CLUSTER/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The cluster id the certificate was made for.
    pub cluster: String,
    /// `mds.N`, `osd.N`, `client.NAME`.
    pub name: String,
}

impl Identity {
    /// Parses `avalon://CLUSTER/NAME`.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_SCHEME)?;
        let (cluster, name) = rest.split_once('/')?;
        if cluster.is_empty() || !valid_name(name) {
            return None;
        }
        Some(Identity {
            cluster: cluster.to_string(),
            name: name.to_string(),
        })
    }

    /// The identity URI put in certificates.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.cluster, self.name)
    }

    /// The identity in a DER certificate (its first `avalon://` SAN URI).
    pub fn from_cert(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
            _ => None,
        })
    }

    /// True for a metadata server (`mds.N`).
    pub fn is_mds(&self) -> bool {
        self.name.starts_with("mds.")
    }

    /// The OSD id of an `osd.N` identity.
    pub fn osd_id(&self) -> Option<u64> {
        self.name.strip_prefix("osd.")?.parse().ok()
    }

    /// True for the administrator (`client.admin`).
    pub fn is_admin(&self) -> bool {
        self.name == ADMIN_NAME
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// True for a well-formed identity name: `mds.N`, `osd.N` or
/// `client.NAME` (letters, digits, `-`, `_`, `.`).
pub fn valid_name(name: &str) -> bool {
    let Some((kind, rest)) = name.split_once('.') else {
        return false;
    };
    let ok_chars = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match kind {
        "mds" | "osd" => rest.parse::<u64>().is_ok(),
        "client" => ok_chars,
        _ => false,
    }
}

/// A loaded keyfile: private key, own certificate, cluster CA certificate.
pub struct KeyFile {
    key: PrivateKeyDer<'static>,
    cert: CertificateDer<'static>,
    ca: CertificateDer<'static>,
    identity: Identity,
    chunk_cap_key: Option<crate::chunk_cap::CapKey>,
}

impl KeyFile {
    /// Reads and checks a keyfile (PEM: key, certificate, CA certificate).
    pub fn load(path: &Path) -> Result<KeyFile, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&pem).map_err(|what| TlsError::Keyfile {
            path: path.to_path_buf(),
            what,
        })
    }

    /// Parses a keyfile's PEM text; the first certificate is the
    /// identity's, the last the CA's.
    pub fn parse(pem: &[u8]) -> Result<KeyFile, String> {
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no private key: {e}"))?;
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad certificate: {e}"))?;
        if certs.len() < 2 {
            return Err("needs the identity's certificate and the CA certificate".into());
        }
        let cert = certs[0].clone();
        let ca = certs[certs.len() - 1].clone();
        let identity = Identity::from_cert(&cert)
            .ok_or_else(|| format!("certificate has no {URI_SCHEME}CLUSTER/NAME identity"))?;
        let chunk_cap_key = crate::chunk_cap::CapKey::from_pem(pem).transpose()?;
        Ok(KeyFile {
            key,
            cert,
            ca,
            identity,
            chunk_cap_key,
        })
    }

    /// The cluster's chunk-capability key (MDS and OSD keyfiles only).
    pub fn chunk_cap_key(&self) -> Option<&crate::chunk_cap::CapKey> {
        self.chunk_cap_key.as_ref()
    }

    /// The identity the certificate names.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        Ok(roots)
    }
}

/// The `[security]` section of a daemon's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// This daemon's keyfile (`avalonctl auth add mds.N` / `osd.N`).
    pub keyfile: Option<PathBuf>,
    /// Plaintext, nobody authenticated: only when set explicitly.
    pub insecure: bool,
}

/// A daemon's TLS, both sides, from its `[security]` section.
pub struct DaemonTls {
    /// For the connections it accepts.
    pub server: ServerTls,
    /// For the connections it opens.
    pub client: ClientTls,
    /// Its identity (`None` when insecure).
    pub identity: Option<Identity>,
    /// The chunk-capability key from its keyfile (`None` when insecure or
    /// when the keyfile predates chunk capabilities: then none are checked).
    pub chunk_cap_key: Option<crate::chunk_cap::CapKey>,
}

impl SecurityConfig {
    /// Loads the keyfile, or plaintext with a loud warning when `insecure`.
    /// `daemon` names the daemon in messages (`avalon-mds`).
    pub fn load(&self, daemon: &str) -> Result<DaemonTls, TlsError> {
        match (&self.keyfile, self.insecure) {
            (Some(path), false) => {
                let k = KeyFile::load(path)?;
                if k.chunk_cap_key().is_none() {
                    tracing::warn!(
                        "{daemon}: keyfile {} has no {} block: chunk capabilities are neither \
                         signed nor checked (any client key may read and write any chunk); \
                         make the keyfile again with `avalonctl auth add`",
                        path.display(),
                        crate::chunk_cap::PEM_LABEL
                    );
                }
                Ok(DaemonTls {
                    server: ServerTls::from_key(&k)?,
                    client: ClientTls::from_key(&k)?,
                    identity: Some(k.identity().clone()),
                    chunk_cap_key: k.chunk_cap_key().cloned(),
                })
            }
            (None, true) => {
                tracing::warn!(
                    "{daemon}: [security] insecure = true: NO TLS, NO AUTHENTICATION; anyone who \
                     can reach this port can read and change everything and act as any node"
                );
                Ok(DaemonTls {
                    server: ServerTls::plaintext(),
                    client: ClientTls::plaintext(),
                    identity: None,
                    chunk_cap_key: None,
                })
            }
            (Some(_), true) => Err(TlsError::Config(
                "[security] sets both keyfile and insecure = true; choose one".into(),
            )),
            (None, false) => Err(TlsError::Config(format!(
                "{daemon} needs [security] keyfile = PATH (made by `avalonctl auth add NAME`), \
                 or insecure = true to run without TLS and authentication"
            ))),
        }
    }
}

/// ring, not aws-lc: no C/cmake build. rustls deprecates ring's provider
/// only for lacking post-quantum key exchange. AES-128-GCM first (TLS 1.3's
/// mandatory suite): four fewer AES rounds per block than AES-256 on every
/// byte of chunk data; the other suites stay for a peer that prefers them.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Which kind of daemon a client connection goes to (the name its
/// certificate must carry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dial {
    /// A metadata server.
    Mds,
    /// An object storage daemon.
    Osd,
}

impl Dial {
    fn server_name(self) -> ServerName<'static> {
        let n = match self {
            Dial::Mds => MDS_SERVER_NAME,
            Dial::Osd => OSD_SERVER_NAME,
        };
        ServerName::try_from(n).expect("static DNS name")
    }
}

struct ClientInner {
    grpc: Arc<ClientConfig>,
    data: Arc<ClientConfig>,
    identity: Identity,
}

/// The client side of every connection a process opens: mutual TLS with its
/// keyfile, or plaintext (`insecure`), and the local address connections
/// leave from. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    inner: Option<Arc<ClientInner>>,
    /// Bound before each connect (`None`: the kernel's choice). A node on a
    /// shared host then sends from its own address, which firewall rules
    /// (and the chaos harness's partitions) can tell apart.
    source: Option<IpAddr>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.identity() {
            Some(i) => write!(f, "ClientTls({})", i.name),
            None => f.write_str("ClientTls(plaintext)"),
        }
    }
}

impl ClientTls {
    /// No TLS (`insecure = true`).
    pub fn plaintext() -> ClientTls {
        ClientTls {
            inner: None,
            source: None,
        }
    }

    /// Mutual TLS with the key, certificate and CA in `path`.
    pub fn from_keyfile(path: &Path) -> Result<ClientTls, TlsError> {
        Self::from_key(&KeyFile::load(path)?)
    }

    /// Mutual TLS with a loaded keyfile.
    pub fn from_key(k: &KeyFile) -> Result<ClientTls, TlsError> {
        // Data connections are TLS 1.3 only: their records are then sealed
        // and opened by [`crate::tls_records`], with the keys rustls hands over.
        let build = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, TlsError> {
            let data = alpn.contains(&ALPN_DATA_RECORDS);
            let versions: &[&rustls::SupportedProtocolVersion] = if data {
                &[&rustls::version::TLS13]
            } else {
                rustls::DEFAULT_VERSIONS
            };
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .map_err(config_err)?
                .with_root_certificates(k.roots()?)
                .with_client_auth_cert(vec![k.cert.clone()], k.key.clone_key())
                .map_err(config_err)?;
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            c.enable_secret_extraction = data;
            Ok(Arc::new(c))
        };
        Ok(ClientTls {
            inner: Some(Arc::new(ClientInner {
                grpc: build(&[ALPN_GRPC])?,
                // An OSD predating avalon-data/2 picks avalon-data/1.
                data: build(&[ALPN_DATA_RECORDS, ALPN_DATA])?,
                identity: k.identity.clone(),
            })),
            source: None,
        })
    }

    /// The same, with every connection leaving from `source` (`None`: the
    /// kernel's choice; an unspecified address counts as `None`).
    pub fn with_source(mut self, source: Option<IpAddr>) -> ClientTls {
        self.source = source.filter(|ip| !ip.is_unspecified());
        self
    }

    /// The local address connections leave from, if one was chosen.
    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// This process's identity; `None` when plaintext.
    pub fn identity(&self) -> Option<&Identity> {
        self.inner.as_ref().map(|i| &i.identity)
    }

    /// True without TLS.
    pub fn is_plaintext(&self) -> bool {
        self.inner.is_none()
    }

    /// A lazily connected gRPC channel to the `dial` daemon at `addr`.
    pub fn channel(
        &self,
        addr: &str,
        dial: Dial,
        connect_timeout: Duration,
    ) -> Result<Channel, Status> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            // A peer cut off by the network (packets dropped, nothing
            // reset) would leave the connection open forever and every
            // call on it waiting for its own timeout; unanswered pings
            // close it, and the next call connects again.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(match &self.inner {
            None => ep.local_address(self.source).connect_lazy(),
            Some(inner) => ep.connect_with_connector_lazy(GrpcConnector {
                config: inner.grpc.clone(),
                name: dial.server_name(),
                source: self.source,
            }),
        })
    }

    /// Connects to an OSD's data port at `addr` (TLS handshake included).
    pub async fn connect_data(&self, addr: &str) -> io::Result<Conn> {
        let tcp = connect_tcp(addr, self.source).await?;
        // Small requests and acks must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let remote = tcp.peer_addr().ok();
        match &self.inner {
            None => Ok(Conn::plain(tcp)),
            Some(inner) => {
                let tls = tokio_rustls::TlsConnector::from(inner.data.clone())
                    .connect(Dial::Osd.server_name(), tcp)
                    .await?;
                let identity = peer_identity(tls.get_ref().1.peer_certificates());
                let peer = Peer {
                    addr: remote,
                    identity,
                    secured: true,
                };
                if tls.get_ref().1.alpn_protocol() != Some(ALPN_DATA_RECORDS) {
                    return Ok(Conn {
                        io: ConnIo::Tls(Box::new(tls.into())),
                        peer,
                    });
                }
                let (tcp, session) = tls.into_inner();
                let secrets = session
                    .dangerous_extract_secrets()
                    .map_err(|e| io::Error::other(format!("data connection keys: {e}")))?;
                let mut records = RecordStream::new(tcp, secrets)?;
                // The server speaks first (see tls_records): only then may
                // this side send, so rustls held no record of ours.
                let mut ready = [0u8; READY.len()];
                tokio::time::timeout(HANDSHAKE_TIMEOUT, records.read_exact(&mut ready))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "OSD not ready"))??;
                if &ready != READY {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "data connection: no ready message",
                    ));
                }
                Ok(Conn {
                    io: ConnIo::Records(Box::new(records)),
                    peer,
                })
            }
        }
    }
}

impl ClientTls {
    /// Why a TLS session with the `dial` daemons at `addrs` fails, if it
    /// does (a certificate from another CA, a refused key): for error
    /// messages, as gRPC reports only "transport error". `None` when
    /// plaintext, unreachable, or the handshake works.
    pub async fn diagnose(&self, addrs: &[String], dial: Dial) -> Option<String> {
        let inner = self.inner.as_ref()?;
        for addr in addrs {
            let Ok(Ok(tcp)) =
                tokio::time::timeout(Duration::from_secs(2), connect_tcp(addr, self.source)).await
            else {
                continue;
            };
            let connector = tokio_rustls::TlsConnector::from(inner.grpc.clone());
            let mut tls = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                connector.connect(dial.server_name(), tcp),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Some(format!("TLS with {addr}: {e}")),
                Err(_) => continue,
            };
            // In TLS 1.3 the server judges our certificate after the client
            // has finished: its verdict arrives as an alert.
            let mut buf = [0u8; 64];
            let read = tokio::io::AsyncReadExt::read(&mut tls, &mut buf);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(500), read).await {
                return Some(format!("TLS with {addr}: {e}"));
            }
        }
        None
    }
}

fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| Identity::from_cert(c))
}

/// Opens a TCP connection to `addr` (`HOST:PORT`), from `source` when given:
/// the one place where Avalon processes connect out.
pub async fn connect_tcp(addr: &str, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    let tos: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    for &to in &tos {
        if to.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if to.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(to).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e),
        // No address of the source's family: the kernel chooses.
        None => TcpStream::connect(&tos[..]).await,
    }
}

/// Lets the kernel pick the local port at connect, by destination, as for an
/// unbound socket: a bind to port 0 would reserve a port for all
/// destinations. Best effort (without it the bind still works).
fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and an int option of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// tonic connector: TCP (from `source` when given), then the TLS handshake
/// as the given server name.
#[derive(Clone)]
struct GrpcConnector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    source: Option<IpAddr>,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Uri> for GrpcConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFut<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (config, name, source) = (self.config.clone(), self.name.clone(), self.source);
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
            let tcp = connect_tcp(&addr, source).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// The server side: a daemon's keyfile, or plaintext (`insecure`).
#[derive(Clone)]
pub struct ServerTls(Option<Arc<ServerConfig>>);

impl ServerTls {
    /// No TLS: every caller is accepted and no role is checked.
    pub fn plaintext() -> ServerTls {
        ServerTls(None)
    }

    /// Requires a client certificate signed by the keyfile's CA.
    pub fn from_key(k: &KeyFile) -> Result<ServerTls, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(k.roots()?), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![k.cert.clone()], k.key.clone_key())
            .map_err(config_err)?;
        // The server's order decides: avalon-data/2 when the client has it.
        c.alpn_protocols = vec![
            ALPN_GRPC.to_vec(),
            ALPN_DATA_RECORDS.to_vec(),
            ALPN_DATA.to_vec(),
        ];
        // Data connections hand their keys to crate::tls_records.
        c.enable_secret_extraction = true;
        Ok(ServerTls(Some(Arc::new(c))))
    }

    /// True without TLS.
    pub fn is_plaintext(&self) -> bool {
        self.0.is_none()
    }

    /// Runs the server handshake on an accepted connection (at most
    /// [`HANDSHAKE_TIMEOUT`]); plaintext passes it through.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Conn> {
        let Some(cfg) = &self.0 else {
            return Ok(Conn::plain(tcp));
        };
        let remote = tcp.peer_addr().ok();
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let identity = peer_identity(tls.get_ref().1.peer_certificates());
        Ok(Conn {
            io: ConnIo::Tls(Box::new(tls.into())),
            peer: Peer {
                addr: remote,
                identity,
                secured: true,
            },
        })
    }

    /// Accepts connections on `listener` until the stream is dropped, each
    /// handshake in its own task (a slow peer delays no other), and yields
    /// them for a tonic server. Failed handshakes are logged and dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
        let tls = self.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, from) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: pass, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls.accept(tcp).await {
                        Ok(c) => {
                            let _ = tx.send(c).await;
                        }
                        Err(e) => tracing::info!(%from, error = %e, "refused connection"),
                    }
                });
            }
        });
        let guard = AbortOnDrop(accepting);
        futures::stream::unfold((rx, guard), |(mut rx, g)| async move {
            rx.recv().await.map(|c| (Ok(c), (rx, g)))
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The other end of an accepted (or dialed) connection, as tonic hands it to
/// services in each request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Its identity (TLS only).
    pub identity: Option<Identity>,
    /// True when the connection is TLS (then roles are checked).
    pub secured: bool,
}

impl Peer {
    /// The peer of a gRPC request (a plaintext one when the server was
    /// given bare TCP connections).
    pub fn of<T>(req: &tonic::Request<T>) -> Peer {
        req.extensions().get::<Peer>().cloned().unwrap_or_default()
    }

    /// Ok when the peer may act as `what` (`allowed`), or when the
    /// connection is plaintext (`insecure`: nothing is checked).
    pub fn require(&self, what: &str, allowed: impl Fn(&Identity) -> bool) -> Result<(), Status> {
        if !self.secured {
            return Ok(());
        }
        match &self.identity {
            Some(i) if allowed(i) => Ok(()),
            Some(i) => Err(Status::permission_denied(format!(
                "identity {} may not {what}",
                i.name
            ))),
            None => Err(Status::unauthenticated(format!(
                "no {URI_SCHEME} identity in the client certificate; cannot {what}"
            ))),
        }
    }
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// A data connection after its handshake ([`crate::tls_records`]).
    Records(Box<RecordStream<TcpStream>>),
}

/// A connection, TLS or plaintext, with its peer.
pub struct Conn {
    io: ConnIo,
    peer: Peer,
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(tcp: TcpStream) -> Conn {
        let addr = tcp.peer_addr().ok();
        Conn {
            io: ConnIo::Plain(tcp),
            peer: Peer {
                addr,
                identity: None,
                secured: false,
            },
        }
    }

    /// Who is on the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The ALPN protocol the TLS handshake settled on.
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.io {
            ConnIo::Plain(_) => None,
            ConnIo::Tls(t) => t.get_ref().1.alpn_protocol(),
            ConnIo::Records(_) => Some(ALPN_DATA_RECORDS),
        }
    }

    /// True for a data-port connection (either data ALPN).
    pub fn is_data(&self) -> bool {
        matches!(self.alpn(), Some(a) if a == ALPN_DATA || a == ALPN_DATA_RECORDS)
    }

    /// An accepted data connection after its handshake: with ALPN
    /// [`ALPN_DATA_RECORDS`] its records are taken over by
    /// [`crate::tls_records`], which sends [`READY`]; others (plaintext,
    /// [`ALPN_DATA`]) pass through.
    pub async fn into_data_records(self) -> io::Result<Conn> {
        if self.alpn() != Some(ALPN_DATA_RECORDS) {
            return Ok(self);
        }
        let tls = match self.io {
            ConnIo::Tls(tls) => tls,
            io => {
                return Ok(Conn {
                    io,
                    peer: self.peer,
                })
            }
        };
        let tokio_rustls::TlsStream::Server(tls) = *tls else {
            return Err(io::Error::other("not an accepted connection"));
        };
        let (tcp, session) = tls.into_inner();
        if session.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data connections need TLS 1.3",
            ));
        }
        let secrets = session
            .dangerous_extract_secrets()
            .map_err(|e| io::Error::other(format!("data connection keys: {e}")))?;
        let mut records = RecordStream::new(tcp, secrets)?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            records.write_all(READY).await?;
            records.flush().await
        })
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, "data connection: ready not sent")
        })??;
        Ok(Conn {
            io: ConnIo::Records(Box::new(records)),
            peer: self.peer,
        })
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ConnIo::Records(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ConnIo::Records(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            ConnIo::Records(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
            ConnIo::Records(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ConnIo::Records(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ConnIo::Records(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A per-server policy: may this peer call this gRPC method (its path,
/// `/avalon.v1.Service/Method`)?
pub type Policy = Arc<dyn Fn(&str, &Peer) -> Result<(), Status> + Send + Sync>;

/// tower layer that applies a [`Policy`] to every gRPC request before any
/// service sees it.
#[derive(Clone)]
pub struct AuthzLayer(pub Policy);

impl AuthzLayer {
    /// A layer applying `policy`.
    pub fn new(policy: impl Fn(&str, &Peer) -> Result<(), Status> + Send + Sync + 'static) -> Self {
        AuthzLayer(Arc::new(policy))
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            policy: self.0.clone(),
        }
    }
}

/// The service [`AuthzLayer`] makes.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    policy: Policy,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
        match (self.policy)(req.uri().path(), &peer) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(st) => {
                tracing::info!(path = req.uri().path(), peer = ?peer.identity, addr = ?peer.addr, msg = st.message(), "refused");
                Box::pin(std::future::ready(Ok(st.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "mds.1",
            "osd.30",
            "client.alice",
            "client.admin",
            "client.a-b_c.d",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "mds.x",
            "osd.",
            "client.",
            "root",
            "client.a/b",
            "admin.x",
            "",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn identity_uri_round_trip() {
        let i = Identity::from_uri("avalon://c1/osd.3").expect("parse");
        assert_eq!(i.osd_id(), Some(3));
        assert!(!i.is_mds() && !i.is_admin());
        assert_eq!(i.uri(), "avalon://c1/osd.3");
        assert!(Identity::from_uri("avalon:///osd.3").is_none());
        assert!(Identity::from_uri("https://c1/osd.3").is_none());
        assert!(Identity::from_uri("avalon://c1/nobody").is_none());
    }

    /// A keyfile (PEM: key, certificate, CA) for `name`, signed by `ca`.
    fn keyfile(ca: &(rcgen::Certificate, rcgen::KeyPair), name: &str) -> KeyFile {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let dns = if name.starts_with("osd.") {
            vec![OSD_SERVER_NAME.to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(dns).unwrap();
        let uri = format!("{URI_SCHEME}c1/{name}");
        p.subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        let pem = format!("{}{}{}", key.serialize_pem(), cert.pem(), ca.0.pem());
        KeyFile::parse(pem.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn data_connections_hand_their_records_over_after_the_handshake() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = (p.self_signed(&ca_key).unwrap(), ca_key);
        let server = ServerTls::from_key(&keyfile(&ca, "osd.1")).unwrap();
        let client = ClientTls::from_key(&keyfile(&ca, "client.x")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let served = tokio::spawn(async move {
            // Two connections, each echoing what it gets until the client closes.
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let c = server.accept(tcp).await.unwrap();
                assert!(c.is_data());
                assert_eq!(c.peer().identity.as_ref().unwrap().name, "client.x");
                let mut c = c.into_data_records().await.unwrap();
                assert_eq!(c.alpn(), Some(ALPN_DATA_RECORDS));
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = c.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    c.write_all(&buf[..n]).await.unwrap();
                    c.flush().await.unwrap();
                }
            }
        });
        for _ in 0..2 {
            let mut c = client.connect_data(&addr).await.unwrap();
            assert_eq!(c.alpn(), Some(ALPN_DATA_RECORDS));
            assert_eq!(c.peer().identity.as_ref().unwrap().name, "osd.1");
            let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
            let (mut rd, mut wr) = tokio::io::split(c);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&sent).await.unwrap();
                wr.flush().await.unwrap();
                wr
            });
            let mut back = vec![0u8; data.len()];
            rd.read_exact(&mut back).await.unwrap();
            assert!(back == data, "echoed bytes differ");
            c = rd.unsplit(writer.await.unwrap());
            c.shutdown().await.unwrap();
        }
        served.await.unwrap();
    }

    #[test]
    fn plaintext_peer_is_not_checked() {
        let p = Peer::default();
        assert!(p.require("vote", |_| false).is_ok());
        let p = Peer {
            secured: true,
            identity: Identity::from_uri("avalon://c/client.x"),
            addr: None,
        };
        let e = p.require("vote", |i| i.is_mds()).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let p = Peer {
            secured: true,
            ..Peer::default()
        };
        assert_eq!(
            p.require("vote", |_| true).expect_err("no id").code(),
            tonic::Code::Unauthenticated
        );
    }
}
