//! `gateway login`: on the user's machine, single sign-on to a
//! short-lived, device-bound client certificate.
//!
//! Asks the issuer (with the device's certificate) for the provider and a
//! nonce, runs the provider's device authorization grant (RFC 8628: the
//! user opens a URL, signs in with MFA; works on headless machines too),
//! generates the key here (0600, it never leaves the machine), sends only a
//! CSR with the ID token, and writes the certificate where TLS tools find
//! it: `user.pem` (leaf + intermediate), `user.key`, `ca.pem`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde::Deserialize;

use crate::issuer::http::{self, HttpError};
use crate::issuer::{CertificateRequest, CertificateResponse};

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("the issuer refused: {0}")]
    Refused(String),
    #[error("the provider: {0}")]
    Provider(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key: {0}")]
    Key(String),
}

pub struct LoginArgs {
    /// https://issuer:port
    pub issuer: String,
    /// Trust for the issuer's TLS (default: the system's).
    pub issuer_ca: Option<PathBuf>,
    /// Trust for the provider's TLS (default: the system's).
    pub provider_ca: Option<PathBuf>,
    pub device_cert: PathBuf,
    pub device_key: PathBuf,
    pub out: PathBuf,
    pub lifetime: Option<String>,
    /// Only when the current certificate runs out within this.
    pub renew_within: Option<Duration>,
    /// The device authorization grant (headless machines) instead of the
    /// authorization code flow with PKCE through a browser.
    pub device_flow: bool,
    /// Open the sign-in URL with `$BROWSER` (default `xdg-open`) as well as
    /// printing it.
    pub open_browser: bool,
}

/// Hands `url` to the user's browser; a failure only loses the
/// convenience (the URL is printed anyway).
fn open_browser(url: &str) {
    let browser = std::env::var_os("BROWSER").unwrap_or_else(|| "xdg-open".into());
    if let Err(e) = std::process::Command::new(&browser)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        tracing::warn!(browser = %browser.to_string_lossy(), error = %e,
            "could not open the browser: open the URL by hand");
    }
}

#[derive(Debug)]
pub enum Outcome {
    Issued(CertificateResponse),
    /// `--renew` and the certificate lasts longer than asked: its notAfter.
    StillValid(i64),
}

#[derive(Deserialize)]
struct IssuerInfo {
    issuer: String,
    client_id: String,
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct Nonce {
    nonce: String,
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    expires_in: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// What the issuer says when it refuses.
#[derive(Deserialize)]
struct IssuerError {
    message: String,
}

/// notAfter of the first certificate in `pem`, seconds since the epoch.
fn not_after(pem: &[u8]) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    crate::identity::Identity::from_leaf(&der)
        .ok()
        .map(|id| id.not_after)
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<PathBuf, LoginError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LoginError::Io { path, source }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

async fn issuer_call<T: serde::de::DeserializeOwned>(
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
    method: Method,
    body: Option<String>,
) -> Result<T, LoginError> {
    let (ct, body) = match body {
        Some(b) => (Some("application/json"), b.into_bytes()),
        None => (None, Vec::new()),
    };
    let (status, answer) = http::request(tls, method, url, ct, body).await?;
    if !status.is_success() {
        let why = serde_json::from_slice::<IssuerError>(&answer)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&answer).into_owned());
        return Err(LoginError::Refused(format!("{status}: {why}")));
    }
    http::json(url, status, &answer).map_err(LoginError::from)
}

/// The whole flow. `say` shows the user where to sign in.
pub async fn login(args: &LoginArgs, say: impl Fn(&str)) -> Result<Outcome, LoginError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LoginError::Io { path, source }
    };
    if let Some(within) = args.renew_within
        && let Ok(pem) = std::fs::read(args.out.join("user.pem"))
        && let Some(end) = not_after(&pem)
    {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        if end - now > within.as_secs() as i64 {
            return Ok(Outcome::StillValid(end));
        }
    }
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let base = args.issuer.trim_end_matches('/');
    let to_issuer = http::client_config(
        args.issuer_ca.as_deref(),
        Some((&args.device_cert, &args.device_key)),
    )?;
    let info: IssuerInfo =
        issuer_call(&to_issuer, &format!("{base}/v1/config"), Method::GET, None).await?;
    let nonce: Nonce = issuer_call(
        &to_issuer,
        &format!("{base}/v1/nonce"),
        Method::POST,
        Some("{}".into()),
    )
    .await?;
    let to_provider = http::client_config(args.provider_ca.as_deref(), None)?;
    let discovery = http::discover(&to_provider, &info.issuer).await?;
    let say_and_open = |msg: &str, url: &str| {
        say(msg);
        if args.open_browser {
            open_browser(url);
        }
    };
    let id_token = if args.device_flow {
        device_grant(&to_provider, &discovery, &info, &nonce.nonce, &say_and_open).await?
    } else {
        code_flow(&to_provider, &discovery, &info, &nonce.nonce, &say_and_open).await?
    };
    // The key is made here and only its CSR leaves.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| LoginError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| LoginError::Key(e.to_string()))?;
    let request = CertificateRequest {
        id_token,
        csr,
        lifetime: args.lifetime.clone(),
    };
    let body = serde_json::to_string(&request).map_err(|e| LoginError::Key(e.to_string()))?;
    let answer: CertificateResponse = issuer_call(
        &to_issuer,
        &format!("{base}/v1/certificate"),
        Method::POST,
        Some(body),
    )
    .await?;
    // Key first: a certificate never sits beside a key it does not match
    // for longer than a rename.
    write(&args.out, "user.key", &key.serialize_pem(), true)?;
    write(&args.out, "user.pem", &answer.certificate, false)?;
    write(&args.out, "ca.pem", &answer.ca, false)?;
    Ok(Outcome::Issued(answer))
}

/// RFC 8628: the user signs in on another screen; this polls for the token.
async fn device_grant(
    to_provider: &Arc<rustls::ClientConfig>,
    discovery: &http::Discovery,
    info: &IssuerInfo,
    nonce: &str,
    say: &impl Fn(&str, &str),
) -> Result<String, LoginError> {
    let endpoint = discovery
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| {
            LoginError::Provider(
                "no device_authorization_endpoint: the device flow is not enabled".into(),
            )
        })?;
    let scope = info.scopes.join(" ");
    let (status, body) = http::request(
        to_provider,
        Method::POST,
        &endpoint,
        Some("application/x-www-form-urlencoded"),
        http::form(&[
            ("client_id", &info.client_id),
            ("scope", &scope),
            ("nonce", nonce),
        ]),
    )
    .await?;
    let da: DeviceAuthorization = http::json(&endpoint, status, &body)?;
    match &da.verification_uri_complete {
        Some(complete) => say(
            &format!(
                "To sign in, open {complete}\n(or {} and enter the code {})",
                da.verification_uri, da.user_code
            ),
            complete,
        ),
        None => say(
            &format!(
                "To sign in, open {} and enter the code {}",
                da.verification_uri, da.user_code
            ),
            &da.verification_uri,
        ),
    }
    let mut interval = Duration::from_secs(da.interval.unwrap_or(5).max(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(da.expires_in.min(3600));
    let id_token = loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            return Err(LoginError::Provider(
                "the sign-in was not completed in time".into(),
            ));
        }
        let (_, body) = http::request(
            to_provider,
            Method::POST,
            &discovery.token_endpoint,
            Some("application/x-www-form-urlencoded"),
            http::form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &da.device_code),
                ("client_id", &info.client_id),
            ]),
        )
        .await?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| LoginError::Provider(format!("token endpoint: {e}")))?;
        match (answer.id_token, answer.error.as_deref()) {
            (Some(t), _) => break t,
            (None, Some("authorization_pending")) => {}
            (None, Some("slow_down")) => interval += Duration::from_secs(5),
            (None, error) => {
                return Err(LoginError::Provider(format!(
                    "{}: {}",
                    error.unwrap_or("no ID token"),
                    answer.error_description.unwrap_or_default()
                )));
            }
        }
    };
    Ok(id_token)
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random(n: usize) -> Result<Vec<u8>, LoginError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| LoginError::Key("no randomness".into()))?;
    Ok(b)
}

/// The authorization code flow with PKCE for a native app (RFC 8252): the
/// browser comes back to a one-shot listener on loopback with the code.
async fn code_flow(
    to_provider: &Arc<rustls::ClientConfig>,
    discovery: &http::Discovery,
    info: &IssuerInfo,
    nonce: &str,
    say: &impl Fn(&str, &str),
) -> Result<String, LoginError> {
    let endpoint = discovery.authorization_endpoint.as_deref().ok_or_else(|| {
        LoginError::Provider("no authorization_endpoint in the provider's discovery".into())
    })?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|source| LoginError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| LoginError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let verifier = base64url(&random(32)?);
    let challenge = base64url(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    let state = base64url(&random(16)?);
    let scope = info.scopes.join(" ");
    let query = String::from_utf8(http::form(&[
        ("response_type", "code"),
        ("client_id", &info.client_id),
        ("redirect_uri", &redirect_uri),
        ("scope", &scope),
        ("state", &state),
        ("nonce", nonce),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ]))
    .unwrap_or_default();
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    let url = format!("{endpoint}{sep}{query}");
    say(&format!("To sign in, open {url}"), &url);
    let code = tokio::time::timeout(Duration::from_secs(600), callback(&listener, &state))
        .await
        .map_err(|_| LoginError::Provider("the sign-in was not completed in time".into()))??;
    let (status, body) = http::request(
        to_provider,
        Method::POST,
        &discovery.token_endpoint,
        Some("application/x-www-form-urlencoded"),
        http::form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect_uri),
            ("client_id", &info.client_id),
            ("code_verifier", &verifier),
        ]),
    )
    .await?;
    let answer: TokenAnswer = serde_json::from_slice(&body)
        .map_err(|e| LoginError::Provider(format!("token endpoint ({status}): {e}")))?;
    answer.id_token.ok_or_else(|| {
        LoginError::Provider(format!(
            "no ID token ({status}): {} {}",
            answer.error.unwrap_or_default(),
            answer.error_description.unwrap_or_default()
        ))
    })
}

/// Waits for the browser's redirect with our `state`; anything else on the
/// port (another local process guessing) is answered 400 and ignored.
async fn callback(listener: &tokio::net::TcpListener, state: &str) -> Result<String, LoginError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let (tcp, _) = listener.accept().await.map_err(|source| LoginError::Io {
            path: "callback".into(),
            source,
        })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, String>>(1);
        let state = state.to_owned();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (tx, state) = (tx.clone(), state.clone());
                async move {
                    let q = req.uri().query().unwrap_or("");
                    let outcome = if http::query_value(q, "state").as_deref() != Some(&state) {
                        None
                    } else if let Some(code) = http::query_value(q, "code") {
                        Some(Ok(code))
                    } else {
                        Some(Err(format!(
                            "{}: {}",
                            http::query_value(q, "error").unwrap_or_else(|| "no code".into()),
                            http::query_value(q, "error_description").unwrap_or_default()
                        )))
                    };
                    let (status, text) = match &outcome {
                        Some(Ok(_)) => (200, "signed in: you can close this window"),
                        Some(Err(_)) => (400, "sign-in failed: see the terminal"),
                        None => (400, "not this sign-in"),
                    };
                    if let Some(o) = outcome {
                        let _ = tx.send(o).await;
                    }
                    let mut r = hyper::Response::new(Full::new(Bytes::from(text)));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
        // Bounded: another local process holding a connection open must
        // not keep the browser's redirect out.
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            hyper::server::conn::http1::Builder::new()
                // One answer per connection: a browser keeping it alive
                // would otherwise hold the sign-in up.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
        )
        .await;
        if let Ok(outcome) = rx.try_recv() {
            return outcome.map_err(LoginError::Provider);
        }
    }
}

/// Attacks that succeed on the reviewed code (reviews1, see
/// /work/helpers/s5/reviews1/findings.md): each test asserts the harm.
#[cfg(test)]
mod attack_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt as _;

    /// F8: `user.key` is written through `.user.key.tmp` opened with
    /// O_CREAT but neither O_EXCL nor O_NOFOLLOW, so the 0600 mode is only
    /// applied when the file is new: a tmp file (or symlink) left in the
    /// output directory by someone else makes the private key readable.
    #[test]
    fn attack_a_planted_tmp_file_makes_the_key_readable() {
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join(".user.key.tmp");
        std::fs::write(&planted, "").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key =
            super::write(dir.path(), "user.key", "-----BEGIN PRIVATE KEY-----", true).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "HARM: the private key is world-readable");

        // A symlink is followed: the key lands in the attacker's file.
        let theirs = dir.path().join("attacker-owned");
        std::fs::write(&theirs, "").unwrap();
        std::os::unix::fs::symlink(&theirs, &planted).unwrap();
        super::write(dir.path(), "user.key", "SECRET", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "SECRET",
            "HARM: the key was written through the planted symlink"
        );
    }
}
