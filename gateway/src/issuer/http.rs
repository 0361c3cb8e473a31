//! A small HTTPS client (hyper over tokio-rustls) for the provider's
//! discovery, JWKS and token endpoints, and for `gateway login` talking to
//! the issuer. HTTPS only; answers bounded in size and time.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{0}: {1}")]
    Trust(String, String),
}

/// Where Debian and its kin keep the system's trust anchors.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

const MAX_ANSWER: usize = 1 << 20;

/// An error with its causes: hyper's "connection error" alone hides the
/// TLS alert (a revoked device certificate) that caused it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
const DEADLINE: Duration = Duration::from_secs(15);

/// A TLS client config trusting `ca` (default: the system's anchors), with
/// an optional client certificate (the device's, towards the issuer).
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, HttpError> {
    let ca = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
    let trust =
        |e: &dyn std::fmt::Display| HttpError::Trust(ca.display().to_string(), e.to_string());
    let roots = crate::tls::certs::load_roots(ca).map_err(|e| trust(&e))?;
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| trust(&e))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let err = |e: &dyn std::fmt::Display| {
                HttpError::Trust(cert.display().to_string(), e.to_string())
            };
            let chain = crate::tls::certs::load_certs(cert).map_err(|e| err(&e))?;
            let key = crate::tls::certs::load_key(key).map_err(|e| err(&e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| err(&e))?
        }
    };
    Ok(Arc::new(config))
}

/// One request; the status and the body.
pub async fn request(
    tls: &Arc<ClientConfig>,
    method: Method,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), HttpError> {
    let fail = |reason: String| HttpError::Request {
        url: url.to_owned(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|e| fail(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(fail("only https:// is used".into()));
    }
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = ServerName::try_from(bare.clone()).map_err(|e| fail(e.to_string()))?;
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    tokio::time::timeout(DEADLINE, async {
        let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(chain(&e)))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(e.to_string()))?;
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                // The connection's own error says why (a TLS alert: the
                // device certificate refused); the request's only that
                // the connection went away.
                let why = match tokio::time::timeout(Duration::from_secs(1), conn).await {
                    Ok(Ok(Err(c))) => chain(&c),
                    _ => chain(&e),
                };
                return Err(fail(why));
            }
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .map_err(|_| fail("no answer in time".into()))?
}

/// GET, expecting 200 and JSON.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    tls: &Arc<ClientConfig>,
    url: &str,
) -> Result<T, HttpError> {
    let (status, body) = request(tls, Method::GET, url, None, Vec::new()).await?;
    json(url, status, &body)
}

pub fn json<T: serde::de::DeserializeOwned>(
    url: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, HttpError> {
    let fail = |reason: String| HttpError::Request {
        url: url.to_owned(),
        reason,
    };
    if !status.is_success() {
        return Err(fail(format!(
            "{status}: {}",
            String::from_utf8_lossy(body.get(..512).unwrap_or(body))
        )));
    }
    serde_json::from_slice(body).map_err(|e| fail(format!("unexpected answer: {e}")))
}

/// `application/x-www-form-urlencoded` (RFC 1866 §8.2.1 as the token
/// endpoint reads it).
pub fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    fn enc(s: &str, out: &mut String) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        enc(k, &mut out);
        out.push('=');
        enc(v, &mut out);
    }
    out.into_bytes()
}

/// The value of `key` in a query string (`a=1&b=x%20y`), percent- and
/// plus-decoded; None when absent or not UTF-8 after decoding.
pub fn query_value(query: &str, key: &str) -> Option<String> {
    fn decode(s: &str) -> Option<String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s.get(i + 1..i + 3)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                _ => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    }
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == key).then(|| decode(v)).flatten()
    })
}

/// What the provider publishes at `/.well-known/openid-configuration`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
}

/// Discovery for `issuer`; its `issuer` must be the one asked for
/// (OIDC Discovery §4.3), or the keys could be someone else's.
pub async fn discover(tls: &Arc<ClientConfig>, issuer: &str) -> Result<Discovery, HttpError> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let d: Discovery = get_json(tls, &url).await?;
    if d.issuer != issuer {
        return Err(HttpError::Request {
            url,
            reason: format!("names issuer {:?}, not {issuer:?}", d.issuer),
        });
    }
    Ok(d)
}

/// The provider's JWKS, found through discovery each time (a provider
/// may move it when it rotates).
pub struct ProviderKeys {
    pub tls: Arc<ClientConfig>,
    pub issuer: String,
}

impl super::oidc::KeySource for ProviderKeys {
    fn fetch(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            let d = discover(&self.tls, &self.issuer)
                .await
                .map_err(|e| e.to_string())?;
            let (status, body) = request(&self.tls, Method::GET, &d.jwks_uri, None, Vec::new())
                .await
                .map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{}: {status}", d.jwks_uri));
            }
            String::from_utf8(body.to_vec()).map_err(|e| format!("{}: {e}", d.jwks_uri))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_decoded() {
        let q = "code=a%2Fb+c&state=xyz&bad=%zz&empty";
        assert_eq!(super::query_value(q, "code").as_deref(), Some("a/b c"));
        assert_eq!(super::query_value(q, "state").as_deref(), Some("xyz"));
        assert_eq!(super::query_value(q, "bad"), None);
        assert_eq!(super::query_value(q, "empty").as_deref(), Some(""));
        assert_eq!(super::query_value(q, "missing"), None);
        assert_eq!(super::query_value("x=%4", "x"), None);
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(
            super::form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("a b", "x&y=z")
            ]),
            b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&a+b=x%26y%3Dz"
        );
    }
}
