//! The cluster PKI: one CA, a certificate per node, and the rustls configs
//! that make every QUIC connection mutually authenticated.
//!
//! A node certificate names its node in a DNS SAN `<id>.<role>.tributary`;
//! cloud nodes also carry `cloud.tributary`, the one name edges dial, so any
//! cloud node can serve any edge. Only the ring provider is used, always set
//! explicitly, because ractor_cluster links aws-lc-rs too and rustls would
//! panic choosing between them.
//!
//! An edge's labels (where the topology places it: a plant, a line) are part
//! of its certificate too, one DNS SAN `<label>.label.tributary` each, so the
//! cloud decides which streams an edge may send from what the CA signed, not
//! from what the edge says.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::TryRng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol id of Tributary's QUIC connections; bumping it makes
/// incompatible nodes fail at the handshake instead of mid-stream.
pub const ALPN: &[u8] = b"tributary/1";

/// The DNS zone every node name lives in.
pub const DNS_ZONE: &str = "tributary";

/// The zone of label names: `<label>.label.tributary`.
pub const LABEL_ZONE: &str = "label.tributary";

/// Labels one certificate may carry; each is one more SAN checked on every
/// handshake.
pub const LABELS_MAX: usize = 16;

/// The server name edges dial; every cloud certificate carries it.
pub const CLOUD_SERVER_NAME: &str = "cloud.tributary";

/// File names inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// The CA's subject is this prefix plus a fingerprint of the CA's public key.
/// Node certificates are signed by rebuilding the issuer from the CA key alone
/// (rcgen cannot read a subject back from a PEM without x509-parser, a heavy
/// build), and every issue checks that the result chains to the CA on disk.
/// The fingerprint keeps two clusters' CAs apart: with equal subjects, a
/// foreign certificate fails as "BadSignature" instead of "UnknownIssuer".
const CA_COMMON_NAME_PREFIX: &str = "Tributary cluster CA";
const CA_ORGANIZATION: &str = "Tributary";
/// Bytes of the key identifier shown in the CA's name.
const CA_FINGERPRINT_BYTES: usize = 8;

/// How long a CA lives. Rotating the CA means reissuing every node, so it is long.
const CA_VALIDITY_DAYS: u64 = 3650;

/// Backdating of `not_before`, so a node whose clock is slightly behind the
/// issuer's still accepts a fresh certificate.
const NOT_BEFORE_BACKDATE_SECS: u64 = 300;

/// Longest node id: one DNS label.
pub const NODE_ID_CHARS_MAX: usize = 63;

const SECS_PER_DAY: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid node id {id:?}: {rule}")]
    InvalidNodeId { id: String, rule: &'static str },
    #[error("invalid role {0:?}: expected \"edge\" or \"cloud\"")]
    InvalidRole(String),
    #[error("a CA already exists at {path}: refusing to overwrite it")]
    CaExists { path: PathBuf },
    #[error("create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse PEM in {path}: {detail}")]
    ParsePem { path: PathBuf, detail: String },
    #[error("no certificate in {path}")]
    NoCertificate { path: PathBuf },
    #[error("no private key in {path}")]
    NoPrivateKey { path: PathBuf },
    #[error("parse the CA key {path}: {source}")]
    ParseCaKey { path: PathBuf, source: rcgen::Error },
    #[error("draw a random serial number from the OS: {0}")]
    Random(String),
    #[error("generate a key pair: {0}")]
    GenerateKey(rcgen::Error),
    #[error("build certificate parameters for {subject}: {source}")]
    Params {
        subject: String,
        source: rcgen::Error,
    },
    #[error("sign the certificate for {subject}: {source}")]
    Sign {
        subject: String,
        source: rcgen::Error,
    },
    #[error("invalid validity for {subject}: {rule}")]
    InvalidValidity { subject: String, rule: &'static str },
    #[error("parse certificate {what}: {source}")]
    ParseCertificate { what: String, source: webpki::Error },
    #[error(
        "the certificate issued for {subject} does not chain to the CA in {ca}: \
         the CA was not created by `init_ca` (its subject differs)"
    )]
    IssuerMismatch { subject: String, ca: PathBuf },
    #[error("add the CA certificate from {path} to the trust store: {source}")]
    TrustStore {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("build the client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("build the {side} TLS config: {source}")]
    Config {
        side: &'static str,
        source: rustls::Error,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer certificate is not valid for {claimed}.{role}.{DNS_ZONE}")]
    IdentityMismatch { claimed: NodeId, role: Role },
    #[error("the certificate names no node: expected one DNS name <id>.<edge|cloud>.{DNS_ZONE}")]
    NoIdentity,
    #[error("the certificate names several nodes ({names:?}): expected exactly one")]
    AmbiguousIdentity { names: Vec<String> },
    #[error("invalid label {label:?}: {rule}")]
    InvalidLabel { label: String, rule: String },
}

/// A node's id: one lowercase DNS label, so it can sit inside a certificate
/// name and a ractor node name unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Result<Self, TlsError> {
        let id = id.into();
        let rule = if id.is_empty() {
            Some("must not be empty")
        } else if id.len() > NODE_ID_CHARS_MAX {
            Some("must be at most 63 characters")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("must contain only a-z, 0-9 and '-'")
        } else if id.starts_with('-') || id.ends_with('-') {
            Some("must not start or end with '-'")
        } else {
            None
        };
        match rule {
            Some(rule) => Err(TlsError::InvalidNodeId { id, rule }),
            None => Ok(Self(id)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The DNS name that identifies this node in role `role`.
    pub fn dns_name(&self, role: Role) -> String {
        format!("{}.{}.{}", self.0, role, DNS_ZONE)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Edge,
    Cloud,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Edge, Role::Cloud];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Cloud => "cloud",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "edge" => Ok(Role::Edge),
            "cloud" => Ok(Role::Cloud),
            other => Err(TlsError::InvalidRole(other.to_string())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodePaths {
    pub fn in_dir(dir: &Path, id: &NodeId) -> Self {
        Self {
            cert: dir.join(format!("{id}.pem")),
            key: dir.join(format!("{id}.key")),
            ca: dir.join(CA_CERT_FILE),
        }
    }
}

fn ca_common_name(params: &CertificateParams, ca_key: &KeyPair) -> String {
    let key_id = params.key_identifier(ca_key);
    let fingerprint: String = key_id
        .iter()
        .take(CA_FINGERPRINT_BYTES)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{CA_COMMON_NAME_PREFIX} {fingerprint}")
}

/// Everything of the CA certificate that signing a node certificate needs,
/// derived from the CA key.
fn ca_params(ca_key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_common_name(&params, ca_key));
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    // Path length 0: the CA signs nodes only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| TlsError::Random(e.to_string()))?;
    // A positive DER integer without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates the cluster CA in `dir`: `ca.pem` and `ca.key` (mode 0600).
pub fn init_ca(dir: &Path) -> Result<CaPaths, TlsError> {
    let paths = CaPaths::in_dir(dir);
    for path in [&paths.cert, &paths.key] {
        if path.exists() {
            return Err(TlsError::CaExists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;

    let key = KeyPair::generate().map_err(TlsError::GenerateKey)?;
    let mut params = ca_params(&key);
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(NOT_BEFORE_BACKDATE_SECS)).into();
    params.not_after = (now + Duration::from_secs(CA_VALIDITY_DAYS * SECS_PER_DAY)).into();
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(|source| TlsError::Sign {
        subject: CA_COMMON_NAME_PREFIX.to_string(),
        source,
    })?;

    // The key goes first and with create_new: two racing `init_ca` calls
    // cannot both succeed, and a crash leaves no certificate without its key.
    write_file(
        &paths.key,
        key.serialize_pem().as_bytes(),
        FileMode::SecretNew,
    )?;
    write_file(&paths.cert, cert.pem().as_bytes(), FileMode::Public)?;
    Ok(paths)
}

/// Issues a certificate for node `id` in role `role`, valid from now for
/// `validity_days`, signed by the CA in `dir`. Writes `<id>.pem` and `<id>.key`
/// into `dir`, replacing an earlier certificate of the same node (renewal).
pub fn issue(
    dir: &Path,
    id: &NodeId,
    role: Role,
    validity_days: u32,
) -> Result<NodePaths, TlsError> {
    issue_labelled(dir, id, role, &[], validity_days)
}

/// [`issue`], the certificate carrying `labels` (at most [`LABELS_MAX`], each
/// one lowercase DNS label, like a node id).
pub fn issue_labelled(
    dir: &Path,
    id: &NodeId,
    role: Role,
    labels: &[String],
    validity_days: u32,
) -> Result<NodePaths, TlsError> {
    if validity_days == 0 {
        return Err(TlsError::InvalidValidity {
            subject: id.to_string(),
            rule: "validity_days must be at least 1",
        });
    }
    let now = SystemTime::now();
    let not_before = now - Duration::from_secs(NOT_BEFORE_BACKDATE_SECS);
    let not_after = now + Duration::from_secs(u64::from(validity_days) * SECS_PER_DAY);
    issue_inner(dir, id, role, labels, not_before, not_after)
}

/// [`issue`] with an explicit validity window, for tests of expired or
/// not-yet-valid certificates.
pub fn issue_with_validity(
    dir: &Path,
    id: &NodeId,
    role: Role,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<NodePaths, TlsError> {
    issue_inner(dir, id, role, &[], not_before, not_after)
}

/// Checks labels for a certificate: the rules of a node id, at most
/// [`LABELS_MAX`], no repeats.
pub fn check_labels(labels: &[String]) -> Result<(), TlsError> {
    if labels.len() > LABELS_MAX {
        return Err(TlsError::InvalidLabel {
            label: labels.join(","),
            rule: format!("at most {LABELS_MAX} labels per certificate"),
        });
    }
    for (i, label) in labels.iter().enumerate() {
        NodeId::new(label.clone()).map_err(|e| TlsError::InvalidLabel {
            label: label.clone(),
            rule: match e {
                TlsError::InvalidNodeId { rule, .. } => rule.to_string(),
                other => other.to_string(),
            },
        })?;
        if labels[..i].contains(label) {
            return Err(TlsError::InvalidLabel {
                label: label.clone(),
                rule: "given twice".into(),
            });
        }
    }
    Ok(())
}

fn issue_inner(
    dir: &Path,
    id: &NodeId,
    role: Role,
    labels: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<NodePaths, TlsError> {
    check_labels(labels)?;
    let subject = id.dns_name(role);
    if not_after <= not_before {
        return Err(TlsError::InvalidValidity {
            subject,
            rule: "not_after must be after not_before",
        });
    }
    let ca = CaPaths::in_dir(dir);
    let ca_key_pem = read_to_string(&ca.key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::ParseCaKey {
        path: ca.key.clone(),
        source,
    })?;
    let ca_cert = read_first_cert(&ca.cert)?;
    let issuer = Issuer::new(ca_params(&ca_key), ca_key);

    let mut names = vec![subject.clone()];
    if role == Role::Cloud {
        names.push(CLOUD_SERVER_NAME.to_string());
    }
    names.extend(labels.iter().map(|l| format!("{l}.{LABEL_ZONE}")));
    let mut params = CertificateParams::new(names).map_err(|source| TlsError::Params {
        subject: subject.clone(),
        source,
    })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both usages: an edge is a client today, but the same certificate lets
    // any node accept connections later without reissuing.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);

    let key = KeyPair::generate().map_err(TlsError::GenerateKey)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| TlsError::Sign {
            subject: subject.clone(),
            source,
        })?;
    check_issued_by(cert.der(), &ca_cert, &subject, &ca.cert)?;

    let paths = NodePaths::in_dir(dir, id);
    write_file(
        &paths.key,
        key.serialize_pem().as_bytes(),
        FileMode::SecretReplace,
    )?;
    write_file(&paths.cert, cert.pem().as_bytes(), FileMode::Public)?;
    Ok(paths)
}

/// The issuer is rebuilt from [`ca_params`], not read from the CA file, so a
/// CA made by another tool would yield certificates nobody accepts. Catch
/// that here, at issue time, rather than at the first handshake.
fn check_issued_by(
    cert: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    subject: &str,
    ca_path: &Path,
) -> Result<(), TlsError> {
    let leaf =
        webpki::EndEntityCert::try_from(cert).map_err(|source| TlsError::ParseCertificate {
            what: format!("issued for {subject}"),
            source,
        })?;
    let ca_parsed =
        webpki::EndEntityCert::try_from(ca).map_err(|source| TlsError::ParseCertificate {
            what: ca_path.display().to_string(),
            source,
        })?;
    if leaf.issuer() != ca_parsed.subject() {
        return Err(TlsError::IssuerMismatch {
            subject: subject.to_string(),
            ca: ca_path.to_path_buf(),
        });
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum FileMode {
    Public,
    /// 0600, and fail if the file exists.
    SecretNew,
    /// 0600, replacing the file atomically.
    SecretReplace,
}

fn write_file(path: &Path, bytes: &[u8], mode: FileMode) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    match mode {
        FileMode::SecretNew => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| {
                    if source.kind() == std::io::ErrorKind::AlreadyExists {
                        TlsError::CaExists {
                            path: path.to_path_buf(),
                        }
                    } else {
                        err(source)
                    }
                })?;
            f.write_all(bytes).map_err(err)?;
            f.sync_all().map_err(err)
        }
        FileMode::Public | FileMode::SecretReplace => {
            // Write-then-rename: a crash never leaves a half-written key or
            // certificate under the real name.
            let mut tmp_name = path.as_os_str().to_owned();
            tmp_name.push(".tmp");
            let tmp = PathBuf::from(tmp_name);
            let _ = fs::remove_file(&tmp);
            let file_mode = if matches!(mode, FileMode::Public) {
                0o644
            } else {
                0o600
            };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(file_mode)
                .open(&tmp)
                .map_err(|source| TlsError::Write {
                    path: tmp.clone(),
                    source,
                })?;
            f.write_all(bytes).map_err(|source| TlsError::Write {
                path: tmp.clone(),
                source,
            })?;
            f.sync_all().map_err(|source| TlsError::Write {
                path: tmp.clone(),
                source,
            })?;
            // The umask may have narrowed the mode; keys must be exactly 0600.
            fs::set_permissions(&tmp, fs::Permissions::from_mode(file_mode)).map_err(|source| {
                TlsError::Write {
                    path: tmp.clone(),
                    source,
                }
            })?;
            fs::rename(&tmp, path).map_err(err)
        }
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bytes(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ParsePem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_first_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let mut certs = read_certs(path)?;
    Ok(certs.swap_remove(0))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bytes(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => TlsError::ParsePem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    })
}

/// A node's certificate chain, key and trusted CA, loaded and checked.
pub struct NodeIdentity {
    id: NodeId,
    role: Role,
    labels: Vec<String>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: Vec<CertificateDer<'static>>,
    ca_path: PathBuf,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            role: self.role,
            labels: self.labels.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            ca_path: self.ca_path.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("NodeIdentity")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("chain_len", &self.chain.len())
            .field("ca", &self.ca_path)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads a node's certificate (`cert`), key and CA. The node's id and role
    /// are read from its own certificate, so they cannot disagree with it.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = read_certs(cert)?;
        let key_der = read_key(key)?;
        let ca_certs = read_certs(ca)?;
        let (id, role) = peer_identity(&chain).map_err(|e| match e {
            TlsError::ParseCertificate { source, .. } => TlsError::ParseCertificate {
                what: cert.display().to_string(),
                source,
            },
            other => other,
        })?;
        let labels = peer_labels(&chain)?;
        Ok(Self {
            id,
            role,
            labels,
            chain,
            key: key_der,
            ca: ca_certs,
            ca_path: ca.to_path_buf(),
        })
    }

    /// Loads `<id>.pem`, `<id>.key` and `ca.pem` from a directory laid out by
    /// [`init_ca`] and [`issue`].
    pub fn load_from_dir(dir: &Path, id: &NodeId) -> Result<Self, TlsError> {
        let paths = NodePaths::in_dir(dir, id);
        Self::load(&paths.cert, &paths.key, &paths.ca)
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// A short fingerprint of the cluster's CA (the first 48 bits of the
    /// SHA-256 of its certificate, in hex): the same on every node of one
    /// cluster, and different for another cluster sharing the same Kafka.
    pub fn cluster_fingerprint(&self) -> String {
        use sha2::Digest;
        let der = self.ca.first().map(|c| c.as_ref()).unwrap_or_default();
        let digest = sha2::Sha256::digest(der);
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The labels the certificate carries, sorted.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(|source| TlsError::TrustStore {
                    path: self.ca_path.clone(),
                    source,
                })?;
        }
        Ok(roots)
    }
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config that requires a client certificate from the
/// cluster CA. TLS 1.3 only: QUIC allows nothing else.
pub fn server_config(identity: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = ring_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots()?), provider.clone())
            .build()?;
    let config_err = |source| TlsError::Config {
        side: "server",
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A rustls client config that trusts only the cluster CA and presents the
/// node's certificate.
pub fn client_config(identity: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let config_err = |source| TlsError::Config {
        side: "client",
        source,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn parse_end_entity<'a>(
    peer_certs_der: &'a [CertificateDer<'a>],
) -> Result<webpki::EndEntityCert<'a>, TlsError> {
    let leaf = peer_certs_der.first().ok_or(TlsError::NoPeerCertificate)?;
    webpki::EndEntityCert::try_from(leaf).map_err(|source| TlsError::ParseCertificate {
        what: "presented by the peer".to_string(),
        source,
    })
}

/// Checks that the peer's end-entity certificate names `claimed` in `role`.
/// The chain was verified by the handshake; this binds it to an id.
pub fn verify_peer_identity(
    peer_certs_der: &[CertificateDer<'_>],
    claimed: &NodeId,
    role: Role,
) -> Result<(), TlsError> {
    let leaf = parse_end_entity(peer_certs_der)?;
    let mismatch = || TlsError::IdentityMismatch {
        claimed: claimed.clone(),
        role,
    };
    // A valid NodeId always forms a valid DNS name; failing here still means
    // "not this identity", never a panic.
    let name = ServerName::try_from(claimed.dns_name(role)).map_err(|_| mismatch())?;
    leaf.verify_is_valid_for_subject_name(&name)
        .map_err(|_| mismatch())
}

/// Reads which node a certificate belongs to: the one SAN of the form
/// `<id>.<role>.tributary`. The result is re-checked with
/// [`verify_peer_identity`], so the SAN listing is never the sole authority.
pub fn peer_identity(peer_certs_der: &[CertificateDer<'_>]) -> Result<(NodeId, Role), TlsError> {
    let leaf = parse_end_entity(peer_certs_der)?;
    let mut found = Vec::new();
    for name in leaf.valid_dns_names() {
        let Some(rest) = name
            .strip_suffix(DNS_ZONE)
            .and_then(|r| r.strip_suffix('.'))
        else {
            continue;
        };
        let Some((id, role)) = rest.split_once('.') else {
            continue;
        };
        if let (Ok(id), Ok(role)) = (NodeId::new(id), role.parse::<Role>()) {
            found.push((id, role, name.to_string()));
        }
    }
    match found.len() {
        0 => Err(TlsError::NoIdentity),
        1 => {
            let (id, role, _) = found.swap_remove(0);
            verify_peer_identity(peer_certs_der, &id, role)?;
            Ok((id, role))
        }
        _ => Err(TlsError::AmbiguousIdentity {
            names: found.into_iter().map(|(_, _, name)| name).collect(),
        }),
    }
}

/// The labels a certificate carries (its SANs `<label>.label.tributary`),
/// sorted. Each is re-checked with the certificate's own name validation.
pub fn peer_labels(peer_certs_der: &[CertificateDer<'_>]) -> Result<Vec<String>, TlsError> {
    let leaf = parse_end_entity(peer_certs_der)?;
    let mut labels: Vec<String> = leaf
        .valid_dns_names()
        .filter_map(|name| {
            let label = name.strip_suffix(LABEL_ZONE)?.strip_suffix('.')?;
            NodeId::new(label).ok()?;
            let dns = ServerName::try_from(name.to_string()).ok()?;
            leaf.verify_is_valid_for_subject_name(&dns).ok()?;
            Some(label.to_string())
        })
        .take(LABELS_MAX)
        .collect();
    labels.sort();
    labels.dedup();
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_travel_in_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let id = NodeId::new("edge-1").unwrap();
        let labels = vec!["plant-b".to_string(), "line-2".to_string()];
        let paths = issue_labelled(dir.path(), &id, Role::Edge, &labels, 30).unwrap();
        let ident = NodeIdentity::load(&paths.cert, &paths.key, &paths.ca).unwrap();
        assert_eq!(
            ident.id(),
            &id,
            "a label SAN is not mistaken for the node's name"
        );
        assert_eq!(ident.role(), Role::Edge);
        assert_eq!(ident.labels(), ["line-2", "plant-b"]);
        assert_eq!(
            peer_labels(ident.certificate_chain()).unwrap(),
            ident.labels()
        );

        let plain = issue(dir.path(), &NodeId::new("edge-2").unwrap(), Role::Edge, 30).unwrap();
        let ident = NodeIdentity::load(&plain.cert, &plain.key, &plain.ca).unwrap();
        assert!(ident.labels().is_empty());

        for (bad, rule) in [
            (vec!["Plant".to_string()], "a-z"),
            (vec!["a.b".to_string()], "a-z"),
            (vec!["x".to_string(), "x".to_string()], "twice"),
            (
                (0..=LABELS_MAX).map(|i| format!("l{i}")).collect(),
                "at most",
            ),
        ] {
            let err = issue_labelled(dir.path(), &id, Role::Edge, &bad, 30).unwrap_err();
            assert!(err.to_string().contains(rule), "{bad:?}: {err}");
        }
    }

    #[test]
    fn node_id_rules() {
        assert!(NodeId::new("edge-1").is_ok());
        assert!(NodeId::new("a").is_ok());
        assert!(NodeId::new("a".repeat(63)).is_ok());
        for (bad, rule) in [
            ("", "empty"),
            ("-edge", "start or end"),
            ("edge-", "start or end"),
            ("Edge", "a-z"),
            ("edge.1", "a-z"),
            ("edge_1", "a-z"),
        ] {
            let err = NodeId::new(bad).unwrap_err().to_string();
            assert!(err.contains(rule), "{bad:?}: {err}");
        }
        let err = NodeId::new("a".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("63"), "{err}");
    }

    #[test]
    fn role_round_trips() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!("Edge".parse::<Role>().is_err());
    }

    #[test]
    fn issue_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        let key_mode = fs::metadata(&ca.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let err = init_ca(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"));

        let id = NodeId::new("cloud-1").unwrap();
        let paths = issue(dir.path(), &id, Role::Cloud, 30).unwrap();
        let key_mode = fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let ident = NodeIdentity::load(&paths.cert, &paths.key, &paths.ca).unwrap();
        assert_eq!(ident.id(), &id);
        assert_eq!(ident.role(), Role::Cloud);
        let chain = ident.certificate_chain();
        verify_peer_identity(chain, &id, Role::Cloud).unwrap();
        assert!(verify_peer_identity(chain, &id, Role::Edge).is_err());
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        let cloud = ServerName::try_from(CLOUD_SERVER_NAME).unwrap();
        leaf.verify_is_valid_for_subject_name(&cloud).unwrap();

        // Edge certificates must not answer to the name edges dial.
        let edge = NodeId::new("edge-1").unwrap();
        let paths = issue(dir.path(), &edge, Role::Edge, 30).unwrap();
        let ident = NodeIdentity::load(&paths.cert, &paths.key, &paths.ca).unwrap();
        let leaf = webpki::EndEntityCert::try_from(&ident.certificate_chain()[0]).unwrap();
        assert!(leaf.verify_is_valid_for_subject_name(&cloud).is_err());
        server_config(&ident).unwrap();
        client_config(&ident).unwrap();
    }

    #[test]
    fn load_errors_name_file_and_step() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let id = NodeId::new("edge-1").unwrap();
        let paths = issue(dir.path(), &id, Role::Edge, 1).unwrap();

        let missing = dir.path().join("nope.pem");
        let err = NodeIdentity::load(&missing, &paths.key, &paths.ca).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { ref path, .. } if *path == missing),
            "{err}"
        );

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "not pem at all\n").unwrap();
        let err = NodeIdentity::load(&empty, &paths.key, &paths.ca).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = NodeIdentity::load(&paths.cert, &empty, &paths.ca).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }

    #[test]
    fn invalid_validity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let id = NodeId::new("edge-1").unwrap();
        assert!(issue(dir.path(), &id, Role::Edge, 0).is_err());
        let now = SystemTime::now();
        assert!(issue_with_validity(dir.path(), &id, Role::Edge, now, now).is_err());
    }
}
