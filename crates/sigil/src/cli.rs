//! Command-line interface definition and dispatch.

use crate::{cmd_ca, cmd_ops, serve};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Sigil: a private certificate authority.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about)]
pub struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offline root CA ceremony (run on the offline host).
    #[command(subcommand)]
    Root(RootCmd),
    /// Online intermediate: create its key and CSR, install its certificate.
    #[command(subcommand)]
    Intermediate(IntermediateCmd),
    /// Run the CA server.
    Serve(ServeArgs),
    /// Issue and inspect certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Naming policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Revokes a certificate (an operator action, audited).
    Revoke {
        /// Server configuration.
        #[arg(long)]
        config: PathBuf,
        /// Serial of the certificate, hex (colons allowed).
        #[arg(long)]
        serial: String,
        /// RFC 5280 reason: unspecified, keyCompromise (also blocks the key),
        /// affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn, or a code.
        #[arg(long, default_value = "unspecified")]
        reason: String,
        /// Operator name for the audit log (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Bootstrap tokens for the gRPC CSR API.
    #[command(subcommand)]
    Token(TokenCmd),
    /// CRLs made elsewhere (the offline root's ARL).
    #[command(subcommand)]
    Crl(CrlCmd),
    /// Cross-certificates between roots (root rotation).
    #[command(subcommand)]
    CrossCert(CrossCertCmd),
    /// ACME: external-account-binding keys and renewal deadlines (ARI).
    #[command(subcommand)]
    Acme(AcmeCmd),
    /// Obtains a certificate over gRPC and keeps it renewed.
    Agent(crate::agent::AgentArgs),
    /// Consistent online backup of a SQLite database (safe while serving).
    /// Keys and config are not in it: back those up separately.
    Backup {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Where to write the copy (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Database moves.
    #[command(subcommand)]
    Db(DbCmd),
    /// What needs attention: issuers (state, expiry, certificates
    /// outstanding), CRL and ARL freshness, OCSP responder and
    /// cross-certificate expiry. Exits 1 when something is due within 30
    /// days or already overdue, 3 when it cannot tell (an error).
    Status {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Warn about anything due within this long.
        #[arg(long, default_value = "30d")]
        warn_within: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RootCmd {
    /// Create a root key and self-signed certificate in DIR.
    Init {
        /// Directory for root.crt and root.key.
        #[arg(long)]
        dir: PathBuf,
        /// ecdsa-p384, ecdsa-p256, ed25519, rsa-3072 or rsa-4096.
        #[arg(long, default_value = "ecdsa-p384")]
        key_type: String,
        /// Subject, e.g. "CN=Corp Root CA,O=Corp".
        #[arg(long, default_value = "CN=Sigil Root CA")]
        subject: String,
        /// Validity, e.g. 10y.
        #[arg(long, default_value = "10y")]
        validity: String,
        /// File with the key passphrase (else SIGIL_ROOT_PASSPHRASE or a prompt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Sign an intermediate CA's CSR with the root.
    Sign {
        /// Directory holding root.crt and root.key.
        #[arg(long)]
        dir: PathBuf,
        /// The intermediate's CSR (PEM or DER).
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the intermediate certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Validity, e.g. 3y.
        #[arg(long, default_value = "3y")]
        validity: String,
        /// pathLenConstraint (0: the intermediate may only issue leaves).
        #[arg(long, default_value_t = 0)]
        path_len: u8,
        /// Permitted DNS subtree (name constraint); repeatable. `corp.internal`
        /// permits that name and every name below it.
        #[arg(long)]
        permitted_dns: Vec<String>,
        /// Permitted IP range (name constraint), CIDR; repeatable.
        #[arg(long)]
        permitted_ip: Vec<String>,
        /// File with the root key passphrase (else SIGIL_ROOT_PASSPHRASE or a prompt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// CRL distribution point to write into the intermediate: where the
        /// server publishes this root's ARL (`<public_url>/crl/<root-id>.crl`).
        #[arg(long)]
        crl_url: Option<String>,
    },
    /// Root rotation: this root certifies another root's key (a
    /// cross-certificate), so clients trusting only this root accept what
    /// the other signs. Run it both ways for a full overlap, then install
    /// the results with `sigil cross-cert install`.
    CrossSign {
        /// Directory of the signing root (root.crt, root.key).
        #[arg(long)]
        dir: PathBuf,
        /// The other root's certificate.
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the cross-certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Validity (capped at both roots' expiry), e.g. 2y.
        #[arg(long, default_value = "2y")]
        validity: String,
        /// File with the signing root's passphrase (else SIGIL_ROOT_PASSPHRASE or a prompt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Signs this root's ARL (the CA certificates it has revoked), optionally
    /// adding a revocation first. Publish it with `sigil crl install`.
    Crl {
        /// The root directory (root.crt, root.key; the ARL state is kept here).
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the ARL (DER).
        #[arg(long)]
        out: PathBuf,
        /// Serial (hex) of an intermediate to revoke first.
        #[arg(long)]
        revoke: Option<String>,
        /// RFC 5280 reason for --revoke (e.g. keyCompromise, cACompromise, superseded).
        #[arg(long, default_value = "superseded")]
        reason: String,
        /// nextUpdate − thisUpdate.
        #[arg(long, default_value = "30d")]
        validity: String,
        /// File holding the root key passphrase; else SIGIL_ROOT_PASSPHRASE, else a prompt.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IntermediateCmd {
    /// Generate the intermediate key (encrypted, 0600) and its CSR.
    Csr {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Key type.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: String,
        /// Subject.
        #[arg(long, default_value = "CN=Sigil Issuing CA")]
        subject: String,
        /// Where to write the CSR (default: intermediate.csr beside the config).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Install the root-signed intermediate certificate (checks key and chain).
    Install {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// The certificate from `sigil root sign`.
        #[arg(long)]
        cert: PathBuf,
        /// Install the certificate for the key made by `sigil intermediate
        /// rotate` as staged: trusted from now on, issuing only once activated.
        #[arg(long)]
        stage: bool,
    },
    /// Start a rotation: generate the next intermediate key (encrypted, 0600)
    /// and its CSR. Nothing changes for clients until it is signed, staged
    /// and activated.
    Rotate {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Make the next key in a PKCS#11 token instead of a key file:
        /// `pkcs11:token=T;object=O?module-path=M` (PIN: pin-source=file:P
        /// in the URI, SIGIL_PKCS11_PIN_FILE, SIGIL_PKCS11_PIN or a prompt).
        #[arg(long)]
        key: Option<String>,
        /// Key type (default: the current intermediate's).
        #[arg(long)]
        key_type: Option<String>,
        /// Subject (default: the current intermediate's).
        #[arg(long)]
        subject: Option<String>,
        /// Where to write the CSR (default: intermediate-next.csr beside the config).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Switch new issuance to the staged intermediate, now or at a set time.
    /// The replaced issuer keeps answering OCSP and publishing CRLs until its
    /// last certificate expires.
    Activate {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// When: RFC 3339 time or a duration from now (`2h`). Default: now.
        #[arg(long)]
        at: Option<String>,
        /// Ask clients (ACME ARI, gRPC WatchRotation) to renew certificates
        /// of the replaced issuer by this time (RFC 3339 or duration from now).
        #[arg(long)]
        renew_all_by: Option<String>,
        /// Operator name for the audit log (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Withdraw the staged intermediate (one signed by mistake, or with the
    /// wrong subject or lifetime): it leaves the trust bundle and never
    /// issues, and a new rotation can start.
    Unstage {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Operator name for the audit log (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

/// `sigil db ...`
#[derive(Debug, Subcommand)]
pub enum DbCmd {
    /// Copy a CA to a fresh database (e.g. SQLite to PostgreSQL to run
    /// several nodes): certificates, revocations, CRLs, ACME state and the
    /// audit chain, which is verified on arrival. Stop the server first.
    Migrate {
        /// Source URL, e.g. sqlite:///var/lib/sigil/sigil.db
        #[arg(long)]
        from: String,
        /// Target URL, e.g. postgres://sigil@db.internal/sigil (must be empty).
        #[arg(long)]
        to: String,
    },
}

impl ServeArgs {
    /// The dev CA's directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./sigil-data"))
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Path to sigil.toml.
    #[arg(long, required_unless_present = "dev", conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Create (or reuse) a development CA in --data-dir and serve it.
    #[arg(long)]
    pub dev: bool,
    /// Data directory for --dev [default: ./sigil-data].
    #[arg(long, conflicts_with = "config")]
    pub data_dir: Option<PathBuf>,
    /// Override server.http_addr.
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
    /// gRPC CSR API listener (overrides grpc.addr; the dev CA defaults to 127.0.0.1:9443).
    #[arg(long)]
    pub grpc_addr: Option<std::net::SocketAddr>,
    /// HTTPS (ACME) listener (overrides acme.https_addr; the dev CA defaults to 127.0.0.1:8443).
    #[arg(long)]
    pub https_addr: Option<std::net::SocketAddr>,
    /// Port contacted for http-01 validation (overrides acme.validation_http_port).
    #[arg(long)]
    pub validation_http_port: Option<u16>,
    /// Port contacted for tls-alpn-01 validation (overrides acme.validation_tls_port).
    #[arg(long)]
    pub validation_tls_port: Option<u16>,
    /// DNS server IP:PORT for dns-01 and validation lookups (overrides acme.dns_resolver).
    #[arg(long)]
    pub dns_resolver: Option<std::net::SocketAddr>,
    /// Require an external account binding for new ACME accounts (sets acme.eab_required).
    #[arg(long)]
    pub eab_required: bool,
}

/// `sigil crl ...`
#[derive(Debug, Subcommand)]
pub enum CrlCmd {
    /// Verifies a root's ARL against the configured roots and publishes it at
    /// `/crl/<root-id>.crl`.
    Install {
        /// Server configuration.
        #[arg(long)]
        config: PathBuf,
        /// The ARL from `sigil root crl`.
        crl: PathBuf,
    },
}

/// `sigil cross-cert ...`
#[derive(Debug, Subcommand)]
pub enum CrossCertCmd {
    /// Checks a cross-certificate from `sigil root cross-sign` against the
    /// configured roots (both must be listed in ca.roots) and installs it:
    /// it joins /roots.pem and GetTrustBundle, and ACME offers chains
    /// through it as Link rel="alternate".
    Install {
        /// Server configuration.
        #[arg(long)]
        config: PathBuf,
        /// The cross-certificate.
        #[arg(long)]
        cert: PathBuf,
    },
}

/// `sigil token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Prints a one-time bootstrap token (a signed JWT) for the gRPC Sign call.
    Create {
        /// Server configuration (its [grpc] section names the token-signing key).
        #[arg(long)]
        config: PathBuf,
        /// Who the token is for; policies see it as requester `token:SUBJECT`.
        #[arg(long)]
        subject: String,
        /// A name the token may obtain (repeat for several).
        #[arg(long, required = true)]
        san: Vec<String>,
        /// How long the token stays usable.
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

/// `sigil acme ...`
#[derive(Debug, Subcommand)]
pub enum AcmeCmd {
    /// External account binding keys.
    #[command(subcommand)]
    Eab(EabCmd),
    /// Asks ACME clients (through ARI) to renew a certificate, or everything
    /// from one issuer, by a deadline.
    Ari {
        /// Server configuration.
        #[arg(long)]
        config: PathBuf,
        /// One certificate, by hex serial.
        #[arg(long, conflicts_with = "issuer")]
        serial: Option<String>,
        /// Every certificate of one issuer, by issuer id.
        #[arg(long)]
        issuer: Option<String>,
        /// Deadline: RFC 3339 time or a duration from now (e.g. 6h).
        #[arg(long)]
        renew_by: String,
        /// Operator name for the audit log (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

/// `sigil acme eab ...`
#[derive(Debug, Subcommand)]
pub enum EabCmd {
    /// Creates an EAB key (prints its key id and base64url HMAC key).
    Create {
        /// Server configuration.
        #[arg(long)]
        config: PathBuf,
        /// The requester name accounts bound to this key act as in the naming
        /// policy (`eab:NAME`); default: the key id.
        #[arg(long)]
        requester: Option<String>,
        /// Operator name for the audit log (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Issue a certificate from a CSR (policy-checked and audited).
    Issue {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// The CSR (PEM or DER).
        #[arg(long)]
        csr: PathBuf,
        /// mtls (default), server or client.
        #[arg(long)]
        profile: Option<String>,
        /// Lifetime, e.g. 24h.
        #[arg(long)]
        lifetime: Option<String>,
        /// Operator name recorded in the audit log (default: $USER).
        #[arg(long)]
        operator: Option<String>,
        /// Write the chain here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List issued certificates, newest first.
    List {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Only certificates for this exact name.
        #[arg(long)]
        name: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show one certificate.
    Show {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Serial (hex).
        #[arg(long)]
        serial: String,
        /// Also print the PEM.
        #[arg(long)]
        pem: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Recompute the hash chain; name the first bad row.
    ///
    /// The chain alone cannot show rows cut from its end, or a chain rebuilt
    /// by someone with write access to the database: keep the head this
    /// prints (SEQ:HASH) somewhere else, and pass it back with
    /// --expect-head to check that it is still in the chain.
    Verify {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// A head recorded earlier (SEQ:HASH, as printed): that row must
        /// still be in the chain with that hash. Repeatable.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Vec<String>,
    },
    /// Print the latest audit rows.
    List {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Explain whether a requester may get names, rule by rule.
    Check {
        /// Path to sigil.toml.
        #[arg(long)]
        config: PathBuf,
        /// Requester, e.g. operator:alice, token:web, mtls:spiffe://corp/ns/x/sa/y.
        #[arg(long)]
        requester: String,
        /// Names to check; repeatable.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Profile.
        #[arg(long, default_value = "mtls")]
        profile: String,
        /// Key type: ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: String,
        /// Requested lifetime.
        #[arg(long)]
        lifetime: Option<String>,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Root(c) => cmd_ca::root(c),
        Command::Intermediate(c) => cmd_ca::intermediate(c).await,
        Command::Serve(a) => serve::serve(a).await,
        Command::Cert(c) => cmd_ops::cert(c).await,
        Command::Audit(c) => cmd_ops::audit(c).await,
        Command::Policy(c) => cmd_ops::policy(c),
        Command::Token(c) => crate::cmd_token::token(c),
        Command::Crl(CrlCmd::Install { config, crl }) => cmd_ca::install_crl(&config, &crl).await,
        Command::Revoke {
            config,
            serial,
            reason,
            operator,
        } => cmd_ops::revoke(&config, &serial, &reason, operator.as_deref()).await,
        Command::Agent(a) => crate::agent::run(a).await,
        Command::CrossCert(CrossCertCmd::Install { config, cert }) => {
            cmd_ca::install_cross(&config, &cert).await
        }
        Command::Backup { config, out } => crate::cmd_status::backup(&config, &out).await,
        Command::Db(DbCmd::Migrate { from, to }) => crate::cmd_status::migrate(&from, &to).await,
        Command::Status {
            config,
            warn_within,
        } => match crate::cmd_status::status(&config, &warn_within).await {
            Ok(code) => Ok(code),
            // A monitoring check must tell "cannot tell" from "due".
            Err(e) => {
                eprintln!("error: {}", crate::describe(&e));
                Ok(ExitCode::from(3))
            }
        },
        Command::Acme(c) => crate::cmd_acme::acme(c).await,
    }
}
