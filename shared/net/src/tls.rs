//! TLS 1.3 for QUIC: the server's certificate (from files, or self-signed on first start and kept), its SHA-256
//! fingerprint for clients to pin, and the client's verifier (a pinned fingerprint or a CA file).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::NetError;

/// ALPN of the protocol.
pub const ALPN: &[u8] = b"offsite/1";
/// The name clients expect in a self-signed certificate.
pub const SERVER_NAME: &str = "offsite-server";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl ToString) -> NetError {
    NetError::File {
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// A certificate chain and its key.
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads PEM files.
    pub fn from_pem(cert: &Path, key: &Path) -> Result<Self, NetError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(cert, e))?;
        if chain.is_empty() {
            return Err(file_err(cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        Ok(Identity { chain, key })
    }

    /// `dir/cert.pem` and `dir/key.pem`, generated (self-signed for `offsite-server` and `localhost`) when absent.
    pub fn self_signed_in(dir: &Path) -> Result<Self, NetError> {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !cert.exists() || !key.exists() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            let names = vec![SERVER_NAME.to_string(), "localhost".to_string()];
            let ck = rcgen::generate_simple_self_signed(names).map_err(|e| NetError::Config(e.to_string()))?;
            // Atomic, and readable by the owner only (the temporary file is created so).
            offsite_fed::write_atomic(&key, ck.signing_key.serialize_pem().as_bytes())?;
            offsite_fed::write_atomic(&cert, ck.cert.pem().as_bytes())?;
            tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
        }
        Self::from_pem(&cert, &key)
    }

    /// SHA-256 of the leaf certificate (hex): what clients pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// The QUIC server config; with `client_ca`, clients must also present a certificate issued by that CA
    /// (mutual TLS, on top of their tokens).
    pub fn quic_server(self, client_ca: Option<&Path>) -> Result<quinn::ServerConfig, NetError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Config(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| file_err(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut tls = builder
            .with_single_cert(self.chain, self.key)
            .map_err(|e| NetError::Config(format!("certificate: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| NetError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport(1, 60)));
        Ok(config)
    }
}

/// QUIC transport settings for what the protocol uses: `peer_bidi` bidirectional streams the peer may open (a
/// client opens one; a server none), no unidirectional streams, no datagrams, and flow-control windows that bound
/// what one connection can make this side buffer (quinn's defaults allow 100 + 100 streams of 1.25 MB each); idle
/// for `idle_s` seconds (keep-alives every 5 s), the connection is closed.
fn transport(peer_bidi: u32, idle_s: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_bidi.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    // 8 MiB in flight per connection: an emulator chunk (1 MiB by default) or an update streams through it.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((8u32 << 20).into());
    t.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
    t.max_idle_timeout(std::time::Duration::from_secs(idle_s).try_into().ok());
    t
}

/// The CA certificates of a PEM file.
fn roots(path: &Path) -> Result<rustls::RootCertStore, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
        roots
            .add(cert.map_err(|e| file_err(path, e))?)
            .map_err(|e| file_err(path, e))?;
    }
    if roots.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(roots)
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// How a client trusts the server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The server's leaf certificate must have this SHA-256 (hex, `:` allowed).
    Pinned(String),
    /// The server's chain must verify against the CA certificates in this PEM file.
    Ca(std::path::PathBuf),
}

#[derive(Debug)]
struct Pinned {
    sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} is not the pinned {}",
                fingerprint(end_entity),
                self.sha256
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC client config for `trust`, presenting `identity` when the server asks for a client certificate.
pub fn quic_client(trust: &Trust, identity: Option<Identity>) -> Result<quinn::ClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Config(e.to_string()))?;
    let builder = match trust {
        Trust::Pinned(sha) => {
            let sha256 = sha.replace(':', "").to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(NetError::Config(format!("fingerprint `{sha}` is not a hex SHA-256")));
            }
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Pinned {
                sha256,
                provider: provider(),
            }))
        }
        Trust::Ca(path) => builder.with_root_certificates(roots(path)?),
    };
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| NetError::Config(format!("client certificate: {e}")))?,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| NetError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // The server opens no stream toward a client.
    // An unreachable server is given up on after 30 s (quinn's default), a quiet client after 60.
    config.transport_config(Arc::new(transport(0, 30)));
    Ok(config)
}
