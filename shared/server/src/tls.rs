//! TLS for every gRPC and Flight endpoint (rustls), with optional mutual TLS between services.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{Error, Result};

/// TLS settings shared by a service's server and its clients. Off unless a certificate is set.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM certificate (chain) this process presents, as a server and, with mutual TLS, as a
    /// client. Setting it turns TLS on.
    #[arg(long, env = "MEDALLION_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "MEDALLION_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that peers' certificates must chain to (servers this process calls and,
    /// with `--tls-client-auth`, clients calling it). Without it clients trust nothing extra.
    #[arg(long, env = "MEDALLION_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: require callers to present a certificate signed by `--tls-ca`.
    #[arg(
        long,
        env = "MEDALLION_TLS_CLIENT_AUTH",
        requires = "tls_ca",
        default_value_t = false
    )]
    pub tls_client_auth: bool,
}

fn read(path: &PathBuf, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Makes rustls use one crypto provider: two are linked in (dependencies enable both), and
/// rustls refuses to choose between them at run time.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl TlsOptions {
    /// Whether this process serves TLS.
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The server side, `None` when TLS is off.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        install_crypto_provider();
        let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if self.tls_client_auth {
            let ca = self.tls_ca.as_ref().ok_or(Error::TlsClientAuthWithoutCa)?;
            config = config.client_ca_root(Certificate::from_pem(read(ca, "CA bundle")?));
        }
        Ok(Some(config))
    }

    /// The client side for calling other Medallion services over `https://` URLs: trusts
    /// `--tls-ca`, and presents this process's certificate when mutual TLS is on.
    pub fn client_config(&self) -> Result<ClientTlsConfig> {
        install_crypto_provider();
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(read(ca, "CA bundle")?));
        }
        if self.tls_client_auth
            && let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key)
        {
            config = config.identity(Identity::from_pem(
                read(cert, "certificate")?,
                read(key, "key")?,
            ));
        }
        Ok(config)
    }
}
