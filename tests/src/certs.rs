//! A throw-away certificate authority for TLS tests: a CA, a certificate for the services
//! (127.0.0.1 and localhost; server and client usage, as mutual TLS between services needs)
//! and a separate client certificate for the test itself.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::TlsFiles;

/// Writes the PEM files into `dir` and describes them.
pub fn generate(dir: &Path, mutual: bool) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "medallion test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let leaf = |names: Vec<String>, cn: &str| -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (service_cert, service_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "medallion services",
    )?;
    let (client_cert, client_key) = leaf(vec!["medallion-test-client".into()], "test client")?;

    let files = TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        mutual,
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, service_cert)?;
    std::fs::write(&files.key, service_key)?;
    std::fs::write(&files.client_cert, client_cert)?;
    std::fs::write(&files.client_key, client_key)?;
    Ok(files)
}
