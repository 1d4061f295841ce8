//! `X-Request-Id`: every response carries one, so a client's report and the server's log line
//! can be matched. A caller's own id (a gateway's, say) is kept when it is safe to echo and to
//! log: 1 to 128 visible ASCII characters. Anything else is replaced by a generated id rather
//! than refused, since a bad tracing header is no reason to fail the request.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
pub const MAX_LEN: usize = 128;

/// The request's id, in the request extensions for handlers that log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The caller's id when it is 1..=MAX_LEN visible ASCII characters (no spaces, no controls).
pub fn accept(value: &HeaderValue) -> Option<String> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

pub fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = request.headers().get(HEADER).and_then(accept).unwrap_or_else(generate);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    // Visible ASCII only, so this cannot fail; a failure would drop the header, not the reply.
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_visible_ascii_ids_are_kept() {
        let v = |s: &[u8]| HeaderValue::from_bytes(s).expect("header value");
        assert_eq!(accept(&v(b"req-42_abc:1")), Some("req-42_abc:1".into()));
        assert_eq!(accept(&v(&[b'a'; MAX_LEN])).map(|s| s.len()), Some(MAX_LEN));
        assert_eq!(accept(&v(&[b'a'; MAX_LEN + 1])), None);
        assert_eq!(accept(&v(b"")), None);
        assert_eq!(accept(&v(b"has space")), None);
        assert_eq!(accept(&v(b"tab\there")), None);
        assert_eq!(accept(&v("caf\u{e9}".as_bytes())), None);
        let g = generate();
        assert!(accept(&v(g.as_bytes())).is_some() && g != generate());
    }
}
