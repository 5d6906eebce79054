//! The cluster CA and the identities' keyfiles (`avalonctl cluster init`,
//! `avalonctl auth add|ls|rm`), in one key directory:
//!
//! - `ca.key` (0600) and `ca.crt`: the cluster CA; `cluster_id`: its id;
//! - `chunk_cap.key` (0600): the cluster's chunk-capability key (random,
//!   hex), with which the MDS signs the capabilities clients show the OSDs
//!   ([`avalon_proto::chunk_cap`]);
//! - `NAME.key` (0600), one per identity (`mds.1`, `osd.3`, `client.alice`,
//!   `client.admin`): its private key, its certificate and the CA
//!   certificate, in PEM; MDS and OSD keyfiles also carry the chunk-cap
//!   key (so no daemon needs another file or setting for it). The certificate names the identity as the SAN URI
//!   `avalon://CLUSTER/NAME` (and CN NAME); MDS and OSD certificates also
//!   carry the DNS name clients check ([`avalon_proto::tls`]).
//!
//! Removing a keyfile here does not revoke the certificate: a copy kept
//! elsewhere still authenticates until the CA is replaced (revocation is
//! for a later phase).

use anyhow::{bail, Context};
use avalon_proto::tls::{self, Identity};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The CA's certificate.
pub const CA_CERT: &str = "ca.crt";
/// The administrator's identity.
pub const ADMIN: &str = tls::ADMIN_NAME;
/// The cluster id the CA was made for.
pub const CLUSTER_ID: &str = "cluster_id";
/// The chunk-capability key shared by the MDS group and the OSDs.
pub const CHUNK_CAP_KEY: &str = "chunk_cap.key";

/// Where `NAME`'s keyfile lives in `dir`.
pub fn keyfile(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn random_id() -> anyhow::Result<String> {
    random_hex(8)
}

/// The chunk-cap key of `dir` as a keyfile block; made first if the
/// directory predates chunk capabilities.
fn chunk_cap_block(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(CHUNK_CAP_KEY);
    if !path.exists() {
        write_private(
            &path,
            &format!("{}\n", random_hex(avalon_proto::chunk_cap::KEY_BYTES)?),
        )?;
    }
    let hex =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let block = format!(
        "-----BEGIN {l}-----\n{}\n-----END {l}-----\n",
        hex.trim(),
        l = avalon_proto::chunk_cap::PEM_LABEL
    );
    match avalon_proto::chunk_cap::CapKey::from_pem(block.as_bytes()) {
        Some(Ok(_)) => Ok(block),
        _ => bail!("{} is not a chunk-cap key", path.display()),
    }
}

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn ca_params(cluster: &str) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, format!("Avalon cluster {cluster} CA"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Creates the CA in `dir` (made if missing) for a new cluster id (or
/// `cluster`); refuses to overwrite one. Returns the cluster id.
pub fn init(dir: &Path, cluster: Option<&str>) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if dir.join(CA_KEY).exists() {
        bail!(
            "{} already has a cluster CA ({CA_KEY}); remove it first to start over",
            dir.display()
        );
    }
    let cluster = match cluster {
        Some(c) if !c.is_empty() && !c.contains('/') => c.to_string(),
        Some(c) => bail!("bad cluster id {c:?}"),
        None => random_id()?,
    };
    let key = KeyPair::generate()?;
    let cert = ca_params(&cluster)?.self_signed(&key)?;
    write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
    std::fs::write(dir.join(CA_CERT), cert.pem())?;
    std::fs::write(dir.join(CLUSTER_ID), format!("{cluster}\n"))?;
    chunk_cap_block(dir)?;
    Ok(cluster)
}

/// The CA of `dir`: cluster id, issuer certificate, key, CA PEM.
fn load_ca(dir: &Path) -> anyhow::Result<(String, Certificate, KeyPair, String)> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "reading {} (run `avalonctl cluster init --dir {}` first)",
                dir.join(f).display(),
                dir.display()
            )
        })
    };
    let cluster = read(CLUSTER_ID)?.trim().to_string();
    let key = KeyPair::from_pem(&read(CA_KEY)?).context("bad CA key")?;
    let ca_pem = read(CA_CERT)?;
    // The issuer for signing: same name and key as the stored CA
    // certificate, so what it signs chains to that certificate.
    let issuer = ca_params(&cluster)?.self_signed(&key)?;
    Ok((cluster, issuer, key, ca_pem))
}

/// Makes `NAME`'s keyfile in `dir` (signed by its CA); refuses to replace
/// an existing one. Returns its path.
pub fn add(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if !tls::valid_name(name) {
        bail!("bad identity name {name:?}: use mds.N, osd.N or client.NAME");
    }
    let path = keyfile(dir, name);
    if path.exists() {
        bail!("{} exists already", path.display());
    }
    let (cluster, issuer, ca_key, ca_pem) = load_ca(dir)?;
    let id = Identity {
        cluster,
        name: name.to_string(),
    };
    let mut dns = Vec::new();
    if name.starts_with("mds.") {
        dns.push(tls::MDS_SERVER_NAME.to_string());
    } else if name.starts_with("osd.") {
        dns.push(tls::OSD_SERVER_NAME.to_string());
    }
    let mut p = CertificateParams::new(dns)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names
        .push(SanType::URI(id.uri().try_into().context("identity URI")?));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer, &ca_key)?;
    // Daemons (not clients) hold the key that signs and checks chunk
    // capabilities.
    let cap = if name.starts_with("mds.") || name.starts_with("osd.") {
        chunk_cap_block(dir)?
    } else {
        String::new()
    };
    write_private(
        &path,
        &format!("{}{}{}{cap}", key.serialize_pem(), cert.pem(), ca_pem),
    )?;
    Ok(path)
}

/// The identities with a keyfile in `dir`, sorted.
pub fn list(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".key")
                .filter(|s| tls::valid_name(s))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes `NAME`'s keyfile from `dir`.
pub fn remove(dir: &Path, name: &str) -> anyhow::Result<()> {
    if !tls::valid_name(name) {
        bail!("bad identity name {name:?}");
    }
    let path = keyfile(dir, name);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// Makes the CA (if `dir` has none) and a keyfile for each of `names` that
/// lacks one: what a local cluster needs before it starts.
pub fn ensure(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    if !dir.join(CA_KEY).exists() {
        init(dir, None)?;
    }
    for n in names {
        if !keyfile(dir, n).exists() {
            add(dir, n)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keyfiles_are_private_and_name_their_identity() {
        let d = tempfile::tempdir().expect("tmp");
        let cluster = init(d.path(), Some("c1")).expect("init");
        assert_eq!(cluster, "c1");
        assert!(init(d.path(), None).is_err(), "no second CA");
        let p = add(d.path(), "osd.3").expect("add");
        for f in [
            p.clone(),
            d.path().join(CA_KEY),
            d.path().join(CHUNK_CAP_KEY),
        ] {
            let mode = std::fs::metadata(&f).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let k = tls::KeyFile::load(&p).expect("load");
        assert_eq!(k.identity().name, "osd.3");
        assert_eq!(k.identity().cluster, "c1");
        assert!(add(d.path(), "osd.3").is_err(), "no overwrite");
        assert!(add(d.path(), "root").is_err(), "bad name");
        assert!(
            k.chunk_cap_key().is_some(),
            "daemons hold the chunk-cap key"
        );
        let c = add(d.path(), "client.alice").expect("add");
        let c = tls::KeyFile::load(&c).expect("load");
        assert!(c.chunk_cap_key().is_none(), "clients do not");
        assert_eq!(list(d.path()).expect("ls"), ["client.alice", "osd.3"]);
        remove(d.path(), "osd.3").expect("rm");
        assert_eq!(list(d.path()).expect("ls"), ["client.alice"]);
    }
}
